//! The executor's wire format: typed messages in length-delimited frames.
//!
//! A frame is a big-endian `u32` length, then that many bytes
//! ([`tokio_util::codec::LengthDelimitedCodec`], at most [`MAX_FRAME_BYTES`]).
//! Its first byte is the message kind; the rest is the payload: raw bytes
//! for output chunks, JSON for everything else. [`ExecutorCodec`] turns
//! frames into [`Message`]s and back, for a `Framed` Unix stream.

use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::runtime::{Command, ExecSpec, ExitInfo, Language, RuntimeError};
use sandfleet_common::trace_context::MeasuredSpan;

/// Version of the wire protocol; the image carries an executor of the same crate.
/// 2: length-delimited frames (the length first, then the kind).
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest frame accepted: a request carries at most stdin (1 MiB) + code
/// (1 MiB) + env (base64 and JSON included); output chunks are 64 KiB.
pub const MAX_FRAME_BYTES: usize = 8 * 1024 * 1024;

/// One message between the agent and the executor.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Client → executor, first and only: what to do.
    Request(Request),
    /// A chunk of stdout.
    Stdout(Bytes),
    /// A chunk of stderr.
    Stderr(Bytes),
    /// How the command ended (the last message of an exec).
    Exit(WireExit),
    /// The request failed (the last message).
    Error(WireError),
    /// Answer to [`Request::Ping`].
    Pong(Pong),
}

/// The kind byte of each [`Message`].
mod kind {
    pub const REQUEST: u8 = 1;
    pub const STDOUT: u8 = 2;
    pub const STDERR: u8 = 3;
    pub const EXIT: u8 = 4;
    pub const ERROR: u8 = 5;
    pub const PONG: u8 = 6;
}

/// A request to the executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Liveness and version check.
    Ping,
    /// Run one command.
    Exec(WireExec),
}

/// The command of an exec on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireCommand {
    /// A plain argv.
    Argv {
        /// argv[0] is looked up on PATH.
        argv: Vec<String>,
    },
    /// Code for an interpreter ("python", "node" or "bash").
    Code {
        /// The interpreter.
        language: String,
        /// The source.
        code: String,
    },
}

/// One exec, with what the session contributes (env, limits for messages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireExec {
    /// What to run.
    pub command: WireCommand,
    /// The session's env (applied before `env`).
    pub session_env: BTreeMap<String, String>,
    /// The exec's env.
    pub env: BTreeMap<String, String>,
    /// Written to stdin, then closed.
    #[serde(with = "b64")]
    pub stdin: Vec<u8>,
    /// Working directory relative to the workspace.
    pub workdir: String,
    /// Wall-clock limit in ms (0 = default).
    pub timeout_ms: u64,
    /// Output cap in bytes (0 = default).
    pub output_cap: u64,
    /// The session's memory limit (named in OOM messages).
    pub memory_bytes: u64,
    /// The session's pids limit (named in refused-fork messages).
    pub pids_limit: u32,
    /// The W3C trace parent of the agent's exec span: the executor measures its
    /// spans in that trace and returns them in [`WireExit::spans`] (it has no
    /// network to export them). Empty when the exec is not traced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub traceparent: String,
}

/// How an exec ended, on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireExit {
    /// Exit code (128+N for signal N).
    pub exit_code: i32,
    /// Signal, or 0.
    pub signal: i32,
    /// Wall-clock duration in microseconds.
    pub duration_us: u64,
    /// Killed at the timeout.
    pub timed_out: bool,
    /// The OOM killer ended a process.
    pub oom_killed: bool,
    /// Output went past the cap.
    pub output_truncated: bool,
    /// Why it did not end on its own.
    pub message: String,
    /// The executor's spans of this exec (`executor.exec`), when the request
    /// had a `traceparent`; the agent exports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spans: Vec<MeasuredSpan>,
}

/// An error, on the wire: the [`RuntimeError`] variant and its text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError {
    /// "invalid_argument", "not_found", "unavailable", "workspace" or "internal".
    pub kind: String,
    /// The message, as the executor's error displayed it.
    pub message: String,
}

/// Answer to a ping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pong {
    /// [`PROTOCOL_VERSION`] of the executor.
    pub protocol: u32,
}

mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

