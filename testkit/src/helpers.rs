//! Small async helpers shared by the tests, the bench and the chaos runner.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use sandfleet::{proto, Client, CreateSession, ExecOutput, ExecRequest};

/// How long a new session may take to become RUNNING in tests.
pub const RUNNING_TIMEOUT: Duration = Duration::from_secs(60);

/// A request id unique to this call: `<prefix>-<uuid>`.
pub fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Creates a session and waits until it is RUNNING (with node address and token).
pub async fn create_running(client: &Client, spec: CreateSession) -> Result<proto::Session> {
    let created = client.create_session(spec).await.map_err(|e| anyhow!("CreateSession failed: {e}"))?;
    client
        .wait_running(&created.id, RUNNING_TIMEOUT)
        .await
        .map_err(|e| anyhow!("session {} did not become RUNNING within {RUNNING_TIMEOUT:?}: {e}", created.id))
}

/// A small default spec with a fresh request id: 256 MiB, half a core, 128 pids, 10 min TTL.
pub fn small_session(prefix: &str) -> CreateSession {
    CreateSession::new()
        .request_id(request_id(prefix))
        .memory_bytes(256 << 20)
        .cpu_millis(500)
        .pids_limit(128)
        .ttl(Duration::from_secs(600))
}

/// Runs an argv in a session and collects its output.
pub async fn exec_argv<I, S>(
    client: &Client,
    session: &proto::Session,
    argv: I,
    timeout: Duration,
) -> Result<ExecOutput>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let argv: Vec<String> = argv.into_iter().map(Into::into).collect();
    client
        .exec_collect(session, ExecRequest::argv(argv.clone()).timeout(timeout))
        .await
        .map_err(|e| anyhow!("exec {argv:?} in {} failed: {e}", session.id))
}

/// Runs Python code (`python3 -c`) in a session and collects its output.
pub async fn exec_python(
    client: &Client,
    session: &proto::Session,
    code: &str,
    timeout: Duration,
) -> Result<ExecOutput> {
    client
        .exec_collect(session, ExecRequest::code(proto::Language::Python, code).timeout(timeout))
        .await
        .map_err(|e| anyhow!("python exec in {} failed: {e}", session.id))
}

/// stdout as text (lossy).
pub fn stdout(out: &ExecOutput) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text (lossy).
pub fn stderr(out: &ExecOutput) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A one-line description of an exec result, for assertion messages.
pub fn describe(out: &ExecOutput) -> String {
    format!("exit={:?} stdout={:?} stderr={:?}", out.exit, truncate(&stdout(out), 2000), truncate(&stderr(out), 2000))
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        let mut end = n;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...({} bytes)", &s[..end], s.len())
    }
}

/// Asserts that `result` failed with exactly `code`, and returns the error.
///
/// # Panics
/// When it succeeded or failed with another code.
#[track_caller]
pub fn expect_code<T: Debug>(what: &str, result: Result<T, sandfleet::Error>, code: tonic::Code) -> sandfleet::Error {
    match result {
        Ok(v) => panic!("{what}: expected {code:?}, but the call succeeded with {v:?}"),
        Err(e) => {
            assert_eq!(e.code(), Some(code), "{what}: expected gRPC code {code:?}, got {:?}: {e}", e.code());
            e
        }
    }
}

/// Asserts that `result` failed with one of `codes`, and returns the error.
#[track_caller]
pub fn expect_one_of<T: Debug>(
    what: &str,
    result: Result<T, sandfleet::Error>,
    codes: &[tonic::Code],
) -> sandfleet::Error {
    match result {
        Ok(v) => panic!("{what}: expected one of {codes:?}, but the call succeeded with {v:?}"),
        Err(e) => {
            assert!(
                e.code().is_some_and(|c| codes.contains(&c)),
                "{what}: expected one of {codes:?}, got {:?}: {e}",
                e.code()
            );
            e
        }
    }
}

/// Calls `f` every 200 ms until it returns `Ok`, or fails with its last error after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                bail!("{what}: still failing after {timeout:?}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Every session matching `selector` (all pages).
pub async fn list_all_sessions(
    client: &Client,
    selector: &[(&str, &str)],
    states: &[proto::SessionState],
) -> Result<Vec<proto::Session>> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let req = proto::ListSessionsRequest {
            label_selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            states: states.iter().map(|s| *s as i32).collect(),
            page_size: 1000,
            page_token: page_token.clone(),
            ..Default::default()
        };
        let resp = client.list_sessions(req).await.map_err(|e| anyhow!("ListSessions failed: {e}"))?;
        all.extend(resp.sessions);
        if resp.next_page_token.is_empty() {
            return Ok(all);
        }
        page_token = resp.next_page_token;
    }
}

/// The state of a session as an enum (UNSPECIFIED for unknown numbers).
pub fn state_of(s: &proto::Session) -> proto::SessionState {
    proto::SessionState::try_from(s.state).unwrap_or(proto::SessionState::Unspecified)
}

