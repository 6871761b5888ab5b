//! Finding and removing mounts below a directory: for tearing down an agent's
//! data directory (its session filesystems are mounts), by the agent's own
//! clean-up and by test harnesses after a cluster is gone.

use std::path::{Path, PathBuf};

/// The mount points at or below `dir`, deepest first (from `/proc/self/mountinfo`).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// Unmounts (lazily: users keep what they hold open) every mount at or below
/// `dir`, deepest first; returns how many were unmounted.
pub fn unmount_all_under(dir: &Path) -> usize {
    let mut n = 0;
    for p in mounts_under(dir) {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { continue };
        // SAFETY: `c` is a valid NUL-terminated path; umount2 has no other preconditions.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            n += 1;
        }
    }
    n
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|o| u8::try_from(o.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'))).ok());
        if let (b'\\', Some(c)) = (b[i], octal) {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/end\04"), r"/end\04");
    }

    #[test]
    fn the_root_mount_is_under_slash() {
        assert!(mounts_under(Path::new("/")).contains(&PathBuf::from("/")));
        assert!(mounts_under(Path::new("/nonexistent-sandfleet-dir")).is_empty());
    }
}
