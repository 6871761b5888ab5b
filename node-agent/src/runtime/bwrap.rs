//! Building the bubblewrap argv for one exec.
//!
//! The sandbox sees a minimal, read-only root: `/usr` from the host, the
//! `/bin`, `/lib*`, `/sbin` entries as the host has them (symlinks into
//! `/usr` on merged-usr systems, read-only binds otherwise), an `/etc` made
//! of the agent's own tiny files plus a few harmless host files
//! (`ld.so.cache`, `localtime`, `alternatives`), fresh `/proc` and `/dev`, a
//! size-limited `/tmp`, and the session workspace at `/workspace`. Nothing
//! else of the host exists inside: no `/root`, `/home`, `/var`, `/run`,
//! `/sys`, no agent data dir, no host `/etc/passwd` or `/etc/shadow`. The
//! root is remounted read-only once everything is in place.
//!
//! Every namespace is unshared (user, ipc, pid, net, uts, cgroup), nested
//! user namespaces are disabled, all capabilities are dropped and the
//! seccomp filter of [`super::seccomp`] is loaded before the command runs.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use super::RuntimeError;

/// The uid and gid of the sandbox user inside the sandbox.
pub const SANDBOX_UID: u32 = 1000;
/// Where the workspace appears inside the sandbox.
pub const WORKSPACE_DIR: &str = "/workspace";
/// Where large code is placed inside the sandbox (see [`crate::exec::plan_command`]).
pub const CODE_PATH: &str = "/run/sandfleet/code";
/// Size of the sandbox's `/tmp` tmpfs (charged to the session's memory limit too).
pub const TMP_SIZE_BYTES: u64 = 64 * 1024 * 1024;
/// Hostname inside the sandbox.
pub const HOSTNAME: &str = "sandbox";

/// Host files exposed read-only under `/etc` when they exist.
pub const HOST_ETC_FILES: [&str; 3] = ["ld.so.cache", "localtime", "alternatives"];

/// One entry of the sandbox root mirrored from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootEntry {
    /// `--symlink target dest`.
    Symlink {
        /// Link target, as on the host (e.g. `usr/bin`).
        target: PathBuf,
        /// Path inside the sandbox.
        dest: String,
    },
    /// `--ro-bind src dest`.
    RoBind {
        /// Host path.
        src: PathBuf,
        /// Path inside the sandbox.
        dest: String,
    },
}

/// What the sandbox root is made of, computed once from the host.
#[derive(Debug, Clone)]
pub struct RootLayout {
    /// `/usr`, `/bin`, `/lib*`, `/sbin`.
    pub system: Vec<RootEntry>,
    /// Files under `/etc`: `(host source, name under /etc)`.
    pub etc: Vec<(PathBuf, String)>,
}

impl RootLayout {
    /// Mirrors the host's `/usr` and top-level system entries, and builds
    /// `/etc` from the files in `etc_dir` plus [`HOST_ETC_FILES`].
    pub fn detect(etc_dir: &Path) -> Result<Self, RuntimeError> {
        Self::detect_from(Path::new("/"), etc_dir)
    }

    /// Like [`RootLayout::detect`] with another host root (tests).
    pub fn detect_from(host_root: &Path, etc_dir: &Path) -> Result<Self, RuntimeError> {
        let usr = host_root.join("usr");
        if !usr.is_dir() {
            return Err(RuntimeError::Unavailable(format!("{} is missing; the sandbox root is built from it", usr.display())));
        }
        let mut system = vec![RootEntry::RoBind { src: usr, dest: "/usr".to_string() }];
        for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
            let p = host_root.join(name);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = std::fs::read_link(&p)?;
                    system.push(RootEntry::Symlink { target, dest: format!("/{name}") });
                }
                Ok(m) if m.is_dir() => system.push(RootEntry::RoBind { src: p, dest: format!("/{name}") }),
                _ => {}
            }
        }
        let mut etc = Vec::new();
        let mut names: Vec<String> = std::fs::read_dir(etc_dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        for n in names {
            etc.push((etc_dir.join(&n), n));
        }
        for n in HOST_ETC_FILES {
            let p = host_root.join("etc").join(n);
            if p.exists() && !etc.iter().any(|(_, have)| have == n) {
                etc.push((p, n.to_string()));
            }
        }
        Ok(Self { system, etc })
    }
}

