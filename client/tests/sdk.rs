//! SDK behaviour against an in-process fake coordinator and node agent:
//! failover and retries, idempotent creates, deadlines, wait_running, the
//! data-plane token refresh, exec streams, and chunked file transfer.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use sandfleet::proto::exec_service_server::{ExecService, ExecServiceServer};
use sandfleet::proto::file_service_server::{FileService, FileServiceServer};
use sandfleet::proto::session_service_server::{SessionService, SessionServiceServer};
use sandfleet::{proto, Backoff, Client, CreateBatch, CreateSession, Error, ExecRequest};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status, Streaming};

const SID: &str = "0190c8f2-0000-7000-8000-000000000001";

#[derive(Default)]
struct State {
    /// Request ids of every CreateSession received.
    create_ids: Vec<String>,
    /// grpc-timeout header of every CreateSession received.
    create_deadlines: Vec<Option<String>>,
    /// Answer this many creates with UNAVAILABLE first.
    fail_creates: usize,
    get_calls: usize,
    /// What GetSession answers (NOT_FOUND when None).
    session: Option<proto::Session>,
    /// What WatchSession sends; it then stays open when `watch_hangs`.
    watch_events: Vec<proto::Session>,
    watch_hangs: bool,
    /// The bearer token exec and files accept.
    good_token: String,
    /// Every authorization header exec saw.
    exec_auth: Vec<String>,
    /// Send no exit status.
    exec_no_exit: bool,
    /// Uploads that ended cleanly: (path, mode, chunk sizes, data).
    commits: Vec<(String, u32, Vec<usize>, Vec<u8>)>,
    /// Uploads that broke off.
    aborted_uploads: usize,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<State>>);

impl Fake {
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.0.lock().expect("fake state"))
    }

    fn check_token<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let auth = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let good = self.with(|s| format!("Bearer {}", s.good_token));
        if auth == good {
            Ok(())
        } else {
            Err(Status::unauthenticated("session token expired"))
        }
    }
}

fn session(state: proto::SessionState, token: &str, node_address: &str) -> proto::Session {
    proto::Session {
        id: SID.into(),
        state: state as i32,
        token: token.into(),
        node_address: node_address.into(),
        node_id: if node_address.is_empty() { String::new() } else { "n1".into() },
        ..Default::default()
    }
}

