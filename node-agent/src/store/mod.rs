//! Durable session workspaces: the [`WorkspaceStore`] trait and its backends.
//!
//! A session's workspace outlives the node it runs on by being copied to a
//! store under `<prefix>/<session id>/`:
//!
//! - `blobs/<sha256>`: file contents, addressed by their hex SHA-256, so a file
//!   is uploaded once however often it is renamed or synced;
//! - `manifest.json`: the [`Manifest`], listing every file, directory and
//!   symlink with its size, mode, mtime and content hash, and the placement
//!   generation that wrote it.
//!
//! The manifest is written last, after every blob it names: a crash in the
//! middle of a sync leaves the previous manifest, which is whole, as the
//! current one. Blobs that no manifest names any more are deleted after the
//! manifest that dropped them is written.
//!
//! Backends: [`local::LocalStore`] (a directory, the embedded default) and
//! [`s3::S3Store`] (any S3-compatible service through aws-sdk-s3). The sync
//! engine that scans, uploads and restores workspaces is in [`sync`].

pub mod local;
pub mod s3;
pub mod sync;

use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

/// Files at most this large are read into memory and uploaded in one request;
/// larger ones go up in parts of this size (multipart upload on S3).
pub const PART_BYTES: u64 = 8 * 1024 * 1024;

/// The largest manifest a restore accepts.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;

/// What a store operation could not do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer or refused the request; retrying may help.
    #[error("workspace store unavailable: {0}")]
    Unavailable(String),
    /// No such object.
    #[error("{0} not found in the workspace store")]
    NotFound(String),
    /// A file changed while it was uploaded; the upload was abandoned.
    #[error("{0} changed while it was being uploaded")]
    Changed(String),
    /// Stored data failed a check (hash mismatch, bad manifest, bad key).
    #[error("corrupt workspace data: {0}")]
    Corrupt(String),
    /// The backend cannot do this (a local store cannot presign URLs).
    #[error("{0}")]
    Unsupported(String),
    /// A newer placement of the session owns the workspace now.
    #[error("workspace of session {session} belongs to generation {current} now (this copy is generation {ours})")]
    Superseded {
        /// The session id.
        session: String,
        /// The generation in the store.
        current: u64,
        /// The generation of this copy.
        ours: u64,
    },
    /// The workspace is over what one session may sync (its disk quota).
    #[error("{0}")]
    TooLarge(String),
    /// A local I/O error.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<StoreError> for tonic::Status {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        match e {
            StoreError::Unavailable(_) | StoreError::Changed(_) => tonic::Status::unavailable(msg),
            StoreError::NotFound(_) => tonic::Status::not_found(msg),
            StoreError::Unsupported(_) | StoreError::Superseded { .. } => tonic::Status::failed_precondition(msg),
            StoreError::TooLarge(_) => tonic::Status::resource_exhausted(msg),
            StoreError::Corrupt(_) | StoreError::Io(_) => tonic::Status::internal(msg),
        }
    }
}

/// The body of a blob upload.
pub enum BlobBody {
    /// Content already in memory (files up to [`PART_BYTES`]).
    Bytes(Bytes),
    /// A larger file, opened without following symlinks; the backend reads it
    /// in parts and fails with [`StoreError::Changed`] if what it read does not
    /// hash to the blob's name.
    File {
        /// The open file.
        file: std::sync::Arc<std::fs::File>,
        /// Its size when it was hashed.
        size: u64,
        /// The workspace path, for messages.
        path: String,
    },
}