/// Everything one bwrap invocation needs.
#[derive(Debug)]
pub struct BwrapArgs<'a> {
    /// The sandbox root.
    pub layout: &'a RootLayout,
    /// Host path of the session workspace.
    pub workspace: &'a Path,
    /// Working directory relative to the workspace (already validated).
    pub workdir: &'a Path,
    /// The complete environment of the command.
    pub env: &'a BTreeMap<String, String>,
    /// Inherited fd holding the seccomp program.
    pub seccomp_fd: RawFd,
    /// Inherited fd holding code to place at [`CODE_PATH`], if any.
    pub code_fd: Option<RawFd>,
    /// What to execute.
    pub argv: &'a [String],
}

/// The base environment of every command; session and exec env are applied on top.
pub fn base_env() -> BTreeMap<String, String> {
    [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", WORKSPACE_DIR),
        ("LANG", "C.UTF-8"),
        ("TMPDIR", "/tmp"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The bwrap arguments (without the bwrap path itself).
pub fn build(a: &BwrapArgs<'_>) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::with_capacity(64 + a.argv.len() + 3 * a.env.len());
    let mut push = |items: &[&str]| v.extend(items.iter().map(OsString::from));
    push(&[
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--hostname",
        HOSTNAME,
        "--clearenv",
    ]);
    for (k, val) in a.env {
        v.push("--setenv".into());
        v.push(k.into());
        v.push(val.into());
    }
    for e in &a.layout.system {
        match e {
            RootEntry::Symlink { target, dest } => {
                v.push("--symlink".into());
                v.push(target.into());
                v.push(dest.into());
            }
            RootEntry::RoBind { src, dest } => {
                v.push("--ro-bind".into());
                v.push(src.into());
                v.push(dest.into());
            }
        }
    }
    v.extend(["--perms", "0755", "--dir", "/etc"].map(OsString::from));
    for (src, name) in &a.layout.etc {
        v.push("--ro-bind".into());
        v.push(src.into());
        v.push(format!("/etc/{name}").into());
    }
    v.extend(["--proc", "/proc", "--dev", "/dev", "--size"].map(OsString::from));
    v.push(TMP_SIZE_BYTES.to_string().into());
    v.extend(["--perms", "1777", "--tmpfs", "/tmp", "--bind"].map(OsString::from));
    v.push(a.workspace.into());
    v.push(WORKSPACE_DIR.into());
    if let Some(fd) = a.code_fd {
        v.extend(["--perms", "0444", "--ro-bind-data"].map(OsString::from));
        v.push(fd.to_string().into());
        v.push(CODE_PATH.into());
    }
    v.extend(["--remount-ro", "/", "--chdir"].map(OsString::from));
    let mut wd = PathBuf::from(WORKSPACE_DIR);
    wd.push(a.workdir);
    v.push(wd.into());
    v.push("--seccomp".into());
    v.push(a.seccomp_fd.to_string().into());
    v.push("--".into());
    v.extend(a.argv.iter().map(OsString::from));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_args() {
        let host = tempfile::tempdir().unwrap();
        let etc = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(host.path().join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", host.path().join("bin")).unwrap();
        std::fs::create_dir(host.path().join("lib")).unwrap();
        std::fs::create_dir(host.path().join("etc")).unwrap();
        std::fs::write(host.path().join("etc/ld.so.cache"), b"").unwrap();
        std::fs::write(host.path().join("etc/shadow"), b"secret").unwrap();
        std::fs::write(etc.path().join("passwd"), b"sandbox:x:1000:1000::/workspace:/bin/sh\n").unwrap();
        let layout = RootLayout::detect_from(host.path(), etc.path()).unwrap();
        assert!(layout.system.contains(&RootEntry::Symlink { target: "usr/bin".into(), dest: "/bin".into() }));
        assert!(layout.system.contains(&RootEntry::RoBind { src: host.path().join("lib"), dest: "/lib".into() }));
        let names: Vec<_> = layout.etc.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, vec!["passwd", "ld.so.cache"]);

        let env = base_env();
        let argv = vec!["python3".to_string(), "-c".to_string(), "--bind / /x".to_string()];
        let args = build(&BwrapArgs {
            layout: &layout,
            workspace: Path::new("/data/s/workspace"),
            workdir: Path::new("sub/dir"),
            env: &env,
            seccomp_fd: 5,
            code_fd: None,
            argv: &argv,
        });
        let s: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        let joined = s.join(" ");
        assert!(joined.contains("--chdir /workspace/sub/dir"), "{joined}");
        assert!(joined.contains("--bind /data/s/workspace /workspace"), "{joined}");
        assert!(joined.contains("--seccomp 5 -- python3 -c --bind / /x"), "{joined}");
        assert!(!joined.contains("shadow"));
        // The command comes last, after "--", so it cannot add bwrap options.
        let dd = s.iter().position(|a| a == "--").unwrap();
        assert_eq!(&s[dd + 1..], &argv[..]);
    }
}