#[tonic::async_trait]
impl SessionService for Fake {
    async fn create_session(
        &self,
        req: Request<proto::CreateSessionRequest>,
    ) -> Result<Response<proto::CreateSessionResponse>, Status> {
        let deadline = req.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).map(String::from);
        let fail = self.with(|s| {
            s.create_ids.push(req.get_ref().request_id.clone());
            s.create_deadlines.push(deadline);
            if s.fail_creates > 0 {
                s.fail_creates -= 1;
                true
            } else {
                false
            }
        });
        if fail {
            return Err(Status::unavailable("no leader yet"));
        }
        let existing = self.with(|s| s.create_ids.len() > 1);
        Ok(Response::new(proto::CreateSessionResponse {
            session: Some(session(proto::SessionState::Pending, "t0", "")),
            existing,
            claimed: false,
        }))
    }

    async fn create_sessions(
        &self,
        req: Request<proto::CreateSessionsRequest>,
    ) -> Result<Response<proto::CreateSessionsResponse>, Status> {
        let fail = self.with(|s| {
            s.create_ids.push(req.get_ref().request_id.clone());
            if s.fail_creates > 0 {
                s.fail_creates -= 1;
                true
            } else {
                false
            }
        });
        if fail {
            return Err(Status::unavailable("no leader yet"));
        }
        let r = req.into_inner();
        let batch = proto::Batch { id: "b1".into(), request_id: r.request_id, desired: r.count, ..Default::default() };
        Ok(Response::new(proto::CreateSessionsResponse { batch: Some(batch), existing: false }))
    }

    async fn get_batch(
        &self,
        _req: Request<proto::GetBatchRequest>,
    ) -> Result<Response<proto::GetBatchResponse>, Status> {
        Err(Status::unimplemented("get batch"))
    }

    async fn list_batches(
        &self,
        _req: Request<proto::ListBatchesRequest>,
    ) -> Result<Response<proto::ListBatchesResponse>, Status> {
        Err(Status::unimplemented("list batches"))
    }

    async fn delete_batch(
        &self,
        _req: Request<proto::DeleteBatchRequest>,
    ) -> Result<Response<proto::DeleteBatchResponse>, Status> {
        Err(Status::unimplemented("delete batch"))
    }

    async fn get_session(
        &self,
        req: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::GetSessionResponse>, Status> {
        let s = self.with(|s| {
            s.get_calls += 1;
            s.session.clone()
        });
        match s {
            Some(s) => Ok(Response::new(proto::GetSessionResponse { session: Some(s) })),
            None => Err(Status::not_found(format!("session {} not found", req.get_ref().id))),
        }
    }

    async fn list_sessions(
        &self,
        _req: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        Err(Status::unimplemented("list"))
    }

    async fn delete_session(
        &self,
        _req: Request<proto::DeleteSessionRequest>,
    ) -> Result<Response<proto::DeleteSessionResponse>, Status> {
        Ok(Response::new(proto::DeleteSessionResponse {
            session: Some(session(proto::SessionState::Terminated, "", "")),
        }))
    }

    async fn renew_session(
        &self,
        _req: Request<proto::RenewSessionRequest>,
    ) -> Result<Response<proto::RenewSessionResponse>, Status> {
        Err(Status::unimplemented("renew"))
    }

    type WatchSessionStream = BoxStream<'static, Result<proto::SessionEvent, Status>>;

    async fn watch_session(
        &self,
        _req: Request<proto::WatchSessionRequest>,
    ) -> Result<Response<Self::WatchSessionStream>, Status> {
        let (events, hang) = self.with(|s| (s.watch_events.clone(), s.watch_hangs));
        let events = stream::iter(events.into_iter().map(|s| Ok(proto::SessionEvent { session: Some(s) })));
        let stream = if hang { events.chain(stream::pending()).boxed() } else { events.boxed() };
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
impl ExecService for Fake {
    type ExecStream = BoxStream<'static, Result<proto::ExecResponse, Status>>;

    async fn exec(&self, req: Request<proto::ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        let auth = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        self.with(|s| s.exec_auth.push(auth));
        self.check_token(&req)?;
        use proto::exec_response::Event;
        let out = |stream: proto::OutputStream, data: &[u8]| {
            Ok(proto::ExecResponse {
                event: Some(Event::Output(proto::OutputChunk { stream: stream as i32, data: data.to_vec() })),
            })
        };
        let mut msgs = vec![
            out(proto::OutputStream::Stdout, b"hi "),
            out(proto::OutputStream::Stderr, b"err"),
            out(proto::OutputStream::Stdout, b"there\n"),
        ];
        if !self.with(|s| s.exec_no_exit) {
            msgs.push(Ok(proto::ExecResponse {
                event: Some(Event::Exit(proto::ExitStatus { exit_code: 3, duration_ms: 5, ..Default::default() })),
            }));
        }
        Ok(Response::new(stream::iter(msgs).boxed()))
    }
}

#[tonic::async_trait]
impl FileService for Fake {
    async fn write_file(
        &self,
        req: Request<Streaming<proto::WriteFileRequest>>,
    ) -> Result<Response<proto::WriteFileResponse>, Status> {
        self.check_token(&req)?;
        let mut stream = req.into_inner();
        let mut header: Option<(String, u32)> = None;
        let mut sizes = Vec::new();
        let mut data = Vec::new();
        loop {
            match stream.message().await {
                Ok(Some(chunk)) => {
                    if header.is_none() {
                        header = Some((chunk.path.clone(), chunk.mode));
                    }
                    sizes.push(chunk.data.len());
                    data.extend_from_slice(&chunk.data);
                }
                Ok(None) => break,
                Err(e) => {
                    self.with(|s| s.aborted_uploads += 1);
                    return Err(e);
                }
            }
        }
        let (path, mode) = header.ok_or_else(|| Status::invalid_argument("empty upload"))?;
        let size = data.len() as u64;
        self.with(|s| s.commits.push((path, mode, sizes, data)));
        Ok(Response::new(proto::WriteFileResponse { size, sha256: "fake".into() }))
    }

    type ReadFileStream = BoxStream<'static, Result<proto::ReadFileResponse, Status>>;

    async fn read_file(&self, req: Request<proto::ReadFileRequest>) -> Result<Response<Self::ReadFileStream>, Status> {
        self.check_token(&req)?;
        let path = req.get_ref().path.clone();
        let data = self
            .with(|s| s.commits.iter().rev().find(|c| c.0 == path).map(|c| c.3.clone()))
            .ok_or_else(|| Status::not_found(format!("{path}: no such file")))?;
        let chunks: Vec<_> = data.chunks(64 * 1024).map(|c| Ok(proto::ReadFileResponse { data: c.to_vec() })).collect();
        Ok(Response::new(stream::iter(chunks).boxed()))
    }

    async fn list_files(
        &self,
        req: Request<proto::ListFilesRequest>,
    ) -> Result<Response<proto::ListFilesResponse>, Status> {
        self.check_token(&req)?;
        let entries = self.with(|s| {
            s.commits
                .iter()
                .map(|c| proto::FileEntry { name: c.0.clone(), size: c.3.len() as u64, ..Default::default() })
                .collect()
        });
        Ok(Response::new(proto::ListFilesResponse { entries }))
    }

    async fn remove_file(
        &self,
        req: Request<proto::RemoveFileRequest>,
    ) -> Result<Response<proto::RemoveFileResponse>, Status> {
        self.check_token(&req)?;
        let path = req.get_ref().path.clone();
        self.with(|s| s.commits.retain(|c| c.0 != path));
        Ok(Response::new(proto::RemoveFileResponse {}))
    }

    async fn sync_workspace(
        &self,
        req: Request<proto::SyncWorkspaceRequest>,
    ) -> Result<Response<proto::SyncWorkspaceResponse>, Status> {
        self.check_token(&req)?;
        let files = self.with(|s| s.commits.len() as u64);
        Ok(Response::new(proto::SyncWorkspaceResponse { files, store: "fake".into(), ..Default::default() }))
    }

    async fn get_download_url(
        &self,
        req: Request<proto::GetDownloadUrlRequest>,
    ) -> Result<Response<proto::GetDownloadUrlResponse>, Status> {
        self.check_token(&req)?;
        let r = req.into_inner();
        Ok(Response::new(proto::GetDownloadUrlResponse {
            url: format!("http://store.invalid/{}?expires={}", r.path, r.expires_in_seconds),
            ..Default::default()
        }))
    }

    async fn get_disk_usage(
        &self,
        req: Request<proto::GetDiskUsageRequest>,
    ) -> Result<Response<proto::GetDiskUsageResponse>, Status> {
        self.check_token(&req)?;
        Err(Status::failed_precondition("this fake node runs without disk quotas"))
    }
}

async fn start(fake: Fake) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SessionServiceServer::new(fake.clone()))
            .add_service(ExecServiceServer::new(fake.clone()))
            .add_service(FileServiceServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

/// An address nothing listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

async fn client(endpoints: Vec<String>) -> Client {
    Client::builder(endpoints)
        .backoff(Backoff::new(Duration::from_millis(5), Duration::from_millis(20)))
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("client")
}

#[tokio::test]
async fn create_fails_over_and_retries_with_the_same_request_id() {
    let fake = Fake::default();
    fake.with(|s| s.fail_creates = 2);
    let live = start(fake.clone()).await;
    let dead = dead_addr().await;
    let c = client(vec![dead.to_string(), format!("http://{live}")]).await;

    let req = CreateSession::new().request_id("req-42").memory_bytes(64 << 20);
    let resp = c.create_session_full(req).await.expect("create succeeds after retries");
    assert_eq!(resp.session.map(|s| s.id).as_deref(), Some(SID));
    assert!(resp.existing, "the fake marks creates after the first as existing");

    let (ids, deadlines) = fake.with(|s| (s.create_ids.clone(), s.create_deadlines.clone()));
    assert_eq!(ids, ["req-42", "req-42", "req-42"]);
    assert!(deadlines.iter().all(|d| d.is_some()), "every attempt carries grpc-timeout: {deadlines:?}");
}

#[tokio::test]
async fn a_batch_create_is_retried_with_the_same_request_id() {
    let fake = Fake::default();
    fake.with(|s| s.fail_creates = 2);
    let live = start(fake.clone()).await;
    let c = client(vec![format!("http://{live}")]).await;
    let req = CreateBatch::new(3, CreateSession::new()).request_id("batch-7").patch(2, [("K", "v")], [("shard", "2")]);
    let batch = c.create_batch(req).await.expect("create succeeds after retries").batch.expect("a batch");
    assert_eq!((batch.request_id.as_str(), batch.desired), ("batch-7", 3));
    assert_eq!(fake.with(|s| s.create_ids.clone()), ["batch-7", "batch-7", "batch-7"]);
}

#[tokio::test]
async fn other_codes_are_returned_at_once() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    let c = client(vec![live.to_string()]).await;
    let err = c.get_session(SID).await.expect_err("not found");
    assert!(err.is_not_found());
    assert_eq!(err.to_string(), format!("NOT_FOUND: session {SID} not found"));
    assert_eq!(fake.with(|s| s.get_calls), 1);
}

#[tokio::test]
async fn unreachable_cluster_is_a_connect_error() {
    let a = dead_addr().await;
    let b = dead_addr().await;
    let c = Client::builder([a.to_string(), b.to_string()])
        .max_retries(2)
        .backoff(Backoff::new(Duration::from_millis(1), Duration::from_millis(2)))
        .connect()
        .await
        .expect("client");
    let err = c.list_nodes().await.expect_err("nobody listens");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert_eq!(err.code(), Some(tonic::Code::Unavailable));
    assert!(err.to_string().starts_with("cannot connect to http://127.0.0.1:"), "{err}");
}

#[tokio::test]
async fn wait_running_watches_then_fetches_the_token() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    let mut pending = session(proto::SessionState::Pending, "", "");
    pending.pending_reason = "no ready node".into();
    fake.with(|s| {
        s.watch_events = vec![pending, session(proto::SessionState::Running, "", &live.to_string())];
        s.session = Some(session(proto::SessionState::Running, "tok", &live.to_string()));
    });
    let c = client(vec![live.to_string()]).await;
    let s = c.wait_running(SID, Duration::from_secs(5)).await.expect("running");
    assert_eq!(s.token, "tok");
    assert_eq!(fake.with(|s| s.get_calls), 1);
}

