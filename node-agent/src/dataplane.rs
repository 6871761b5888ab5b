//! The data plane: ExecService and FileService, served by the agent that runs
//! the session. Every call carries a session token signed by the cluster;
//! the agent verifies it with the cluster's public key, checks it names this
//! node, and refuses tokens for older placements. Tokens carry the session's
//! tenant, which the agent checks against the tenant in the session's
//! assignment; a token for another tenant's session learns nothing (NOT_FOUND,
//! as for a session that is not here).
//!
//! At shutdown (the agent's token fires) running execs are killed and their
//! callers get UNAVAILABLE ([`SHUTDOWN_MESSAGE`]) within [`EXEC_STOP_GRACE`],
//! so the graceful stop of the gRPC server never waits for an exec's own
//! timeout.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sandfleet_common::token::{bearer_from_metadata, TokenError};
use sandfleet_common::{ids, limits, ValidationError};
use sandfleet_proto::v1::{self as pb, exec_service_server::ExecService, file_service_server::FileService};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use crate::control::{AgentState, LocalPhase};
use crate::runtime::{Command, ExecEvent, ExecSpec, Language};
use crate::workspace::{EntryKind, FsError, Workspace};

/// What the caller of an exec that the agent's shutdown stopped gets, with UNAVAILABLE.
pub const SHUTDOWN_MESSAGE: &str = "the node agent is shutting down; the command was stopped";
/// How long an exec stopped by the shutdown may take to die and drain its
/// output before its caller gets [`SHUTDOWN_MESSAGE`] regardless.
pub const EXEC_STOP_GRACE: Duration = Duration::from_secs(5);

/// Serves ExecService and FileService.
#[derive(Clone)]
pub struct DataPlane {
    state: Arc<AgentState>,
    output_cap: u64,
    shutdown: CancellationToken,
}

impl DataPlane {
    /// A data plane whose execs are stopped when `shutdown` fires.
    pub fn new(state: Arc<AgentState>, output_cap: u64, shutdown: CancellationToken) -> Self {
        Self { state, output_cap, shutdown }
    }

    /// Checks the token and that the session is ready here.
    ///
    /// A valid token for another session gets NOT_FOUND, with the text of a
    /// session that is not here, unless that session is of the token's own
    /// tenant: so a tenant cannot learn whether another tenant's session runs
    /// here. A token whose tenant is not the session's is PERMISSION_DENIED
    /// (the coordinators never sign one; this is defence in depth).
    async fn authorize(&self, md: &MetadataMap, session_id: &str) -> Result<(), Status> {
        ids::validate_session_id(session_id)?;
        let token = bearer_from_metadata(md)?;
        let claims = {
            let verifier = self.state.verifier.read().await;
            let verifier = verifier
                .as_ref()
                .ok_or_else(|| Status::unavailable("agent has not registered with the cluster yet"))?;
            verifier.verify_signed(token, sandfleet_common::time::now_ms())?
        };
        let not_here =
            || Status::not_found(format!("session {session_id} is not running on node {}", self.state.node_id));
        let local = self.state.session(session_id);
        if claims.sid != session_id {
            return match &local {
                Some(l) if l.tenant.is_empty() || l.tenant == claims.tenant() => {
                    Err(TokenError::WrongSession(session_id.to_string()).into())
                }
                _ => Err(not_here()),
            };
        }
        if claims.node != self.state.node_id {
            return Err(Status::unauthenticated(format!(
                "session token is for node {:?}, not {}; get the session again for a fresh token",
                claims.node, self.state.node_id
            )));
        }
        let local = local.ok_or_else(not_here)?;
        if !local.tenant.is_empty() && local.tenant != claims.tenant() {
            return Err(Status::permission_denied(format!(
                "session token is for tenant {:?}, not the session's",
                claims.tenant()
            )));
        }
        if claims.generation < local.generation {
            return Err(Status::unauthenticated("session token is for an older placement; get the session again"));
        }
        match local.phase {
            LocalPhase::Ready => {
                self.state.touch(session_id);
                Ok(())
            }
            LocalPhase::Preparing => Err(Status::unavailable(format!("session {session_id} is still starting; retry"))),
            LocalPhase::Failed(why) => {
                Err(Status::failed_precondition(format!("session {session_id} failed to start: {why}")))
            }
        }
    }
}

