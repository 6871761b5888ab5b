//! Safe file operations on a session's workspace, for the file API.
//!
//! The agent runs as root and the workspace is written by untrusted code, so
//! every operation resolves paths with [`cap_std`]: a path is opened relative
//! to a directory handle on the workspace root and can never resolve outside
//! it, not through `..`, absolute symlinks or symlinks swapped in while the
//! call runs. Paths are also checked lexically first ([`Workspace::check_path`])
//! so clients get a precise error naming the rule they broke.
//!
//! Rules:
//! - paths are relative to the root, without `..`, NUL bytes or more than
//!   [`MAX_PATH_BYTES`] bytes; `.` components are ignored;
//! - symlinks that stay inside the workspace may be followed for reading,
//!   symlinks that lead outside are refused with [`FsError::Escape`];
//! - writes never go *through* a symlink: a final component that is a symlink
//!   is refused, and the new content replaces the target atomically (temp file
//!   in the same directory, fsync, rename);
//! - files and directories created by the agent are owned by the session's
//!   host uid/gid so the sandboxed code can use them;
//! - listing reports symlinks without following them; removing a symlink
//!   removes the link only; the root itself can never be removed.

use std::ffi::OsStr;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt as _, PermissionsExt as _};
use futures::{Stream, StreamExt as _};
use sandfleet_common::limits::{MAX_FILE_BYTES, MAX_PATH_BYTES};
use sha2::{Digest as _, Sha256};
use tracing::{debug, instrument};

/// What a file operation could not do.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The path breaks a lexical rule; the text names the rule.
    #[error("{0}")]
    InvalidPath(String),
    /// The path (through a symlink) leads outside the workspace.
    #[error("path {0:?} leads outside the workspace")]
    Escape(String),
    /// Nothing at this path.
    #[error("{0:?} not found in the workspace")]
    NotFound(String),
    /// Expected a regular file.
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
    /// Expected a directory.
    #[error("{0:?} is not a directory")]
    NotADirectory(String),
    /// A non-recursive remove of a directory that has entries.
    #[error("directory {0:?} is not empty; pass recursive to remove it")]
    DirectoryNotEmpty(String),
    /// A write went past the file size limit.
    #[error("file exceeds the limit of {limit} bytes (MAX_FILE_BYTES)")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// Any other I/O failure.
    #[error("io error: {0}")]
    Io(#[from] io::Error),
}

impl From<FsError> for tonic::Status {
    fn from(e: FsError) -> Self {
        let msg = e.to_string();
        match e {
            FsError::InvalidPath(_) | FsError::Escape(_) | FsError::NotAFile(_) | FsError::NotADirectory(_) => {
                tonic::Status::invalid_argument(msg)
            }
            FsError::NotFound(_) => tonic::Status::not_found(msg),
            FsError::DirectoryNotEmpty(_) => tonic::Status::failed_precondition(msg),
            FsError::TooLarge { .. } => tonic::Status::out_of_range(msg),
            FsError::Io(e) if matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded) => {
                tonic::Status::resource_exhausted(format!(
                    "the session's disk is full (its disk_bytes or disk_inodes quota is used up): {e}"
                ))
            }
            FsError::Io(_) => tonic::Status::internal(msg),
        }
    }
}

/// The kind of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (never followed by [`Workspace::list`]).
    Symlink,
    /// A FIFO, socket or device node.
    Other,
}

/// One directory entry, as [`Workspace::list`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name within the listed directory (lossily converted to UTF-8).
    pub name: String,
    /// What it is.
    pub kind: EntryKind,
    /// Size in bytes (of the link itself for symlinks).
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time in milliseconds since the Unix epoch.
    pub modified_at_ms: i64,
}

/// A session's workspace directory on the host.
#[derive(Clone, Debug)]
pub struct Workspace {
    root: PathBuf,
    uid: u32,
    gid: u32,
    max_file_bytes: u64,
}

/// Prefix of the temporary files uploads are written to before the rename.
pub(crate) const TEMP_PREFIX: &str = ".sandfleet-upload-";