/// Where session workspaces are kept. Every method names the session; a
/// backend keeps each session under its own prefix and never lets one
/// session's call reach another's objects.
#[async_trait::async_trait]
pub trait WorkspaceStore: Send + Sync + 'static {
    /// Where this store keeps workspaces, for logs ("s3://bucket/prefix").
    fn describe(&self) -> String;
    /// The session's current manifest, if it has one.
    async fn get_manifest(&self, session: &str) -> Result<Option<Bytes>, StoreError>;
    /// Replaces the session's manifest (atomically: readers see the old or the new one).
    async fn put_manifest(&self, session: &str, body: Bytes) -> Result<(), StoreError>;
    /// Stores blob `hash` (hex SHA-256 of the content).
    async fn put_blob(&self, session: &str, hash: &str, body: BlobBody) -> Result<(), StoreError>;
    /// Streams blob `hash`; the caller checks the hash.
    async fn get_blob(
        &self,
        session: &str,
        hash: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError>;
    /// Deletes blobs (missing ones are fine).
    async fn delete_blobs(&self, session: &str, hashes: &[String]) -> Result<(), StoreError>;
    /// Deletes everything under the session's prefix.
    async fn delete_session(&self, session: &str) -> Result<(), StoreError>;
    /// A URL that downloads blob `hash` without credentials until `ttl` passes,
    /// offered to the client as `filename`.
    async fn presign_blob(
        &self,
        session: &str,
        hash: &str,
        filename: &str,
        ttl: Duration,
    ) -> Result<String, StoreError>;
}

/// One workspace entry in a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ManifestEntry {
    /// A regular file.
    File {
        /// Path relative to the workspace root, '/'-separated.
        path: String,
        /// Size in bytes.
        size: u64,
        /// Permission bits.
        mode: u32,
        /// Modification time, nanoseconds since the Unix epoch.
        mtime_ns: i64,
        /// Hex SHA-256 of the content: the blob's name.
        sha256: String,
    },
    /// A directory (listed so empty ones survive).
    Dir {
        /// Path relative to the workspace root.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// A symbolic link, stored as its target text and never followed.
    Symlink {
        /// Path relative to the workspace root.
        path: String,
        /// The link's target, as written.
        target: String,
    },
}

impl ManifestEntry {
    /// The entry's workspace path.
    pub fn path(&self) -> &str {
        match self {
            ManifestEntry::File { path, .. }
            | ManifestEntry::Dir { path, .. }
            | ManifestEntry::Symlink { path, .. } => path,
        }
    }
}

/// The current state of one session's workspace in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub format: u32,
    /// The session.
    pub session_id: String,
    /// The placement generation whose agent wrote it; an older generation
    /// never overwrites a newer one's manifest.
    pub generation: u64,
    /// Written by the final sync of a copy that stopped on purpose (moved off a
    /// draining node, or stopped by its agent): nothing newer will come from it.
    pub sealed: bool,
    /// Counts the manifests this workspace has had.
    pub version: u64,
    /// When it was written (Unix ms).
    pub written_at_ms: i64,
    /// Every entry, sorted by path; parents before children.
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Parses and checks a stored manifest: every path must be a plain
    /// relative path and every hash 64 hex digits, so that a tampered or
    /// corrupt manifest can never make a restore write outside the workspace.
    pub fn parse(session: &str, body: &[u8]) -> Result<Manifest, StoreError> {
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(StoreError::Corrupt(format!(
                "manifest of {session} is {} bytes, over the {MAX_MANIFEST_BYTES} limit",
                body.len()
            )));
        }
        let m: Manifest = serde_json::from_slice(body)
            .map_err(|e| StoreError::Corrupt(format!("manifest of {session} does not parse: {e}")))?;
        if m.format != 1 {
            return Err(StoreError::Corrupt(format!("manifest of {session} has unknown format {}", m.format)));
        }
        if m.session_id != session {
            return Err(StoreError::Corrupt(format!("manifest under {session} names session {}", m.session_id)));
        }
        for e in &m.entries {
            validate_key_path(e.path())?;
            if let ManifestEntry::File { sha256, .. } = e {
                validate_hash(sha256)?;
            }
        }
        Ok(m)
    }

    /// The manifest as stored.
    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a manifest always serializes"))
    }
}