#[tokio::test]
async fn wait_running_reports_a_failed_session() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    let mut failed = session(proto::SessionState::Failed, "", "");
    failed.message = "template not found".into();
    fake.with(|s| s.watch_events = vec![session(proto::SessionState::Pending, "", ""), failed]);
    let c = client(vec![live.to_string()]).await;
    let err = c.wait_running(SID, Duration::from_secs(5)).await.expect_err("failed");
    assert!(matches!(&err, Error::SessionFailed { state: proto::SessionState::Failed, .. }), "{err:?}");
    assert_eq!(err.to_string(), format!("session {SID} ended in state FAILED: template not found"));
}

#[tokio::test]
async fn wait_running_timeout_names_the_pending_reason() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    let mut pending = session(proto::SessionState::Pending, "", "");
    pending.pending_reason = "no ready node has 2 free CPU".into();
    fake.with(|s| {
        s.watch_events = vec![pending];
        s.watch_hangs = true;
    });
    let c = client(vec![live.to_string()]).await;
    let err = c.wait_running(SID, Duration::from_millis(300)).await.expect_err("times out");
    assert!(matches!(err, Error::Timeout(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("PENDING") && msg.contains("no ready node has 2 free CPU"), "{msg}");
}

#[tokio::test]
async fn exec_refreshes_an_expired_token_once() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    fake.with(|s| {
        s.good_token = "fresh".into();
        s.session = Some(session(proto::SessionState::Running, "fresh", &live.to_string()));
    });
    let c = client(vec![live.to_string()]).await;
    let stale = session(proto::SessionState::Running, "stale", &live.to_string());
    let out = c.exec_collect(&stale, ExecRequest::argv(["echo", "hi"])).await.expect("exec");
    assert_eq!(out.stdout, b"hi there\n");
    assert_eq!(out.stderr, b"err");
    assert_eq!(out.exit.exit_code, 3);
    assert_eq!(fake.with(|s| s.exec_auth.clone()), ["Bearer stale", "Bearer fresh"]);

    // A token that stays bad is reported, after one refresh only.
    fake.with(|s| {
        s.good_token = "other".into();
        s.exec_auth.clear();
    });
    let err = c.exec_collect(&stale, ExecRequest::argv(["true"])).await.expect_err("unauthenticated");
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated));
    assert_eq!(fake.with(|s| s.exec_auth.len()), 2);
}

