//! Running commands in a session: the request builder, the output stream, and
//! the [`Client::exec`] / [`Client::exec_collect`] calls.
//!
//! Exec goes straight to the session's node agent with the session token. A
//! rejected start (token expired, session moved, agent unreachable) is retried
//! once after refreshing the session; once the command may have started, it is
//! never sent again.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use sandfleet_common::limits::{DEFAULT_EXEC_TIMEOUT, MAX_GRPC_MESSAGE_BYTES};
use tracing::Instrument;

use crate::proto::exec_service_client::ExecServiceClient;
use crate::proto::{self, Language};
use crate::{Client, Error};

/// How much longer the gRPC deadline of an exec is than the command's own
/// timeout, so the agent can kill the command and report it.
const EXEC_DEADLINE_SLACK: Duration = Duration::from_secs(60);

/// What to run in a session.
///
/// ```
/// use std::time::Duration;
/// use sandfleet::{ExecRequest, Language};
/// let a = ExecRequest::argv(["python3", "-c", "print(1)"]).timeout(Duration::from_secs(5));
/// let b = ExecRequest::code(Language::Python, "print(1)").env("X", "1").stdin(b"in".to_vec());
/// # let _ = (a, b);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ExecRequest {
    inner: proto::ExecRequest,
}

impl ExecRequest {
    /// Runs an argv; `argv[0]` is looked up on the sandbox PATH.
    pub fn argv(argv: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let argv = argv.into_iter().map(Into::into).collect();
        Self::from_command(proto::exec_request::Command::Argv(proto::ArgvCommand { argv }))
    }

    /// Runs source code with an interpreter (`python3 -c`, `node -e`, `bash -c`).
    pub fn code(language: Language, code: impl Into<String>) -> Self {
        Self::from_command(proto::exec_request::Command::Code(proto::CodeCommand {
            code: code.into(),
            language: language as i32,
        }))
    }

    fn from_command(command: proto::exec_request::Command) -> Self {
        Self { inner: proto::ExecRequest { command: Some(command), ..Default::default() } }
    }

    /// Wall-clock limit (default 30 s, at most 1 h).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.inner.timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1);
        self
    }

    /// Adds an environment variable for this exec only.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.inner.env.insert(key.into(), value.into());
        self
    }

    /// Bytes fed to standard input (at most 1 MiB), then stdin is closed.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.inner.stdin = data.into();
        self
    }

    /// Working directory, relative to the workspace root.
    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.inner.workdir = dir.into();
        self
    }

    /// The wire request (its `session_id` is filled in by [`Client::exec`]).
    pub fn as_proto(&self) -> &proto::ExecRequest {
        &self.inner
    }

    /// The wire request.
    pub fn into_proto(self) -> proto::ExecRequest {
        self.inner
    }

    /// The command's own timeout: the one set, or the server default.
    fn effective_timeout(&self) -> Duration {
        match self.inner.timeout_ms {
            0 => DEFAULT_EXEC_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
    }
}

impl From<proto::ExecRequest> for ExecRequest {
    fn from(inner: proto::ExecRequest) -> Self {
        Self { inner }
    }
}

/// One event of a running exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes the command wrote to stdout.
    Stdout(Vec<u8>),
    /// Bytes the command wrote to stderr.
    Stderr(Vec<u8>),
    /// How the command ended. Always the last event.
    Exit(proto::ExitStatus),
}

/// Everything an exec produced, from [`Client::exec_collect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub exit: proto::ExitStatus,
}

impl ExecOutput {
    /// stdout as text (lossy UTF-8).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (lossy UTF-8).
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// True when the command exited 0 on its own.
    pub fn success(&self) -> bool {
        self.exit.exit_code == 0 && self.exit.signal == 0 && !self.exit.timed_out
    }
}

/// The process exit code for an exit status: its code, or 128+N when killed by signal N.
pub fn exit_code_of(status: &proto::ExitStatus) -> i32 {
    if status.signal != 0 {
        128 + status.signal
    } else {
        status.exit_code
    }
}

/// Output of a running exec, as it is produced. Ends after [`ExecEvent::Exit`];
/// a stream that ends without one yields [`Error::Protocol`] last.
/// Dropping it cancels the call (the agent then kills the command).
pub struct ExecStream {
    inner: tonic::Streaming<proto::ExecResponse>,
    done: bool,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream").field("done", &self.done).finish_non_exhaustive()
    }
}