impl WireExec {
    /// The wire form of an exec of a session.
    pub fn new(spec: &ExecSpec, session_env: &BTreeMap<String, String>, memory_bytes: u64, pids_limit: u32) -> Self {
        let command = match &spec.command {
            Command::Argv(argv) => WireCommand::Argv { argv: argv.clone() },
            Command::Code { language, code } => WireCommand::Code {
                language: match language {
                    Language::Python => "python",
                    Language::Node => "node",
                    Language::Bash => "bash",
                }
                .to_string(),
                code: code.clone(),
            },
        };
        Self {
            command,
            session_env: session_env.clone(),
            env: spec.env.clone(),
            stdin: spec.stdin.clone(),
            workdir: spec.workdir.clone(),
            timeout_ms: u64::try_from(spec.timeout.as_millis()).unwrap_or(u64::MAX),
            output_cap: spec.output_cap,
            memory_bytes,
            pids_limit,
            traceparent: String::new(),
        }
    }

    /// Back to an [`ExecSpec`].
    pub fn spec(&self) -> Result<ExecSpec, RuntimeError> {
        let command = match &self.command {
            WireCommand::Argv { argv } => Command::Argv(argv.clone()),
            WireCommand::Code { language, code } => {
                let language = match language.as_str() {
                    "python" => Language::Python,
                    "node" => Language::Node,
                    "bash" => Language::Bash,
                    other => {
                        return Err(RuntimeError::InvalidArgument(format!(
                            "invalid language {:?}: use python, node or bash",
                            other.chars().take(32).collect::<String>()
                        )))
                    }
                };
                Command::Code { language, code: code.clone() }
            }
        };
        Ok(ExecSpec {
            command,
            env: self.env.clone(),
            stdin: self.stdin.clone(),
            workdir: self.workdir.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
            output_cap: self.output_cap,
        })
    }
}

impl From<&ExitInfo> for WireExit {
    fn from(i: &ExitInfo) -> Self {
        Self {
            exit_code: i.exit_code,
            signal: i.signal,
            duration_us: u64::try_from(i.duration.as_micros()).unwrap_or(u64::MAX),
            timed_out: i.timed_out,
            oom_killed: i.oom_killed,
            output_truncated: i.output_truncated,
            message: i.message.clone(),
            spans: Vec::new(),
        }
    }
}

impl From<WireExit> for ExitInfo {
    fn from(w: WireExit) -> Self {
        Self {
            exit_code: w.exit_code,
            signal: w.signal,
            duration: Duration::from_micros(w.duration_us),
            timed_out: w.timed_out,
            oom_killed: w.oom_killed,
            output_truncated: w.output_truncated,
            message: w.message,
        }
    }
}

impl From<&RuntimeError> for WireError {
    fn from(e: &RuntimeError) -> Self {
        let kind = match e {
            RuntimeError::InvalidArgument(_) | RuntimeError::Validation(_) => "invalid_argument",
            RuntimeError::NotFound(_) => "not_found",
            RuntimeError::Unavailable(_) => "unavailable",
            RuntimeError::Workspace(
                crate::workspace::FsError::InvalidPath(_) | crate::workspace::FsError::Escape(_),
            ) => "invalid_argument",
            RuntimeError::Workspace(_) | RuntimeError::Io(_) | RuntimeError::Internal(_) | RuntimeError::NoQuota(_) => {
                "internal"
            }
        };
        Self { kind: kind.to_string(), message: e.to_string() }
    }
}

impl From<WireError> for RuntimeError {
    fn from(w: WireError) -> Self {
        match w.kind.as_str() {
            "invalid_argument" => RuntimeError::InvalidArgument(w.message),
            "not_found" => RuntimeError::NotFound(w.message),
            "unavailable" => RuntimeError::Unavailable(w.message),
            _ => RuntimeError::Internal(format!("executor: {}", w.message)),
        }
    }
}

/// [`Message`]s over [`LengthDelimitedCodec`] frames.
#[derive(Debug)]
pub struct ExecutorCodec {
    frames: LengthDelimitedCodec,
}

impl Default for ExecutorCodec {
    fn default() -> Self {
        Self { frames: LengthDelimitedCodec::builder().max_frame_length(MAX_FRAME_BYTES).new_codec() }
    }
}

fn invalid_data(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn json<T: Serialize>(v: &T) -> io::Result<Bytes> {
    serde_json::to_vec(v).map(Bytes::from).map_err(io::Error::other)
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| invalid_data(format!("malformed {what}: {e}")))
}

impl Decoder for ExecutorCodec {
    type Item = Message;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Message>> {
        let Some(mut frame) = self.frames.decode(src)? else { return Ok(None) };
        if frame.is_empty() {
            return Err(invalid_data("empty frame".into()));
        }
        let kind = frame.split_to(1)[0];
        let body = frame.freeze();
        Ok(Some(match kind {
            kind::REQUEST => Message::Request(from_json("request", &body)?),
            kind::STDOUT => Message::Stdout(body),
            kind::STDERR => Message::Stderr(body),
            kind::EXIT => Message::Exit(from_json("exit", &body)?),
            kind::ERROR => Message::Error(from_json("error", &body)?),
            kind::PONG => Message::Pong(from_json("pong", &body)?),
            other => return Err(invalid_data(format!("unknown message kind {other}"))),
        }))
    }
}