impl Workspace {
    /// A workspace rooted at `root`, whose files belong to host `uid`/`gid`.
    pub fn new(root: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        Self { root: root.into(), uid, gid, max_file_bytes: MAX_FILE_BYTES }
    }

    /// The same workspace with another file size limit (tests, smaller nodes).
    pub fn with_max_file_bytes(mut self, limit: u64) -> Self {
        self.max_file_bytes = limit;
        self
    }

    /// The root directory on the host.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The host uid owning the workspace's files.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The host gid owning the workspace's files.
    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// The largest file [`Workspace::write_file`] accepts.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_file_bytes
    }

    /// Checks a client path lexically and returns it normalised (without `.`
    /// components). The empty path (or `.`) stands for the root and is
    /// returned as an empty `PathBuf`; callers that need a file refuse it.
    pub fn check_path(path: &str) -> Result<PathBuf, FsError> {
        if path.len() > MAX_PATH_BYTES {
            return Err(FsError::InvalidPath(format!(
                "path exceeds the limit of {MAX_PATH_BYTES} bytes (MAX_PATH_BYTES): got {}",
                path.len()
            )));
        }
        if path.contains('\0') {
            return Err(FsError::InvalidPath("path contains a NUL byte".to_string()));
        }
        if path.starts_with('/') {
            return Err(FsError::InvalidPath(format!(
                "path {:?} is absolute; paths are relative to the workspace root",
                truncate(path)
            )));
        }
        let mut out = PathBuf::new();
        for c in Path::new(path).components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(FsError::InvalidPath(format!(
                        "path {:?} contains a \"..\" component, which is not allowed",
                        truncate(path)
                    )))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(FsError::InvalidPath(format!(
                        "path {:?} is absolute; paths are relative to the workspace root",
                        truncate(path)
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Like [`Workspace::check_path`], but refuses the root.
    fn check_file_path(path: &str) -> Result<PathBuf, FsError> {
        let p = Self::check_path(path)?;
        if p.as_os_str().is_empty() {
            return Err(FsError::InvalidPath("path is empty; name a file inside the workspace".to_string()));
        }
        Ok(p)
    }

    fn open_root(&self) -> Result<Dir, FsError> {
        Dir::open_ambient_dir(&self.root, cap_std::ambient_authority()).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                FsError::NotFound(String::new())
            } else {
                FsError::Io(e)
            }
        })
    }

    /// Writes a file from a stream of chunks and returns its size and hex
    /// SHA-256. The content appears atomically when the stream ends well;
    /// on any error (including [`FsError::TooLarge`]) nothing is left behind.
    /// `mode` 0 means 0o644; only permission bits (0o777) are kept.
    #[instrument(skip(self, chunks), fields(root = %self.root.display()))]
    pub async fn write_file(
        &self,
        path: &str,
        mode: u32,
        mut chunks: impl Stream<Item = Result<Bytes, FsError>> + Send + Unpin,
    ) -> Result<(u64, String), FsError> {
        let rel = Self::check_file_path(path)?;
        let mode = if mode == 0 { 0o644 } else { mode & 0o777 };
        let this = self.clone();
        let path_s = path.to_string();
        let rel2 = rel.clone();
        let mut upload = blocking(move || this.begin_upload(&path_s, &rel2)).await?;

        let mut size: u64 = 0;
        let mut hasher = Sha256::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            size = size.saturating_add(chunk.len() as u64);
            if size > self.max_file_bytes {
                return Err(FsError::TooLarge { limit: self.max_file_bytes });
            }
            hasher.update(&chunk);
            // Chunks are at most MAX_WRITE_CHUNK_BYTES; write them on the blocking pool.
            upload = blocking(move || {
                let mut up = upload;
                up.file()?.write_all(&chunk)?;
                Ok(up)
            })
            .await?;
        }
        let (uid, gid) = (self.uid, self.gid);
        let path_s = path.to_string();
        blocking(move || upload.finish(&path_s, mode, uid, gid)).await?;
        let digest = hex::encode(hasher.finalize());
        debug!(size, "file written");
        Ok((size, digest))
    }

    fn begin_upload(&self, path: &str, rel: &Path) -> Result<Upload, FsError> {
        let root = self.open_root()?;
        let name = rel.file_name().ok_or_else(|| FsError::InvalidPath(format!("path {path:?} has no file name")))?;
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        // Create missing parents one by one so each new directory gets the session owner.
        let mut prefix = PathBuf::new();
        for c in parent_rel.components() {
            prefix.push(c);
            match root.create_dir(&prefix) {
                Ok(()) => {
                    let d = root.open_dir(&prefix).map_err(|e| map_io(e, path))?;
                    fchown_dir(&d, self.uid, self.gid)?;
                    let _ = root.set_permissions(&prefix, cap_std::fs::Permissions::from_mode(0o755));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(map_io(e, path)),
            }
        }
        let parent = if parent_rel.as_os_str().is_empty() {
            root
        } else {
            root.open_dir(parent_rel).map_err(|e| map_io_dir(e, path))?
        };
        check_write_target(&parent, name, path)?;
        for _ in 0..16 {
            let tmp = format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>());
            let mut opts = OpenOptions::new();
            opts.write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
            match parent.open_with(&tmp, &opts) {
                Ok(f) => return Ok(Upload { parent, tmp: Some(tmp), file: Some(f.into_std()) }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(map_io(e, path)),
            }
        }
        Err(FsError::Io(io::Error::other("could not pick a unique temporary file name")))
    }

    /// Opens a regular file for reading. Symlinks that stay inside the
    /// workspace are followed; FIFOs, devices and directories are refused.
    #[instrument(skip(self), fields(root = %self.root.display()))]
    pub async fn read_file(&self, path: &str) -> Result<tokio::fs::File, FsError> {
        let rel = Self::check_file_path(path)?;
        let this = self.clone();
        let path_s = path.to_string();
        let file = blocking(move || {
            let root = this.open_root()?;
            let mut opts = OpenOptions::new();
            // O_NONBLOCK: opening a FIFO planted by the sandbox must not hang the agent.
            opts.read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
            let f = root.open_with(&rel, &opts).map_err(|e| map_io(e, &path_s))?;
            let std_file = f.into_std();
            let meta = std_file.metadata()?;
            if !meta.is_file() {
                return Err(FsError::NotAFile(path_s));
            }
            clear_nonblock(&std_file)?;
            Ok(std_file)
        })
        .await?;
        Ok(tokio::fs::File::from_std(file))
    }

    /// Lists one directory (the root for `""`), sorted by name. Symlinks are
    /// reported, not followed.
    #[instrument(skip(self), fields(root = %self.root.display()))]
    pub async fn list(&self, path: &str) -> Result<Vec<Entry>, FsError> {
        let rel = Self::check_path(path)?;
        let this = self.clone();
        let path_s = path.to_string();
        blocking(move || {
            let root = this.open_root()?;
            let dir = if rel.as_os_str().is_empty() {
                root
            } else {
                root.open_dir(&rel).map_err(|e| map_io_dir(e, &path_s))?
            };
            let mut entries = Vec::new();
            for ent in dir.entries()? {
                let ent = ent?;
                let name = ent.file_name();
                let meta = match dir.symlink_metadata(&name) {
                    Ok(m) => m,
                    // Removed while we listed: skip it.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(FsError::Io(e)),
                };
                let ft = meta.file_type();
                let kind = if ft.is_symlink() {
                    EntryKind::Symlink
                } else if ft.is_dir() {
                    EntryKind::Directory
                } else if ft.is_file() {
                    EntryKind::File
                } else {
                    EntryKind::Other
                };
                let modified_at_ms = meta
                    .modified()
                    .ok()
                    .map(|t| t.into_std())
                    .and_then(|t| match t.duration_since(std::time::UNIX_EPOCH) {
                        Ok(d) => i64::try_from(d.as_millis()).ok(),
                        Err(e) => i64::try_from(e.duration().as_millis()).ok().map(|v| -v),
                    })
                    .unwrap_or(0);
                entries.push(Entry {
                    name: name.to_string_lossy().into_owned(),
                    kind,
                    size: meta.len(),
                    mode: meta.permissions().mode() & 0o7777,
                    modified_at_ms,
                });
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(entries)
        })
        .await
    }

    /// Removes a file, a symlink (the link only) or, with `recursive`, a
    /// directory tree. The workspace root cannot be removed.
    #[instrument(skip(self), fields(root = %self.root.display()))]
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), FsError> {
        let rel = Self::check_path(path)?;
        if rel.as_os_str().is_empty() {
            return Err(FsError::InvalidPath("refusing to remove the workspace root".to_string()));
        }
        let this = self.clone();
        let path_s = path.to_string();
        blocking(move || {
            let root = this.open_root()?;
            let name =
                rel.file_name().ok_or_else(|| FsError::InvalidPath(format!("path {path_s:?} has no file name")))?;
            let parent_rel = rel.parent().unwrap_or(Path::new(""));
            let parent = if parent_rel.as_os_str().is_empty() {
                root
            } else {
                root.open_dir(parent_rel).map_err(|e| map_io_dir(e, &path_s))?
            };
            let meta = parent.symlink_metadata(name).map_err(|e| map_io(e, &path_s))?;
            if meta.is_dir() {
                if recursive {
                    parent.remove_dir_all(name).map_err(|e| map_io(e, &path_s))
                } else {
                    parent.remove_dir(name).map_err(|e| map_io(e, &path_s))
                }
            } else {
                parent.remove_file(name).map_err(|e| map_io(e, &path_s))
            }
        })
        .await
    }

    /// Whether `path` (may be empty for the root) is a directory inside the
    /// workspace, following only symlinks that stay inside.
    pub async fn is_dir(&self, path: &str) -> Result<bool, FsError> {
        let rel = Self::check_path(path)?;
        let this = self.clone();
        let path_s = path.to_string();
        blocking(move || {
            let root = this.open_root()?;
            if rel.as_os_str().is_empty() {
                return Ok(true);
            }
            match root.metadata(&rel) {
                Ok(m) => Ok(m.is_dir()),
                Err(e) => match map_io(e, &path_s) {
                    FsError::NotFound(_) | FsError::NotADirectory(_) => Ok(false),
                    other => Err(other),
                },
            }
        })
        .await
    }
}