/// Nearest-rank percentile (`p` in 0..=100) of unsorted samples.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Data-plane calls made with the generated gRPC clients, bypassing the SDK.
///
/// The SDK heals some failures on its own (it fetches a fresh token and
/// retries once on `UNAUTHENTICATED`), which is right for users but hides
/// what the agent answered. Tests that assert the agent's own answer — a
/// forged token, a path it must refuse — use these. Each takes a channel to
/// the agent, from [`crate::Cluster::channel`] (TLS when the cluster runs it).
pub mod raw {
    use sandfleet::proto;
    use sandfleet::proto::exec_service_client::ExecServiceClient;
    use sandfleet::proto::file_service_client::FileServiceClient;
    use tonic::transport::Channel;
    use tonic::{Request, Status};

    /// `msg` with `authorization: Bearer <token>`, or no such header when `token` is `None`.
    fn authed<T>(msg: T, token: Option<&str>) -> Result<Request<T>, Status> {
        let mut req = Request::new(msg);
        if let Some(t) = token {
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| Status::invalid_argument("the token is not valid header text"))?;
            req.metadata_mut().insert("authorization", v);
        }
        req.set_timeout(std::time::Duration::from_secs(30));
        Ok(req)
    }

    /// Runs `argv`; returns every response, or the first error (at the call or in the stream).
    pub async fn exec(
        node: &Channel,
        session_id: &str,
        token: Option<&str>,
        argv: &[&str],
    ) -> Result<Vec<proto::ExecResponse>, Status> {
        let mut api = ExecServiceClient::new(node.clone());
        let msg = proto::ExecRequest {
            session_id: session_id.to_string(),
            command: Some(proto::exec_request::Command::Argv(proto::ArgvCommand {
                argv: argv.iter().map(|s| s.to_string()).collect(),
            })),
            timeout_ms: 20_000,
            ..Default::default()
        };
        let mut stream = api.exec(authed(msg, token)?).await?.into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.push(m);
        }
        Ok(out)
    }

    /// Reads a whole file.
    pub async fn read_file(
        node: &Channel,
        session_id: &str,
        token: Option<&str>,
        path: &str,
    ) -> Result<Vec<u8>, Status> {
        let mut api = FileServiceClient::new(node.clone());
        let msg = proto::ReadFileRequest { session_id: session_id.to_string(), path: path.to_string() };
        let mut stream = api.read_file(authed(msg, token)?).await?.into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.extend_from_slice(&m.data);
        }
        Ok(out)
    }

    /// Writes a file in one chunk (or as given: `chunks` are sent in order).
    pub async fn write_file(
        node: &Channel,
        session_id: &str,
        token: Option<&str>,
        path: &str,
        chunks: Vec<Vec<u8>>,
    ) -> Result<proto::WriteFileResponse, Status> {
        let mut api = FileServiceClient::new(node.clone());
        let mut msgs = Vec::new();
        for (i, data) in chunks.into_iter().enumerate() {
            msgs.push(if i == 0 {
                proto::WriteFileRequest { session_id: session_id.to_string(), path: path.to_string(), mode: 0, data }
            } else {
                proto::WriteFileRequest { data, ..Default::default() }
            });
        }
        if msgs.is_empty() {
            msgs.push(proto::WriteFileRequest {
                session_id: session_id.to_string(),
                path: path.to_string(),
                ..Default::default()
            });
        }
        Ok(api.write_file(authed(futures::stream::iter(msgs), token)?).await?.into_inner())
    }

    /// Lists a directory.
    pub async fn list_files(
        node: &Channel,
        session_id: &str,
        token: Option<&str>,
        path: &str,
    ) -> Result<Vec<proto::FileEntry>, Status> {
        let mut api = FileServiceClient::new(node.clone());
        let msg = proto::ListFilesRequest { session_id: session_id.to_string(), path: path.to_string() };
        Ok(api.list_files(authed(msg, token)?).await?.into_inner().entries)
    }

    /// Asserts that `result` is an error with one of `codes`, and returns it.
    #[track_caller]
    pub fn expect_one_of<T: std::fmt::Debug>(what: &str, result: Result<T, Status>, codes: &[tonic::Code]) -> Status {
        match result {
            Ok(v) => panic!("{what}: expected one of {codes:?}, but the call succeeded with {v:?}"),
            Err(s) => {
                assert!(
                    codes.contains(&s.code()),
                    "{what}: expected one of {codes:?}, got {:?}: {}",
                    s.code(),
                    s.message()
                );
                s
            }
        }
    }

    /// Asserts that `result` is an error with exactly `code`, and returns it.
    #[track_caller]
    pub fn expect_status<T: std::fmt::Debug>(what: &str, result: Result<T, Status>, code: tonic::Code) -> Status {
        match result {
            Ok(v) => panic!("{what}: expected {code:?}, but the call succeeded with {v:?}"),
            Err(s) => {
                assert_eq!(s.code(), code, "{what}: expected {code:?}, got {:?}: {}", s.code(), s.message());
                s
            }
        }
    }
}
