//! Filesystem and error helpers shared by the runtimes: directories with an
//! exact mode (and owner), atomic writes, and I/O errors that say what was
//! being done.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use super::RuntimeError;

/// A malformed request.
pub(crate) fn invalid(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidArgument(msg.into())
}

/// An I/O error with what was being done.
pub(crate) fn io_ctx(what: impl std::fmt::Display, e: io::Error) -> RuntimeError {
    RuntimeError::Io(io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// Sets `path`'s permission bits.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<(), RuntimeError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| io_ctx(format!("chmod {}", path.display()), e))
}

/// Creates `path` (or keeps it when it is already a directory, never through a
/// symlink), then sets its owner (when given) and its mode.
pub(crate) fn create_dir(path: &Path, mode: u32, owner: Option<u32>) -> Result<(), RuntimeError> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_ctx(format!("creating {}", path.display()), e)),
    }
    let meta = fs::symlink_metadata(path).map_err(|e| io_ctx(format!("stat {}", path.display()), e))?;
    if !meta.is_dir() {
        return Err(RuntimeError::Internal(format!("{} exists and is not a directory", path.display())));
    }
    if let Some(uid) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid))
            .map_err(|e| io_ctx(format!("chown {}", path.display()), e))?;
    }
    set_mode(path, mode)
}

/// Writes a file atomically (temp file, fsync, rename) with `mode`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("tmp");
    let res = (|| -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(data)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    res.map_err(|e| io_ctx(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_get_their_mode_and_a_file_in_the_way_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        create_dir(&p, 0o711, None).unwrap();
        create_dir(&p, 0o700, None).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o700);
        let f = d.path().join("f");
        write_atomic(&f, b"x", 0o600).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"x");
        assert_eq!(fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(create_dir(&f, 0o700, None), Err(RuntimeError::Internal(_))));
        std::os::unix::fs::symlink(&p, d.path().join("link")).unwrap();
        assert!(create_dir(&d.path().join("link"), 0o700, None).is_err(), "a symlink is not a directory");
    }
}