#[tokio::test]
async fn exec_stream_without_exit_is_a_protocol_error() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    fake.with(|s| {
        s.good_token = "t".into();
        s.exec_no_exit = true;
    });
    let c = client(vec![live.to_string()]).await;
    let s = session(proto::SessionState::Running, "t", &live.to_string());
    let err = c.exec_collect(&s, ExecRequest::code(sandfleet::Language::Python, "1")).await.expect_err("no exit");
    assert!(matches!(err, Error::Protocol(_)), "{err:?}");
}

#[tokio::test]
async fn exec_on_a_session_from_a_list_fetches_it_first() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    fake.with(|s| {
        s.good_token = "t".into();
        s.session = Some(session(proto::SessionState::Running, "t", &live.to_string()));
    });
    let c = client(vec![live.to_string()]).await;
    let listed = session(proto::SessionState::Running, "", "");
    let out = c.exec_collect(&listed, ExecRequest::argv(["true"])).await.expect("exec");
    assert_eq!(out.exit.exit_code, 3);
    assert_eq!(fake.with(|s| s.get_calls), 1);

    // A pending session is refused with its reason, without calling an agent.
    let mut pending = session(proto::SessionState::Pending, "", "");
    pending.pending_reason = "waiting for a node".into();
    fake.with(|s| s.session = Some(pending.clone()));
    let err = c.exec_collect(&pending, ExecRequest::argv(["true"])).await.expect_err("pending");
    assert_eq!(err.code(), Some(tonic::Code::FailedPrecondition));
    assert!(err.to_string().contains("waiting for a node"), "{err}");
}

