//! Filesystem and error helpers shared by the runtimes: directories with an
//! exact mode (and owner), atomic writes, I/O errors that say what was
//! being done, and the checks and answers that every runtime's slots share.

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{RuntimeError, SessionInfo};

/// Checks what every runtime's configuration shares: a valid node id, at
/// least one session slot, and a uid per slot (from `uid_base`) that is
/// unprivileged and below the kernel's reserved ids.
pub(crate) fn check_node_config(node_id: &str, slots: u32, uid_base: u32) -> Result<(), RuntimeError> {
    sandfleet_common::ids::validate_node_id(node_id).map_err(|e| invalid(e.to_string()))?;
    if slots == 0 {
        return Err(invalid("slots must be at least 1"));
    }
    if uid_base < 1000 || uid_base.checked_add(slots).is_none_or(|end| end > u32::MAX - 2) {
        return Err(invalid(format!(
            "uid_base {uid_base} with {slots} slots is not a usable unprivileged uid range (need 1000 <= uid_base and uid_base + slots < 2^32 - 2)"
        )));
    }
    Ok(())
}

/// The answer to a new session when all `slots` of the node hold one.
pub(crate) fn no_free_slot(slots: u32) -> RuntimeError {
    RuntimeError::Unavailable(format!("no free session slot: all {slots} slots of this node are in use"))
}

/// What [`super::Runtime::list`] answers: the sessions held, by id.
pub(crate) fn session_list<'a>(held: impl Iterator<Item = (&'a String, &'a AtomicU64)>) -> Vec<SessionInfo> {
    let mut v: Vec<SessionInfo> = held
        .map(|(id, generation)| SessionInfo { session_id: id.clone(), generation: generation.load(Ordering::SeqCst) })
        .collect();
    v.sort_by(|a, b| a.session_id.cmp(&b.session_id));
    v
}

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

    #[test]
    fn node_configs_need_a_node_id_a_slot_and_an_unprivileged_uid_range() {
        assert!(check_node_config("n1", 1, 1000).is_ok());
        for (node, slots, uid_base, says) in [
            ("N_1", 1, 1000, "node id"),
            ("n1", 0, 1000, "slots must be at least 1"),
            ("n1", 1, 999, "not a usable unprivileged uid range"),
            ("n1", 2, u32::MAX - 3, "not a usable unprivileged uid range"),
        ] {
            let e = check_node_config(node, slots, uid_base).unwrap_err();
            assert!(matches!(e, RuntimeError::InvalidArgument(_)) && e.to_string().contains(says), "{e}");
        }
        let listed = session_list(
            [("b".to_string(), AtomicU64::new(2)), ("a".to_string(), AtomicU64::new(1))].iter().map(|(id, g)| (id, g)),
        );
        let ids: Vec<(&str, u64)> = listed.iter().map(|s| (s.session_id.as_str(), s.generation)).collect();
        assert_eq!(ids, [("a", 1), ("b", 2)]);
    }
}
