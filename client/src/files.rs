//! File access to a session's workspace: upload, download, list, remove.
//!
//! Like exec, these go straight to the session's node agent with the session
//! token, and a rejected call is retried once after refreshing the session.
//! Uploads are sent in 1 MiB chunks; an upload whose source fails to read is
//! cancelled, so the agent never commits a partial file.

use parking_lot::Mutex;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use sandfleet_common::limits::{MAX_GRPC_MESSAGE_BYTES, MAX_WRITE_CHUNK_BYTES};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::proto::file_service_client::FileServiceClient;
use crate::{proto, Client, Error};

/// A download, from [`Client::read_file`]: the file's bytes in pieces of at most 64 KiB.
pub type FileStream = BoxStream<'static, Result<Vec<u8>, Error>>;

fn file_client(ch: Channel) -> FileServiceClient<Channel> {
    FileServiceClient::new(ch)
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
}

/// Bounds a call locally (the agent bounds it too, from `grpc-timeout`).
async fn bounded<T>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(timeout + Duration::from_millis(500), fut).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("{what}: no answer from the node agent in time"))),
    }
}

/// Reads until `buf` is full or the source ends; returns how much was read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]).await? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn check_path(path: &str) -> Result<(), Error> {
    if path.is_empty() {
        return Err(Error::InvalidArgument("the file path must not be empty".into()));
    }
    Ok(())
}

/// The upload messages for in-memory data: at least one (carrying the header), 1 MiB each.
fn chunk_requests(session_id: &str, path: &str, mode: u32, data: &[u8]) -> Vec<proto::WriteFileRequest> {
    let mut out = Vec::with_capacity(data.len() / MAX_WRITE_CHUNK_BYTES + 1);
    let mut chunks = data.chunks(MAX_WRITE_CHUNK_BYTES);
    let first = chunks.next().unwrap_or(&[]);
    out.push(proto::WriteFileRequest {
        session_id: session_id.to_string(),
        path: path.to_string(),
        mode,
        data: first.to_vec(),
    });
    out.extend(chunks.map(|c| proto::WriteFileRequest { data: c.to_vec(), ..Default::default() }));
    out
}

/// State of a streamed upload.
struct Upload<R> {
    /// The header chunk, not yet sent.
    first: Option<proto::WriteFileRequest>,
    /// Where the reader waits until the stream needs it (so an attempt that
    /// never read from it can be replayed).
    slot: Arc<Mutex<Option<R>>>,
    reader: Option<R>,
    /// Fires when the source fails; the caller then cancels the call.
    failed: Option<oneshot::Sender<std::io::Error>>,
}

fn upload_stream<R>(state: Upload<R>) -> impl futures::Stream<Item = proto::WriteFileRequest> + Send + 'static
where
    R: AsyncRead + Send + Unpin + 'static,
{
    stream::unfold(state, |mut st| async move {
        if let Some(first) = st.first.take() {
            return Some((first, st));
        }
        if st.reader.is_none() {
            st.reader = st.slot.lock().take();
        }
        let reader = st.reader.as_mut()?;
        let mut buf = vec![0u8; MAX_WRITE_CHUNK_BYTES];
        match read_full(reader, &mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((proto::WriteFileRequest { data: buf, ..Default::default() }, st))
            }
            Err(e) => {
                if let Some(tx) = st.failed.take() {
                    let _ = tx.send(e);
                }
                // Never end the stream cleanly: that would commit a partial file.
                futures::future::pending::<()>().await;
                None
            }
        }
    })
}

impl Client {
    /// Uploads `data` to `path` in the session's workspace (replacing it
    /// atomically), streaming 1 MiB chunks. `mode` 0 means 0o644.
    pub async fn write_file(
        &self,
        session: &proto::Session,
        path: &str,
        mut data: impl AsyncRead + Send + Unpin + 'static,
        mode: u32,
    ) -> Result<proto::WriteFileResponse, Error> {
        check_path(path)?;
        let span = tracing::debug_span!("write_file", session = %session.id, path);
        let mut first = vec![0u8; MAX_WRITE_CHUNK_BYTES];
        let n = read_full(&mut data, &mut first).await?;
        first.truncate(n);
        if n < MAX_WRITE_CHUNK_BYTES {
            // The whole file is in memory: a failed attempt can be replayed.
            return self.write_chunks(session, path, mode, first).instrument(span).await;
        }
        let first = Arc::new(first);
        let slot = Arc::new(Mutex::new(Some(data)));
        let session_id = session.id.clone();
        let path_owned = path.to_string();
        self.data_call(session, "write_file", move |t| {
            let reader = slot.lock().take();
            let (tx, rx) = oneshot::channel();
            let header = proto::WriteFileRequest {
                session_id: session_id.clone(),
                path: path_owned.clone(),
                mode,
                data: first.as_ref().clone(),
            };
            let slot = slot.clone();
            async move {
                let Some(reader) = reader else {
                    return Err(tonic::Status::aborted(
                        "the upload failed after its data was sent and cannot be replayed; upload again",
                    ));
                };
                // Put the reader back until the stream needs it.
                *slot.lock() = Some(reader);
                let body = upload_stream(Upload { first: Some(header), slot, reader: None, failed: Some(tx) });
                let req = t.request(body, None);
                let mut client = file_client(t.channel);
                let call = client.write_file(req);
                tokio::select! {
                    r = call => Ok(r?.into_inner()),
                    Ok(e) = rx => Err(tonic::Status::cancelled(format!("reading the upload failed: {e}"))),
                }
            }
        })
        .instrument(span)
        .await
    }