#[tokio::test]
async fn files_round_trip_in_chunks() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    fake.with(|s| s.good_token = "t".into());
    let c = client(vec![live.to_string()]).await;
    let s = session(proto::SessionState::Running, "t", &live.to_string());
    const MIB: usize = 1024 * 1024;

    let data: Vec<u8> = (0..(2 * MIB + MIB / 2)).map(|i| (i % 251) as u8).collect();
    let resp = c.write_file_bytes(&s, "a/bytes.bin", data.clone()).await.expect("write bytes");
    assert_eq!(resp.size, data.len() as u64);

    let resp = c.write_file(&s, "a/stream.bin", std::io::Cursor::new(data.clone()), 0o600).await.expect("write stream");
    assert_eq!(resp.size, data.len() as u64);

    let small = c.write_file(&s, "small.txt", &b"hello"[..], 0).await.expect("write small");
    assert_eq!(small.size, 5);
    let empty = c.write_file_bytes(&s, "empty", Vec::new()).await.expect("write empty");
    assert_eq!(empty.size, 0);

    let commits = fake.with(|s| s.commits.clone());
    assert_eq!(commits[0].0, "a/bytes.bin");
    assert_eq!(commits[0].2, [MIB, MIB, MIB / 2]);
    assert_eq!(commits[1].1, 0o600);
    assert_eq!(commits[1].2, [MIB, MIB, MIB / 2]);
    assert_eq!(commits[1].3, data);
    assert_eq!(commits[3].2, [0], "an empty file is one header chunk");

    let back = c.read_file_bytes(&s, "a/stream.bin").await.expect("read");
    assert_eq!(back, data);
    let pieces: Vec<_> = c.read_file(&s, "small.txt").await.expect("read").collect().await;
    assert_eq!(pieces.len(), 1);

    let names: Vec<String> = c.list_files(&s, "").await.expect("list").into_iter().map(|e| e.name).collect();
    assert_eq!(names.len(), 4);
    c.remove_file(&s, "small.txt", false).await.expect("remove");
    let err = c.read_file_bytes(&s, "small.txt").await.expect_err("gone");
    assert!(err.is_not_found());
    assert!(matches!(c.write_file_bytes(&s, "", vec![]).await, Err(Error::InvalidArgument(_))));
    // Workspace sync and presigned URLs go to the session's agent with its token.
    assert_eq!(c.sync_workspace(&s).await.expect("sync").files, 3);
    let url = c.download_url(&s, "big.bin", Duration::from_secs(90)).await.expect("url");
    assert_eq!(url.url, "http://store.invalid/big.bin?expires=90");
    assert!(matches!(c.download_url(&s, "", Duration::ZERO).await, Err(Error::InvalidArgument(_))));
}

/// Yields `ok_bytes` bytes, then fails.
struct FailingReader {
    ok_bytes: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.ok_bytes == 0 {
            return Poll::Ready(Err(std::io::Error::other("disk on fire")));
        }
        let n = self.ok_bytes.min(buf.remaining()).min(64 * 1024);
        buf.put_slice(&vec![b'x'; n]);
        self.ok_bytes -= n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_failing_upload_source_never_commits() {
    let fake = Fake::default();
    let live = start(fake.clone()).await;
    fake.with(|s| s.good_token = "t".into());
    let c = client(vec![live.to_string()]).await;
    let s = session(proto::SessionState::Running, "t", &live.to_string());

    // Fails within the first chunk: reported as an I/O error before anything is sent.
    let err = c.write_file(&s, "x", FailingReader { ok_bytes: 1000 }, 0).await.expect_err("fails");
    assert!(matches!(err, Error::Io(_)), "{err:?}");

    // Fails mid-stream: the call is cancelled.
    let err = c.write_file(&s, "y", FailingReader { ok_bytes: 1024 * 1024 + 4096 }, 0).await.expect_err("fails");
    assert!(err.to_string().contains("disk on fire"), "{err}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(fake.with(|s| s.commits.is_empty()), "nothing may be committed");
}