/// Turns the wire request into the runtime's [`ExecSpec`]: only its shape
/// (one command form, a known language). Its limits and rules are checked
/// once, by the runtime, with [`crate::exec::validate`].
fn exec_spec(req: pb::ExecRequest, output_cap: u64) -> Result<ExecSpec, Status> {
    let command = match req.command {
        Some(pb::exec_request::Command::Argv(a)) => Command::Argv(a.argv),
        Some(pb::exec_request::Command::Code(c)) => {
            let language = match pb::Language::try_from(c.language) {
                Ok(pb::Language::Python) => Language::Python,
                Ok(pb::Language::Node) => Language::Node,
                Ok(pb::Language::Bash) => Language::Bash,
                _ => return Err(Status::invalid_argument("invalid language: use python, node or bash")),
            };
            Command::Code { language, code: c.code }
        }
        None => return Err(Status::invalid_argument("invalid command: give argv or code")),
    };
    Ok(ExecSpec {
        command,
        env: req.env.into_iter().collect(),
        stdin: req.stdin,
        workdir: req.workdir,
        // Zero is the default, filled in by the validation.
        timeout: Duration::from_millis(req.timeout_ms),
        output_cap,
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ExecService for DataPlane {
    type ExecStream = BoxStream<pb::ExecResponse>;

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().session_id))]
    async fn exec(&self, req: Request<pb::ExecRequest>) -> Result<Response<Self::ExecStream>, Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("the node agent is shutting down; the command was not started"));
        }
        self.authorize(req.metadata(), &req.get_ref().session_id).await?;
        let req = req.into_inner();
        let session_id = req.session_id.clone();
        let spec = exec_spec(req, self.output_cap)?;
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<ExecEvent>(32);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::ExecResponse, Status>>(32);
        let runtime = self.state.runtime.clone();
        let state = self.state.clone();
        // In the handler's span, so the runtime's exec (and the executor's) join the caller's trace.
        let run = tokio::spawn(
            async move {
                let result = runtime.exec(&session_id, spec, out_tx).await;
                crate::metrics::record_exec(runtime.kind().as_str(), &result);
                // A long exec counts as activity until it ends.
                state.touch(&session_id);
                // Whatever the command wrote goes to the workspace store soon.
                state.trigger_sync(&session_id);
                result
            }
            .in_current_span(),
        );
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = out_rx.recv() => ev,
                    () = shutdown.cancelled() => {
                        // Dropping `out_rx` makes the runtime kill the command (as when the caller
                        // hangs up); its end is awaited, boundedly, so nothing of it outlives the agent.
                        drop(out_rx);
                        if tokio::time::timeout(EXEC_STOP_GRACE, run).await.is_err() {
                            tracing::warn!("the exec did not end within {EXEC_STOP_GRACE:?} of the shutdown");
                        }
                        tracing::info!("exec stopped by the agent's shutdown");
                        let _ = tx.send(Err(Status::unavailable(SHUTDOWN_MESSAGE))).await;
                        return;
                    }
                };
                let Some(ev) = ev else { break };
                let (stream, data) = match ev {
                    ExecEvent::Stdout(d) => (pb::OutputStream::Stdout, d),
                    ExecEvent::Stderr(d) => (pb::OutputStream::Stderr, d),
                };
                let msg = pb::ExecResponse {
                    event: Some(pb::exec_response::Event::Output(pb::OutputChunk {
                        stream: stream as i32,
                        data: data.to_vec(),
                    })),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    // The caller hung up: dropping `out_rx` makes the runtime kill the command.
                    return;
                }
            }
            let msg = match run.await {
                Ok(Ok(exit)) => {
                    tracing::info!(
                        exit_code = exit.exit_code,
                        timed_out = exit.timed_out,
                        oom = exit.oom_killed,
                        "exec finished"
                    );
                    Ok(pb::ExecResponse {
                        event: Some(pb::exec_response::Event::Exit(pb::ExitStatus {
                            exit_code: exit.exit_code,
                            signal: exit.signal,
                            duration_ms: exit.duration.as_millis() as u64,
                            timed_out: exit.timed_out,
                            oom_killed: exit.oom_killed,
                            output_truncated: exit.output_truncated,
                            message: exit.message,
                        })),
                    })
                }
                Ok(Err(e)) => Err(Status::from(e)),
                Err(e) => Err(Status::internal(format!("exec task failed: {e}"))),
            };
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Longest a SyncWorkspace or GetDownloadUrl call waits for its sync.
const SYNC_DEADLINE: Duration = Duration::from_secs(300);
/// Longest a presigned URL may work (the S3 limit for SigV4).
const MAX_PRESIGN_SECONDS: u64 = 7 * 24 * 3600;