/// An upload in progress: the temp file and the directory it lives in.
/// Dropping it before [`Upload::finish`] removes the temp file.
struct Upload {
    parent: Dir,
    tmp: Option<String>,
    file: Option<std::fs::File>,
}

impl Upload {
    fn file(&mut self) -> Result<&mut std::fs::File, FsError> {
        self.file.as_mut().ok_or_else(|| FsError::Io(io::Error::other("upload already finished")))
    }

    fn finish(mut self, path: &str, mode: u32, uid: u32, gid: u32) -> Result<(), FsError> {
        let name = Path::new(path)
            .file_name()
            .ok_or_else(|| FsError::InvalidPath(format!("path {path:?} has no file name")))?
            .to_os_string();
        {
            let file = self.file()?;
            file.flush()?;
            file.sync_all()?;
            std::os::unix::fs::fchown(&*file, Some(uid), Some(gid))?;
            // chmod after chown: chown clears setuid/setgid bits, we never set them anyway.
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        }
        // The target may have changed since begin_upload: check again right before the rename.
        check_write_target(&self.parent, &name, path)?;
        let tmp = self.tmp.clone().ok_or_else(|| FsError::Io(io::Error::other("upload already finished")))?;
        self.parent.rename(&tmp, &self.parent, &name).map_err(|e| map_io(e, path))?;
        self.tmp = None;
        // Make the rename durable (cap-std directory handles are O_PATH: reopen to fsync).
        let mut opts = OpenOptions::new();
        opts.read(true).custom_flags(libc::O_DIRECTORY);
        self.parent.open_with(".", &opts)?.sync_all()?;
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.file = None;
        if let Some(tmp) = self.tmp.take() {
            let _ = self.parent.remove_file(&tmp);
        }
    }
}

