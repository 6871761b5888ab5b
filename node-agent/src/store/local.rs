//! [`LocalStore`]: workspaces kept in a directory of the agent's host (or a
//! shared mount). Same layout as S3: `<root>/<session>/manifest.json` and
//! `<root>/<session>/blobs/<sha256>`. Every object is written to a temporary
//! name and renamed into place, so readers never see half an object.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};

use super::{validate_hash, validate_session, BlobBody, StoreError, WorkspaceStore, PART_BYTES};

/// A directory of workspaces.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Uses (and creates) `root`.
    pub fn new(root: PathBuf) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&root)?;
        Ok(Self { root: std::fs::canonicalize(&root)? })
    }

    fn session_dir(&self, session: &str) -> Result<PathBuf, StoreError> {
        validate_session(session)?;
        Ok(self.root.join(session))
    }

    fn blob_path(&self, session: &str, hash: &str) -> Result<PathBuf, StoreError> {
        validate_hash(hash)?;
        Ok(self.session_dir(session)?.join("blobs").join(hash))
    }
}

/// Writes `write`'s output to a temporary file beside `dest`, fsyncs it and renames it into place.
fn atomic_write(
    dest: &Path,
    write: impl FnOnce(&mut std::fs::File) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let dir = dest.parent().ok_or_else(|| StoreError::Corrupt(format!("{} has no parent", dest.display())))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        write(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?
}

#[async_trait::async_trait]
impl WorkspaceStore for LocalStore {
    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    async fn get_manifest(&self, session: &str) -> Result<Option<Bytes>, StoreError> {
        let p = self.session_dir(session)?.join("manifest.json");
        match tokio::fs::read(&p).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn put_manifest(&self, session: &str, body: Bytes) -> Result<(), StoreError> {
        let p = self.session_dir(session)?.join("manifest.json");
        blocking(move || atomic_write(&p, |f| Ok(f.write_all(&body)?))).await
    }

    async fn put_blob(&self, session: &str, hash: &str, body: BlobBody) -> Result<(), StoreError> {
        let dest = self.blob_path(session, hash)?;
        let want = hash.to_string();
        blocking(move || {
            atomic_write(&dest, |out| match body {
                BlobBody::Bytes(b) => Ok(out.write_all(&b)?),
                BlobBody::File { file, path, .. } => {
                    let mut hasher = Sha256::new();
                    let mut reader = &*file;
                    let mut buf = vec![0u8; PART_BYTES.min(1 << 20) as usize];
                    // Read from the start whatever the shared offset is.
                    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(0))?;
                    loop {
                        let n = reader.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        hasher.update(&buf[..n]);
                        out.write_all(&buf[..n])?;
                    }
                    if hex::encode(hasher.finalize()) != want {
                        return Err(StoreError::Changed(path));
                    }
                    Ok(())
                }
            })
        })
        .await
    }

    async fn get_blob(
        &self,
        session: &str,
        hash: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let p = self.blob_path(session, hash)?;
        let f = match tokio::fs::File::open(&p).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound(format!("blob {hash} of {session}")))
            }
            Err(e) => return Err(e.into()),
        };
        Ok(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).map(|r| r.map_err(StoreError::from)).boxed())
    }

    async fn delete_blobs(&self, session: &str, hashes: &[String]) -> Result<(), StoreError> {
        for h in hashes {
            match tokio::fs::remove_file(self.blob_path(session, h)?).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn delete_session(&self, session: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_dir_all(self.session_dir(session)?).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn presign_blob(
        &self,
        _session: &str,
        _hash: &str,
        _filename: &str,
        _ttl: Duration,
    ) -> Result<String, StoreError> {
        Err(StoreError::Unsupported(
            "the local workspace store cannot presign download URLs; read the file through ReadFile, or run the agent with --workspace-store s3".into(),
        ))
    }
}