impl DataPlane {
    fn syncer(&self) -> Result<&Arc<crate::store::sync::Syncer>, Status> {
        self.state.syncer.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "node {} keeps no durable workspace copy; start its agent with --workspace-store local|s3",
                self.state.node_id
            ))
        })
    }
}

fn workspace(state: &AgentState, session_id: &str) -> Result<Workspace, Status> {
    state.runtime.workspace(session_id).map_err(Status::from)
}

#[tonic::async_trait]
impl FileService for DataPlane {
    #[tracing::instrument(skip_all)]
    async fn write_file(
        &self,
        req: Request<Streaming<pb::WriteFileRequest>>,
    ) -> Result<Response<pb::WriteFileResponse>, Status> {
        let md = req.metadata().clone();
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty upload: the first chunk must name session_id and path"))?;
        self.authorize(&md, &first.session_id).await?;
        check_chunk(&first)?;
        Workspace::check_path(&first.path)?;
        let ws = workspace(&self.state, &first.session_id)?;
        let mode = if first.mode == 0 { 0o644 } else { first.mode & 0o7777 };
        let head = futures::stream::once(futures::future::ready(Ok::<Bytes, FsError>(Bytes::from(first.data))));
        let rest = stream.map(|m| match m {
            Ok(chunk) => {
                if chunk.data.len() > limits::MAX_WRITE_CHUNK_BYTES {
                    return Err(FsError::InvalidPath(format!(
                        "chunk exceeds the limit of {} bytes: got {}",
                        limits::MAX_WRITE_CHUNK_BYTES,
                        chunk.data.len()
                    )));
                }
                Ok(Bytes::from(chunk.data))
            }
            Err(status) => Err(FsError::Io(std::io::Error::other(format!("upload stream broke: {status}")))),
        });
        let (size, sha256) = ws.write_file(&first.path, mode, Box::pin(head.chain(rest))).await?;
        tracing::info!(path = %first.path, size, "file written");
        self.state.trigger_sync(&first.session_id);
        Ok(Response::new(pb::WriteFileResponse { size, sha256 }))
    }