impl Encoder<Message> for ExecutorCodec {
    type Error = io::Error;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> io::Result<()> {
        let (kind, body): (u8, Bytes) = match &msg {
            Message::Request(r) => (kind::REQUEST, json(r)?),
            Message::Stdout(b) => (kind::STDOUT, b.clone()),
            Message::Stderr(b) => (kind::STDERR, b.clone()),
            Message::Exit(e) => (kind::EXIT, json(e)?),
            Message::Error(e) => (kind::ERROR, json(e)?),
            Message::Pong(p) => (kind::PONG, json(p)?),
        };
        let mut frame = BytesMut::with_capacity(1 + body.len());
        frame.put_u8(kind);
        frame.extend_from_slice(&body);
        self.frames.encode(frame.freeze(), dst)
    }
}

#[cfg(test)]
mod tests {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_util::codec::Framed;

    use super::*;

    #[tokio::test]
    async fn messages_round_trip_through_frames() {
        let (a, b) = tokio::io::duplex(1024);
        let (mut a, mut b) = (Framed::new(a, ExecutorCodec::default()), Framed::new(b, ExecutorCodec::default()));
        let exit = WireExit {
            exit_code: 137,
            signal: 9,
            duration_us: 5,
            timed_out: true,
            oom_killed: false,
            output_truncated: false,
            message: "timed out".into(),
            spans: vec![MeasuredSpan {
                name: "executor.exec".into(),
                span_id: "00f067aa0ba902b7".into(),
                start_unix_nanos: 1,
                end_unix_nanos: 2,
                attributes: vec![("exit_code".into(), "137".into())],
            }],
        };
        let sent = vec![
            Message::Request(Request::Ping),
            Message::Stdout(Bytes::from_static(b"hello")),
            Message::Stderr(Bytes::new()),
            Message::Exit(exit),
            Message::Error(WireError { kind: "internal".into(), message: "x".into() }),
            Message::Pong(Pong { protocol: PROTOCOL_VERSION }),
        ];
        for m in sent.clone() {
            a.send(m).await.unwrap();
        }
        drop(a);
        let mut got = Vec::new();
        while let Some(m) = b.next().await {
            got.push(m.unwrap());
        }
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn bad_frames_are_refused() {
        use tokio::io::AsyncWriteExt as _;
        // An unknown kind.
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&[0, 0, 0, 2, 42, b'x']).await.unwrap();
        let e = Framed::new(b, ExecutorCodec::default()).next().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("unknown message kind 42"), "{e}");
        // A frame over the limit is refused before it is read.
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&(MAX_FRAME_BYTES as u32 + 1).to_be_bytes()).await.unwrap();
        assert!(Framed::new(b, ExecutorCodec::default()).next().await.unwrap().is_err());
        // Malformed JSON.
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&[0, 0, 0, 2, 4, b'{']).await.unwrap();
        let e = Framed::new(b, ExecutorCodec::default()).next().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("malformed exit"), "{e}");
    }

    #[test]
    fn exec_round_trips_through_json() {
        let spec = ExecSpec {
            command: Command::Code { language: Language::Node, code: "1".into() },
            env: BTreeMap::from([("A".to_string(), "b".to_string())]),
            stdin: vec![0, 1, 2, 255],
            workdir: "sub".into(),
            timeout: Duration::from_millis(1500),
            output_cap: 7,
        };
        let w = WireExec::new(&spec, &BTreeMap::new(), 1 << 28, 64);
        let mut codec = ExecutorCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(Message::Request(Request::Exec(w.clone())), &mut buf).unwrap();
        let Some(Message::Request(Request::Exec(back))) = codec.decode(&mut buf).unwrap() else {
            panic!("not an exec request")
        };
        assert_eq!(back, w);
        let s = back.spec().unwrap();
        assert_eq!(s.stdin, spec.stdin);
        assert_eq!(s.timeout, spec.timeout);
        assert!(matches!(s.command, Command::Code { language: Language::Node, .. }));
        let e: RuntimeError = WireError::from(&RuntimeError::InvalidArgument("x".into())).into();
        assert!(matches!(e, RuntimeError::InvalidArgument(m) if m == "x"));
    }
}