/// Checks a path read from the store: relative, '/'-separated, no empty,
/// `.` or `..` components, no NUL, within [`sandfleet_common::limits::MAX_PATH_BYTES`].
pub fn validate_key_path(path: &str) -> Result<(), StoreError> {
    let bad = |why: &str| {
        Err(StoreError::Corrupt(format!(
            "refusing stored path {:?}: {why}",
            path.chars().take(128).collect::<String>()
        )))
    };
    if path.is_empty() {
        return bad("empty");
    }
    if path.len() > sandfleet_common::limits::MAX_PATH_BYTES {
        return bad("too long");
    }
    if path.contains('\0') {
        return bad("contains a NUL byte");
    }
    if path.starts_with('/') {
        return bad("absolute");
    }
    for c in path.split('/') {
        match c {
            "" => return bad("empty component"),
            "." | ".." => return bad("contains a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a blob name: 64 lowercase hex digits.
pub fn validate_hash(hash: &str) -> Result<(), StoreError> {
    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!("bad blob name {:?}", hash.chars().take(80).collect::<String>())))
    }
}

/// Checks a session id before it becomes part of a key (UUID text only).
pub fn validate_session(session: &str) -> Result<(), StoreError> {
    sandfleet_common::ids::validate_session_id(session).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Normalises a key prefix: no leading or trailing '/', and no `.`/`..` parts.
pub fn normalize_prefix(prefix: &str) -> Result<String, String> {
    let p = prefix.trim_matches('/');
    if p.is_empty() {
        return Ok(String::new());
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("invalid prefix {prefix:?}: empty, '.' or '..' components are not allowed"));
    }
    Ok(p.to_string())
}

/// Which store the agent keeps workspaces in, as its flags say.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    /// No durable copy: a workspace lives and dies with its node (the
    /// agent's default when no store is configured).
    #[default]
    None,
    /// A directory (may be a shared mount).
    Local {
        /// The directory.
        root: std::path::PathBuf,
    },
    /// An S3-compatible service.
    S3(s3::S3Config),
}

/// Opens the configured store.
pub async fn open(config: &StoreConfig) -> Result<Option<std::sync::Arc<dyn WorkspaceStore>>, StoreError> {
    Ok(match config {
        StoreConfig::None => None,
        StoreConfig::Local { root } => Some(std::sync::Arc::new(local::LocalStore::new(root.clone())?)),
        StoreConfig::S3(c) => Some(std::sync::Arc::new(s3::S3Store::new(c.clone()).await?)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths() {
        for ok in ["a", "a/b.txt", ".hidden", "a/.b/c", "...x"] {
            validate_key_path(ok).unwrap();
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a/", "a\0b", "..", "."] {
            assert!(validate_key_path(bad).is_err(), "{bad:?} must be refused");
        }
        validate_hash(&"ab".repeat(32)).unwrap();
        assert!(validate_hash(&"AB".repeat(32)).is_err());
        assert!(validate_hash("../x").is_err());
        assert_eq!(normalize_prefix("/ws/prod/").unwrap(), "ws/prod");
        assert_eq!(normalize_prefix("").unwrap(), "");
        assert!(normalize_prefix("a/../b").is_err());
    }

    #[test]
    fn manifest_parse_refuses_traversal() {
        let sid = "0190b8f2-1c3d-7e4f-8a9b-0c1d2e3f4a5b";
        let mut m = Manifest {
            format: 1,
            session_id: sid.into(),
            generation: 1,
            sealed: false,
            version: 1,
            written_at_ms: 0,
            entries: vec![ManifestEntry::File {
                path: "ok.txt".into(),
                size: 1,
                mode: 0o644,
                mtime_ns: 0,
                sha256: "0".repeat(64),
            }],
        };
        assert_eq!(Manifest::parse(sid, &m.to_bytes()).unwrap(), m);
        m.entries.push(ManifestEntry::Dir { path: "../../etc".into(), mode: 0o755 });
        let err = Manifest::parse(sid, &m.to_bytes()).unwrap_err();
        assert!(err.to_string().contains("'..'"), "{err}");
        m.entries.pop();
        m.entries.push(ManifestEntry::File {
            path: "x".into(),
            size: 1,
            mode: 0o644,
            mtime_ns: 0,
            sha256: "../../x".into(),
        });
        assert!(Manifest::parse(sid, &m.to_bytes()).is_err());
        m.entries.pop();
        assert!(
            Manifest::parse("0190b8f2-1c3d-7e4f-8a9b-0c1d2e3f4a5c", &m.to_bytes()).is_err(),
            "a manifest under another session's prefix"
        );
    }
}