    type ReadFileStream = BoxStream<pb::ReadFileResponse>;

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().session_id))]
    async fn read_file(&self, req: Request<pb::ReadFileRequest>) -> Result<Response<Self::ReadFileStream>, Status> {
        self.authorize(req.metadata(), &req.get_ref().session_id).await?;
        let req = req.into_inner();
        let ws = workspace(&self.state, &req.session_id)?;
        let file = ws.read_file(&req.path).await?;
        let mut file = file;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let mut buf = vec![0u8; limits::READ_CHUNK_BYTES];
                match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send(Ok(pb::ReadFileResponse { data: buf })).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("read failed: {e}")))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().session_id))]
    async fn list_files(&self, req: Request<pb::ListFilesRequest>) -> Result<Response<pb::ListFilesResponse>, Status> {
        self.authorize(req.metadata(), &req.get_ref().session_id).await?;
        let req = req.into_inner();
        let ws = workspace(&self.state, &req.session_id)?;
        let entries = ws
            .list(&req.path)
            .await?
            .into_iter()
            .map(|e| pb::FileEntry {
                name: e.name,
                kind: match e.kind {
                    EntryKind::File => pb::FileKind::File,
                    EntryKind::Directory => pb::FileKind::Directory,
                    EntryKind::Symlink => pb::FileKind::Symlink,
                    EntryKind::Other => pb::FileKind::Other,
                } as i32,
                size: e.size,
                mode: e.mode,
                modified_at_ms: e.modified_at_ms,
            })
            .collect();
        Ok(Response::new(pb::ListFilesResponse { entries }))
    }

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().session_id))]
    async fn remove_file(
        &self,
        req: Request<pb::RemoveFileRequest>,
    ) -> Result<Response<pb::RemoveFileResponse>, Status> {
        self.authorize(req.metadata(), &req.get_ref().session_id).await?;
        let req = req.into_inner();
        let ws = workspace(&self.state, &req.session_id)?;
        ws.remove(&req.path, req.recursive).await?;
        self.state.trigger_sync(&req.session_id);
        Ok(Response::new(pb::RemoveFileResponse {}))
    }

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().session_id))]
    async fn sync_workspace(
        &self,
        req: Request<pb::SyncWorkspaceRequest>,
    ) -> Result<Response<pb::SyncWorkspaceResponse>, Status> {
        self.authorize(req.metadata(), &req.get_ref().session_id).await?;
        let req = req.into_inner();
        let syncer = self.syncer()?;
        let stats = tokio::time::timeout(SYNC_DEADLINE, syncer.sync_now(&req.session_id)).await.map_err(|_| {
            Status::deadline_exceeded(format!(
                "the workspace sync did not finish within {SYNC_DEADLINE:?}; it goes on in the background"
            ))
        })??;
        tracing::info!(
            files = stats.files,
            uploaded = stats.transferred_files,
            version = stats.version,
            "workspace synced on request"
        );
        Ok(Response::new(pb::SyncWorkspaceResponse {
            files: stats.files,
            bytes: stats.bytes,
            uploaded_files: stats.transferred_files,
            uploaded_bytes: stats.transferred_bytes,
            manifest_version: stats.version,
            store: syncer.store().describe(),
        }))
    }

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().session_id))]
    async fn get_disk_usage(
        &self,
        req: Request<pb::GetDiskUsageRequest>,
    ) -> Result<Response<pb::GetDiskUsageResponse>, Status> {
        self.authorize(req.metadata(), &req.get_ref().session_id).await?;
        let u = self.state.runtime.disk_usage(&req.get_ref().session_id)?;
        Ok(Response::new(pb::GetDiskUsageResponse {
            used_bytes: u.used_bytes,
            limit_bytes: u.limit_bytes,
            used_inodes: u.used_inodes,
            limit_inodes: u.limit_inodes,
        }))
    }

    #[tracing::instrument(skip_all, fields(session = %req.get_ref().session_id))]
    async fn get_download_url(
        &self,
        req: Request<pb::GetDownloadUrlRequest>,
    ) -> Result<Response<pb::GetDownloadUrlResponse>, Status> {
        self.authorize(req.metadata(), &req.get_ref().session_id).await?;
        let req = req.into_inner();
        let rel = Workspace::check_path(&req.path)?;
        if rel.as_os_str().is_empty() {
            return Err(Status::invalid_argument("path is empty; name a file inside the workspace"));
        }
        let ttl = match req.expires_in_seconds {
            0 => Duration::from_secs(15 * 60),
            s if u64::from(s) > MAX_PRESIGN_SECONDS => {
                return Err(ValidationError::over("expires_in_seconds", MAX_PRESIGN_SECONDS, s).into());
            }
            s => Duration::from_secs(u64::from(s)),
        };
        let syncer = self.syncer()?;
        // Refuse links and directories before any work; the sync then pins the content.
        let ws = workspace(&self.state, &req.session_id)?;
        drop(ws.read_file(&req.path).await?);
        let path = rel.to_string_lossy().into_owned();
        let (hash, size) =
            tokio::time::timeout(SYNC_DEADLINE, syncer.blob_of(&req.session_id, &path)).await.map_err(|_| {
                Status::deadline_exceeded(format!("the workspace sync did not finish within {SYNC_DEADLINE:?}"))
            })??;
        let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let url = syncer.store().presign_blob(&req.session_id, &hash, &name, ttl).await?;
        Ok(Response::new(pb::GetDownloadUrlResponse {
            url,
            expires_at_ms: sandfleet_common::time::now_ms() + ttl.as_millis() as i64,
            size,
            sha256: hash,
        }))
    }
}

fn check_chunk(c: &pb::WriteFileRequest) -> Result<(), Status> {
    if c.data.len() > limits::MAX_WRITE_CHUNK_BYTES {
        return Err(
            ValidationError::over("chunk", format!("{} bytes", limits::MAX_WRITE_CHUNK_BYTES), c.data.len()).into()
        );
    }
    Ok(())
}