/// Refuses writing onto a symlink or a directory.
fn check_write_target(parent: &Dir, name: &OsStr, path: &str) -> Result<(), FsError> {
    match parent.symlink_metadata(name) {
        Ok(m) if m.file_type().is_symlink() => Err(FsError::InvalidPath(format!(
            "path {:?} is a symlink; writing through symlinks is not allowed",
            truncate(path)
        ))),
        Ok(m) if m.is_dir() => Err(FsError::NotAFile(path.to_string())),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(map_io(e, path)),
    }
}

/// fchown of a directory handle (cap-std opens directories `O_PATH`, which
/// plain fchown refuses).
fn fchown_dir(d: &Dir, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: fchownat on a valid fd with an empty, NUL-terminated path and AT_EMPTY_PATH.
    let rc = unsafe {
        libc::fchownat(d.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn clear_nonblock(f: &std::fs::File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a valid fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether an error is cap-std refusing a path that leads outside its root.
pub(crate) fn is_escape(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::PermissionDenied && e.to_string().contains("outside of the filesystem")
        || e.raw_os_error() == Some(libc::EXDEV)
}

fn map_io(e: io::Error, path: &str) -> FsError {
    if is_escape(&e) {
        return FsError::Escape(path.to_string());
    }
    match e.kind() {
        io::ErrorKind::NotFound => FsError::NotFound(path.to_string()),
        io::ErrorKind::NotADirectory => FsError::NotADirectory(path.to_string()),
        io::ErrorKind::IsADirectory => FsError::NotAFile(path.to_string()),
        io::ErrorKind::DirectoryNotEmpty => FsError::DirectoryNotEmpty(path.to_string()),
        _ if e.raw_os_error() == Some(libc::ELOOP) => {
            FsError::InvalidPath(format!("path {:?} has too many levels of symbolic links", truncate(path)))
        }
        _ => FsError::Io(e),
    }
}

/// Like [`map_io`] for a path that must be a directory.
fn map_io_dir(e: io::Error, path: &str) -> FsError {
    match map_io(e, path) {
        FsError::NotAFile(p) => FsError::NotADirectory(p),
        other => other,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, FsError> + Send + 'static) -> Result<T, FsError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| FsError::Io(io::Error::other(format!("file task failed: {e}"))))?
}

fn truncate(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Reads a whole workspace file into memory (small files, tests).
pub async fn read_to_vec(ws: &Workspace, path: &str) -> Result<Vec<u8>, FsError> {
    let f = ws.read_file(path).await?;
    let mut std_file = f.into_std().await;
    tokio::task::spawn_blocking(move || {
        let mut v = Vec::new();
        std_file.rewind()?;
        std_file.read_to_end(&mut v)?;
        Ok(v)
    })
    .await
    .map_err(|e| FsError::Io(io::Error::other(format!("file task failed: {e}"))))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ws(dir: &Path) -> Workspace {
        let uid = nix::unistd::geteuid().as_raw();
        let gid = nix::unistd::getegid().as_raw();
        Workspace::new(dir, uid, gid)
    }

    fn one(data: &'static [u8]) -> impl Stream<Item = Result<Bytes, FsError>> + Send + Unpin {
        futures::stream::iter(vec![Ok(Bytes::from_static(data))])
    }

    #[test]
    fn check_path_rules() {
        assert_eq!(Workspace::check_path("a/./b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(Workspace::check_path("./").unwrap(), PathBuf::new());
        assert_eq!(Workspace::check_path("").unwrap(), PathBuf::new());
        let e = Workspace::check_path("a/../b").unwrap_err().to_string();
        assert!(e.contains("\"..\""), "{e}");
        assert!(Workspace::check_path("..").is_err());
        let e = Workspace::check_path("/etc/passwd").unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = Workspace::check_path("a\0b").unwrap_err().to_string();
        assert!(e.contains("NUL"), "{e}");
        let e = Workspace::check_path(&"a".repeat(MAX_PATH_BYTES + 1)).unwrap_err().to_string();
        assert!(e.contains("MAX_PATH_BYTES"), "{e}");
        assert!(Workspace::check_file_path(".").is_err());
    }

    #[tokio::test]
    async fn write_read_list_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let w = ws(tmp.path());
        let (size, sha) = w.write_file("d/e/hello.txt", 0, one(b"hello")).await.unwrap();
        assert_eq!(size, 5);
        assert_eq!(sha, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(read_to_vec(&w, "d/e/hello.txt").await.unwrap(), b"hello");
        // Overwrite atomically, with a mode.
        let chunks = futures::stream::iter(vec![Ok(Bytes::from_static(b"ab")), Ok(Bytes::from_static(b"cd"))]);
        w.write_file("./d/e/hello.txt", 0o600, chunks).await.unwrap();
        assert_eq!(read_to_vec(&w, "d/e/hello.txt").await.unwrap(), b"abcd");

        let list = w.list("d/e").await.unwrap();
        assert_eq!(list.len(), 1, "no temp file left: {list:?}");
        assert_eq!(list[0].name, "hello.txt");
        assert_eq!(list[0].kind, EntryKind::File);
        assert_eq!(list[0].size, 4);
        assert_eq!(list[0].mode, 0o600);
        assert!(list[0].modified_at_ms > 1_600_000_000_000);

        w.write_file("b.txt", 0, one(b"x")).await.unwrap();
        let root = w.list("").await.unwrap();
        let names: Vec<_> = root.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, vec!["b.txt", "d"]);
        assert_eq!(root[1].kind, EntryKind::Directory);

        assert!(matches!(w.list("b.txt").await, Err(FsError::NotADirectory(_))));
        assert!(matches!(w.read_file("d").await, Err(FsError::NotAFile(_))));
        assert!(matches!(w.read_file("nope").await, Err(FsError::NotFound(_))));
        assert!(matches!(w.remove("d", false).await, Err(FsError::DirectoryNotEmpty(_))));
        w.remove("d", true).await.unwrap();
        w.remove("b.txt", false).await.unwrap();
        assert!(w.list("").await.unwrap().is_empty());
        assert!(matches!(w.remove("", true).await, Err(FsError::InvalidPath(_))));
        assert!(matches!(w.remove(".", true).await, Err(FsError::InvalidPath(_))));
        assert!(matches!(w.remove("gone", false).await, Err(FsError::NotFound(_))));
        assert!(tmp.path().exists());
    }

    #[tokio::test]
    async fn lexical_refusals() {
        let tmp = tempfile::tempdir().unwrap();
        let w = ws(tmp.path());
        assert!(matches!(w.read_file("../x").await, Err(FsError::InvalidPath(_))));
        assert!(matches!(w.read_file("/etc/passwd").await, Err(FsError::InvalidPath(_))));
        assert!(matches!(w.write_file("a/../../x", 0, one(b"x")).await, Err(FsError::InvalidPath(_))));
        assert!(matches!(w.write_file("", 0, one(b"x")).await, Err(FsError::InvalidPath(_))));
        assert!(matches!(w.list("..").await, Err(FsError::InvalidPath(_))));
    }

    #[tokio::test]
    async fn symlinks_out_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("ws");
        std::fs::create_dir(&root).unwrap();
        let outside = tmp.path().join("secret");
        std::fs::write(&outside, b"top secret").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        std::os::unix::fs::symlink("../secret", root.join("rel-evil")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("abs-evil")).unwrap();
        let w = ws(&root);

        assert!(
            matches!(w.read_file("evil/passwd").await, Err(FsError::Escape(_))),
            "{:?}",
            w.read_file("evil/passwd").await
        );
        assert!(matches!(w.read_file("rel-evil").await, Err(FsError::Escape(_))));
        assert!(matches!(w.read_file("abs-evil").await, Err(FsError::Escape(_))));
        assert!(matches!(w.list("evil").await, Err(FsError::Escape(_))));
        // Writing through a symlinked parent that leads outside.
        assert!(matches!(w.write_file("evil/owned", 0, one(b"x")).await, Err(FsError::Escape(_))));
        assert!(!Path::new("/etc/owned").exists());
        // Writing onto a final-component symlink is refused, and the target is untouched.
        assert!(w.write_file("rel-evil", 0, one(b"x")).await.is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"top secret");
        // Removing a symlink removes the link, not the target.
        w.remove("abs-evil", false).await.unwrap();
        assert!(outside.exists());
        w.remove("evil", true).await.unwrap();
        assert!(Path::new("/etc/passwd").exists());
        // Listing reports symlinks without following them.
        let l = w.list("").await.unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].kind, EntryKind::Symlink);
    }

    #[tokio::test]
    async fn symlinks_in_are_allowed() {
        let tmp = tempfile::tempdir().unwrap();
        let w = ws(tmp.path());
        w.write_file("real/data.txt", 0, one(b"inside")).await.unwrap();
        std::os::unix::fs::symlink("real", tmp.path().join("alias")).unwrap();
        std::os::unix::fs::symlink("real/data.txt", tmp.path().join("link.txt")).unwrap();
        assert_eq!(read_to_vec(&w, "alias/data.txt").await.unwrap(), b"inside");
        assert_eq!(read_to_vec(&w, "link.txt").await.unwrap(), b"inside");
        // A parent symlink inside the workspace may be written through.
        w.write_file("alias/new.txt", 0, one(b"n")).await.unwrap();
        assert_eq!(std::fs::read(tmp.path().join("real/new.txt")).unwrap(), b"n");
        // But not a final-component symlink.
        assert!(matches!(w.write_file("link.txt", 0, one(b"y")).await, Err(FsError::InvalidPath(_))));
        assert_eq!(read_to_vec(&w, "real/data.txt").await.unwrap(), b"inside");
        assert_eq!(w.list("alias").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn oversized_writes_leave_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let w = ws(tmp.path()).with_max_file_bytes(10);
        w.write_file("f", 0, one(b"0123456789")).await.unwrap();
        let chunks = futures::stream::iter(vec![Ok(Bytes::from_static(b"01234")), Ok(Bytes::from_static(b"567890"))]);
        let err = w.write_file("f", 0, chunks).await.unwrap_err();
        assert!(matches!(err, FsError::TooLarge { limit: 10 }));
        assert!(err.to_string().contains("10 bytes"), "{err}");
        let status: tonic::Status = err.into();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
        // The old content is intact and no temp file is left.
        assert_eq!(read_to_vec(&w, "f").await.unwrap(), b"0123456789");
        let names: Vec<_> = w.list("").await.unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["f"]);
        // A failing stream leaves nothing either.
        let chunks = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"01")),
            Err(FsError::Io(io::Error::other("client went away"))),
        ]);
        assert!(w.write_file("g", 0, chunks).await.is_err());
        let names: Vec<_> = w.list("").await.unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["f"]);
    }

    #[tokio::test]
    async fn fifo_is_not_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let w = ws(tmp.path());
        nix::unistd::mkfifo(&tmp.path().join("pipe"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), w.read_file("pipe"))
            .await
            .expect("read_file hung on a FIFO");
        assert!(matches!(r, Err(FsError::NotAFile(_))));
        let l = w.list("").await.unwrap();
        assert_eq!(l[0].kind, EntryKind::Other);
    }

    #[test]
    fn status_mapping() {
        let s: tonic::Status = FsError::Escape("x".into()).into();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        let s: tonic::Status = FsError::NotFound("x".into()).into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        let s: tonic::Status = FsError::DirectoryNotEmpty("x".into()).into();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        let s: tonic::Status = FsError::Io(io::Error::other("x")).into();
        assert_eq!(s.code(), tonic::Code::Internal);
    }
}