impl ExecStream {
    /// Collects the whole output and the exit status.
    pub async fn collect_output(mut self) -> Result<ExecOutput, Error> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        while let Some(ev) = self.next().await {
            match ev? {
                ExecEvent::Stdout(d) => stdout.extend_from_slice(&d),
                ExecEvent::Stderr(d) => stderr.extend_from_slice(&d),
                ExecEvent::Exit(exit) => return Ok(ExecOutput { stdout, stderr, exit }),
            }
        }
        Err(Error::Protocol("stream ended without an exit status".into()))
    }
}

impl Stream for ExecStream {
    type Item = Result<ExecEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use proto::exec_response::Event;
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let item = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(item) => item,
            };
            let event = match item {
                None => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::Protocol("stream ended without an exit status".into()))));
                }
                Some(Err(status)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(Error::Status(status))));
                }
                Some(Ok(resp)) => resp.event,
            };
            match event {
                Some(Event::Output(chunk)) => {
                    let ev = match proto::OutputStream::try_from(chunk.stream) {
                        Ok(proto::OutputStream::Stderr) => ExecEvent::Stderr(chunk.data),
                        _ => ExecEvent::Stdout(chunk.data),
                    };
                    return Poll::Ready(Some(Ok(ev)));
                }
                Some(Event::Exit(exit)) => {
                    self.done = true;
                    return Poll::Ready(Some(Ok(ExecEvent::Exit(exit))));
                }
                // An event kind from a newer server: skip it.
                None => continue,
            }
        }
    }
}

impl Client {
    /// Starts a command in a session and streams its output.
    ///
    /// Talks to `session.node_address` with `session.token`; a session without
    /// them (e.g. from a list) is fetched first.
    pub async fn exec(&self, session: &proto::Session, req: ExecRequest) -> Result<ExecStream, Error> {
        if req.inner.command.is_none() {
            return Err(Error::InvalidArgument("an exec needs an argv or code".into()));
        }
        let deadline = req.effective_timeout().saturating_add(EXEC_DEADLINE_SLACK);
        let mut msg = req.into_proto();
        msg.session_id = session.id.clone();
        let span = tracing::info_span!("exec", session = %session.id);
        let inner = self
            .data_call(session, "exec", |t| {
                let msg = msg.clone();
                async move {
                    let req = t.request(msg, Some(deadline));
                    let resp = ExecServiceClient::new(t.channel)
                        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
                        .exec(req)
                        .await?;
                    Ok(resp.into_inner())
                }
            })
            .instrument(span)
            .await?;
        Ok(ExecStream { inner, done: false })
    }

    /// Runs a command to completion and returns all of its output.
    pub async fn exec_collect(&self, session: &proto::Session, req: ExecRequest) -> Result<ExecOutput, Error> {
        self.exec(session, req).await?.collect_output().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_fills_request() {
        let r = ExecRequest::argv(["python3", "-c", "print(1)"])
            .timeout(Duration::from_secs(5))
            .env("A", "1")
            .stdin(b"x".to_vec())
            .workdir("sub");
        let p = r.as_proto();
        assert_eq!(p.timeout_ms, 5000);
        assert_eq!(p.env["A"], "1");
        assert_eq!(p.stdin, b"x");
        assert_eq!(p.workdir, "sub");
        match &p.command {
            Some(proto::exec_request::Command::Argv(a)) => assert_eq!(a.argv, ["python3", "-c", "print(1)"]),
            other => panic!("unexpected {other:?}"),
        }
        let c = ExecRequest::code(Language::Bash, "echo hi").into_proto();
        match c.command {
            Some(proto::exec_request::Command::Code(c)) => {
                assert_eq!(c.language, Language::Bash as i32);
                assert_eq!(c.code, "echo hi");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(ExecRequest::code(Language::Python, "1").effective_timeout(), DEFAULT_EXEC_TIMEOUT);
    }

    #[test]
    fn exit_codes() {
        let mut s = proto::ExitStatus { exit_code: 3, ..Default::default() };
        assert_eq!(exit_code_of(&s), 3);
        s.signal = 9;
        s.exit_code = 137;
        assert_eq!(exit_code_of(&s), 137);
    }
}