    /// Uploads in-memory bytes to `path` (mode 0o644).
    pub async fn write_file_bytes(
        &self,
        session: &proto::Session,
        path: &str,
        data: Vec<u8>,
    ) -> Result<proto::WriteFileResponse, Error> {
        check_path(path)?;
        let span = tracing::debug_span!("write_file", session = %session.id, path, size = data.len());
        self.write_chunks(session, path, 0, data).instrument(span).await
    }

    async fn write_chunks(
        &self,
        session: &proto::Session,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<proto::WriteFileResponse, Error> {
        let data = Arc::new(data);
        self.data_call(session, "write_file", |t| {
            let chunks = chunk_requests(&t.session_id, path, mode, &data);
            async move {
                let req = t.request(stream::iter(chunks), None);
                Ok(file_client(t.channel).write_file(req).await?.into_inner())
            }
        })
        .await
    }

    /// Downloads a file as a stream of pieces. Opening is retried (once, after
    /// refreshing the session) only before the first piece arrives.
    pub async fn read_file(&self, session: &proto::Session, path: &str) -> Result<FileStream, Error> {
        check_path(path)?;
        let timeout = self.request_timeout();
        let span = tracing::debug_span!("read_file", session = %session.id, path);
        let (first, rest) = self
            .data_call(session, "read_file", |t| {
                let msg = proto::ReadFileRequest { session_id: t.session_id.clone(), path: path.to_string() };
                async move {
                    bounded(timeout, "read_file", async move {
                        let req = t.request(msg, None);
                        let mut s = file_client(t.channel).read_file(req).await?.into_inner();
                        let first = s.message().await?;
                        Ok((first, s))
                    })
                    .await
                }
            })
            .instrument(span)
            .await?;
        let head = stream::iter(first.map(|r| Ok(r.data)));
        let tail = rest.map(|r| r.map(|m| m.data).map_err(Error::from));
        Ok(head.chain(tail).boxed())
    }

    /// Downloads a whole file into memory.
    pub async fn read_file_bytes(&self, session: &proto::Session, path: &str) -> Result<Vec<u8>, Error> {
        let mut s = self.read_file(session, path).await?;
        let mut out = Vec::new();
        while let Some(piece) = s.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(out)
    }

    /// Lists one directory of the workspace (`""` is the root), sorted by name.
    pub async fn list_files(&self, session: &proto::Session, path: &str) -> Result<Vec<proto::FileEntry>, Error> {
        let timeout = self.request_timeout();
        let resp = self
            .data_call(session, "list_files", |t| {
                let msg = proto::ListFilesRequest { session_id: t.session_id.clone(), path: path.to_string() };
                async move {
                    bounded(timeout, "list_files", async move {
                        let req = t.request(msg, Some(timeout));
                        Ok(file_client(t.channel).list_files(req).await?.into_inner())
                    })
                    .await
                }
            })
            .instrument(tracing::debug_span!("list_files", session = %session.id, path))
            .await?;
        Ok(resp.entries)
    }

    /// Removes a file, or a directory and everything under it with `recursive`.
    pub async fn remove_file(&self, session: &proto::Session, path: &str, recursive: bool) -> Result<(), Error> {
        check_path(path)?;
        let timeout = self.request_timeout();
        self.data_call(session, "remove_file", |t| {
            let msg = proto::RemoveFileRequest { session_id: t.session_id.clone(), path: path.to_string(), recursive };
            async move {
                bounded(timeout, "remove_file", async move {
                    let req = t.request(msg, Some(timeout));
                    Ok(file_client(t.channel).remove_file(req).await?.into_inner())
                })
                .await
            }
        })
        .instrument(tracing::debug_span!("remove_file", session = %session.id, path, recursive))
        .await?;
        Ok(())
    }

    /// How much of its disk and inode quota the session uses now, as the
    /// kernel counts it. `FailedPrecondition` when its node runs without disk quotas.
    pub async fn disk_usage(&self, session: &proto::Session) -> Result<proto::GetDiskUsageResponse, Error> {
        let timeout = self.request_timeout();
        self.data_call(session, "get_disk_usage", |t| {
            let msg = proto::GetDiskUsageRequest { session_id: t.session_id.clone() };
            async move {
                bounded(timeout, "get_disk_usage", async move {
                    let req = t.request(msg, Some(timeout));
                    Ok(file_client(t.channel).get_disk_usage(req).await?.into_inner())
                })
                .await
            }
        })
        .instrument(tracing::debug_span!("get_disk_usage", session = %session.id))
        .await
    }

    /// Copies the workspace's changes to the node's workspace store and
    /// returns when they are durable there (a barrier: what was written
    /// before the call survives the loss of the node). Syncs also happen on
    /// their own after execs and file changes, every sync interval, and when
    /// the session stops. `FailedPrecondition` when the node keeps no durable
    /// copy, `Unavailable` while the store cannot be reached (the agent keeps retrying).
    pub async fn sync_workspace(&self, session: &proto::Session) -> Result<proto::SyncWorkspaceResponse, Error> {
        // A sync of a large workspace can take a while: allow several request timeouts.
        let timeout = self.request_timeout() * 10;
        self.data_call(session, "sync_workspace", |t| {
            let msg = proto::SyncWorkspaceRequest { session_id: t.session_id.clone() };
            async move {
                bounded(timeout, "sync_workspace", async move {
                    let req = t.request(msg, Some(timeout));
                    Ok(file_client(t.channel).sync_workspace(req).await?.into_inner())
                })
                .await
            }
        })
        .instrument(tracing::debug_span!("sync_workspace", session = %session.id))
        .await
    }

    /// A presigned URL that downloads `path` straight from the workspace
    /// store (S3) for `expires_in` (zero: 15 minutes; at most 7 days).
    pub async fn download_url(
        &self,
        session: &proto::Session,
        path: &str,
        expires_in: std::time::Duration,
    ) -> Result<proto::GetDownloadUrlResponse, Error> {
        check_path(path)?;
        let timeout = self.request_timeout() * 10;
        let secs = u32::try_from(expires_in.as_secs()).unwrap_or(u32::MAX);
        self.data_call(session, "get_download_url", |t| {
            let msg = proto::GetDownloadUrlRequest {
                session_id: t.session_id.clone(),
                path: path.to_string(),
                expires_in_seconds: secs,
            };
            async move {
                bounded(timeout, "get_download_url", async move {
                    let req = t.request(msg, Some(timeout));
                    Ok(file_client(t.channel).get_download_url(req).await?.into_inner())
                })
                .await
            }
        })
        .instrument(tracing::debug_span!("get_download_url", session = %session.id, path))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking() {
        let empty = chunk_requests("s", "p", 0o600, &[]);
        assert_eq!(empty.len(), 1);
        assert_eq!((empty[0].session_id.as_str(), empty[0].path.as_str(), empty[0].mode), ("s", "p", 0o600));

        let data = vec![7u8; MAX_WRITE_CHUNK_BYTES * 2 + 10];
        let reqs = chunk_requests("s", "p", 0, &data);
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].path, "p");
        assert!(reqs[1].path.is_empty() && reqs[1].session_id.is_empty());
        assert_eq!(reqs.iter().map(|r| r.data.len()).sum::<usize>(), data.len());
        assert!(reqs.iter().all(|r| r.data.len() <= MAX_WRITE_CHUNK_BYTES));
    }

    #[tokio::test]
    async fn upload_stream_reads_in_chunks() {
        let data = vec![1u8; MAX_WRITE_CHUNK_BYTES + 5];
        let (tx, _rx) = oneshot::channel();
        let header = proto::WriteFileRequest { path: "p".into(), ..Default::default() };
        let st = Upload {
            first: Some(header),
            slot: Arc::new(Mutex::new(Some(std::io::Cursor::new(data)))),
            reader: None,
            failed: Some(tx),
        };
        let msgs: Vec<_> = upload_stream(st).collect().await;
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1].data.len(), MAX_WRITE_CHUNK_BYTES);
        assert_eq!(msgs[2].data.len(), 5);
    }
}
