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

/// Host files exposed read-only under `/etc` when they exist (copied into the
/// sandbox's `/etc` directory when the layout is detected).
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
    /// The directory bound read-only as `/etc`: the generated files plus
    /// copies of [`HOST_ETC_FILES`]. One bind instead of one per file: each
    /// bind costs bwrap a mount, a remount and a mountinfo parse, and eight
    /// of them were ~3 ms of every exec.
    pub etc_dir: PathBuf,
    /// What `/etc` holds, sorted (for logs and tests).
    pub etc_names: Vec<String>,
}

impl RootLayout {
    /// Mirrors the host's `/usr` and top-level system entries, and builds
    /// `/etc` from the files in `etc_dir` plus [`HOST_ETC_FILES`].
    pub fn detect(etc_dir: &Path) -> Result<Self, RuntimeError> {
        Self::detect_from(Path::new("/"), etc_dir)
    }

    /// The layout over an `etc_dir` that [`RootLayout::detect`] already
    /// filled (by the agent, for the process runtime's executors): nothing
    /// is copied or written.
    pub fn prepared(etc_dir: &Path) -> Result<Self, RuntimeError> {
        let system = Self::system_entries(Path::new("/"))?;
        Ok(Self { system, etc_dir: etc_dir.to_path_buf(), etc_names: etc_names(etc_dir)? })
    }

    fn system_entries(host_root: &Path) -> Result<Vec<RootEntry>, RuntimeError> {
        let usr = host_root.join("usr");
        if !usr.is_dir() {
            return Err(RuntimeError::Unavailable(format!(
                "{} is missing; the sandbox root is built from it",
                usr.display()
            )));
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
        Ok(system)
    }

    /// Like [`RootLayout::detect`] with another host root (tests).
    pub fn detect_from(host_root: &Path, etc_dir: &Path) -> Result<Self, RuntimeError> {
        let system = Self::system_entries(host_root)?;
        for n in HOST_ETC_FILES {
            let src = host_root.join("etc").join(n);
            if std::fs::symlink_metadata(&src).is_ok() && !ETC_FILES.iter().any(|(have, _)| *have == n) {
                copy_etc_entry(&src, &etc_dir.join(n))?;
            }
        }
        Ok(Self { system, etc_dir: etc_dir.to_path_buf(), etc_names: etc_names(etc_dir)? })
    }
}

/// What an `/etc` directory holds, sorted, without the temporary dot files.
fn etc_names(etc_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(etc_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Copies a host `/etc` entry into the sandbox's `/etc` directory, replacing
/// an older copy: a symlink as a symlink (its target resolves inside the
/// sandbox), a file by content (mode 0644), a directory one level deep (the
/// `alternatives` directory is a flat set of symlinks). Nothing else is kept.
fn copy_etc_entry(src: &Path, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::symlink_metadata(src)?;
    let tmp = dest.with_file_name(format!(".{}.new", dest.file_name().and_then(|n| n.to_str()).unwrap_or("entry")));
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_file(&tmp);
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, &tmp)?;
    } else if meta.is_file() {
        std::fs::copy(src, &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))?;
    } else if meta.is_dir() {
        std::fs::create_dir(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            let ft = e.file_type()?;
            let to = tmp.join(e.file_name());
            if ft.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(e.path())?, &to)?;
            } else if ft.is_file() {
                std::fs::copy(e.path(), &to)?;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
            }
        }
    } else {
        return Ok(());
    }
    // Replace the old copy (a directory cannot be renamed over; remove it first).
    if std::fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(dest)?;
    }
    std::fs::rename(&tmp, dest)
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
    [("PATH", "/usr/local/bin:/usr/bin:/bin"), ("HOME", WORKSPACE_DIR), ("LANG", "C.UTF-8"), ("TMPDIR", "/tmp")]
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
    v.push("--ro-bind".into());
    v.push(a.layout.etc_dir.clone().into());
    v.push("/etc".into());
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

/// The files of the sandbox's `/etc` (the agent writes them to a directory
/// and [`RootLayout::detect`] binds them).
pub const ETC_FILES: [(&str, &str); 5] = [
    ("passwd", "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\nsandbox:x:1000:1000::/workspace:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
    ("group", "root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n"),
    ("hostname", "sandbox\n"),
    ("hosts", "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n"),
];

/// Writes [`ETC_FILES`] into `dir` (created 0755 if missing), atomically each.
pub fn write_etc_files(dir: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for (name, content) in ETC_FILES {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// A sealed memfd holding `data`, positioned at 0, close-on-exec.
pub fn sealed_memfd(name: &std::ffi::CStr, data: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::{Seek as _, Write as _};
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: name is a valid C string; flags are plain integers.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(data)?;
    f.rewind()?;
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on our fd with integer arguments.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Arguments in the form `bwrap --args FD` reads: each followed by a NUL.
/// (No argument holds a NUL: the exec env and argv are validated first.)
fn nul_separated(args: &[OsString]) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt as _;
    let mut out = Vec::with_capacity(args.iter().map(|a| a.len() + 1).sum());
    for a in args {
        out.extend_from_slice(a.as_bytes());
        out.push(0);
    }
    out
}

/// What a child of the agent does between fork and exec ([`ChildSetup::install`]).
#[derive(Debug, Clone, Default)]
pub struct ChildSetup {
    /// Open `cgroup.procs` files the child writes "0" to: it joins those
    /// cgroups (needs root, hence before the uid changes).
    pub procs_fds: Vec<RawFd>,
    /// The only descriptors above 2 that survive the exec; every other one
    /// is marked close-on-exec, whatever a library forgot.
    pub inherit: Vec<RawFd>,
    /// Become this uid/gid, with no supplementary groups.
    pub run_as: Option<u32>,
    /// Raise `oom_score_adj` to 1000, so a memory-cgroup OOM kill picks
    /// this process (a sandboxed command) before its supervisor.
    pub oom_victim: bool,
}

impl ChildSetup {
    /// Installs the setup as `cmd`'s `pre_exec` hook; core dumps are off too.
    /// The hook makes async-signal-safe syscalls only.
    pub fn install(self, cmd: &mut tokio::process::Command) {
        use std::io;
        let Self { procs_fds, inherit, run_as, oom_victim } = self;
        let hook = move || -> io::Result<()> {
            // Only async-signal-safe calls from here on: we are between fork and exec.
            // SAFETY: every call takes plain integers or pointers to static data.
            unsafe {
                for &fd in &procs_fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if oom_victim {
                    // Best effort: raising the score needs no privilege.
                    let adj = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if adj >= 0 {
                        libc::write(adj, b"1000".as_ptr().cast(), 4);
                        libc::close(adj);
                    }
                }
                if let Some(uid) = run_as {
                    let gid = uid;
                    if libc::setgroups(0, std::ptr::null()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::setgid(gid) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::setuid(uid) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::getuid() != uid || libc::geteuid() != uid || libc::getegid() != gid {
                        return Err(io::Error::from_raw_os_error(libc::EPERM));
                    }
                }
            }
            Ok(())
        };
        // SAFETY: the hook only makes async-signal-safe syscalls and touches no allocator or lock.
        unsafe {
            cmd.pre_exec(hook);
        }
    }
}

/// Everything needed to start one sandboxed command with [`spawn`].
pub struct Launch<'a> {
    /// The bubblewrap binary.
    pub bwrap_path: &'a Path,
    /// The sandbox root.
    pub layout: &'a RootLayout,
    /// The seccomp program ([`super::seccomp::filter_bytes`]).
    pub filter: &'a [u8],
    /// The workspace directory, bound at [`WORKSPACE_DIR`].
    pub workspace: &'a Path,
    /// Working directory relative to the workspace (validated).
    pub workdir: &'a Path,
    /// The complete environment of the command.
    pub env: &'a BTreeMap<String, String>,
    /// What to execute.
    pub argv: &'a [String],
    /// Code to place read-only at [`CODE_PATH`].
    pub code: Option<&'a [u8]>,
    /// Become this uid/gid (no supplementary groups) before exec; `None`
    /// keeps the caller's ids (the executor already runs unprivileged).
    pub run_as: Option<u32>,
    /// Put bwrap in a process group of its own, so the whole group can be killed.
    pub own_process_group: bool,
}

/// Spawns bwrap for one command: its options (the environment among them)
/// go through a sealed memfd read with `--args FD`, never on a command line,
/// where any host user could read them in `/proc/PID/cmdline`;
/// seccomp (and code) memfds are handed over by fd number, every other fd
/// is closed on exec, core dumps are off, the child drops to `run_as`, and
/// its `oom_score_adj` is raised to 1000 so the OOM killer picks the
/// command, not its supervisor ([`ChildSetup`]). The child stays in the
/// caller's cgroups: joining one costs a cgroup v1 migration an RCU grace
/// period (12–15 ms), so execs start from a supervisor already inside the
/// session's cgroups. Returns the child (with `kill_on_drop`, piped stdio)
/// and the fds that must stay open until it has started.
pub fn spawn(l: &Launch<'_>) -> std::io::Result<(tokio::process::Child, Vec<std::fs::File>)> {
    use std::os::fd::AsRawFd as _;
    let mut keep = Vec::new();
    let seccomp = sealed_memfd(c"sandfleet-seccomp", l.filter)?;
    let seccomp_fd = seccomp.as_raw_fd();
    keep.push(seccomp);
    let code_fd = match l.code {
        Some(c) => {
            let f = sealed_memfd(c"sandfleet-code", c)?;
            let fd = f.as_raw_fd();
            keep.push(f);
            Some(fd)
        }
        None => None,
    };
    let args = build(&BwrapArgs {
        layout: l.layout,
        workspace: l.workspace,
        workdir: l.workdir,
        env: l.env,
        seccomp_fd,
        code_fd,
        argv: l.argv,
    });
    // The options (the environment among them) go through the memfd; bwrap
    // takes the command itself only on its command line, and it is the
    // command's own argv once it runs anyway.
    let split = args.iter().position(|a| a == "--").unwrap_or(args.len());
    let args_file = sealed_memfd(c"sandfleet-args", &nul_separated(&args[..split]))?;
    let args_fd = args_file.as_raw_fd();
    keep.push(args_file);
    let mut cmd = tokio::process::Command::new(l.bwrap_path);
    cmd.arg("--args").arg(args_fd.to_string()).args(&args[split..]).env_clear().current_dir("/");
    if l.own_process_group {
        cmd.process_group(0);
    }
    let mut inherit = vec![args_fd, seccomp_fd];
    inherit.extend(code_fd);
    ChildSetup { procs_fds: Vec::new(), inherit, run_as: l.run_as, oom_victim: true }.install(&mut cmd);
    let child = crate::exec::spawn(cmd)?;
    Ok((child, keep))
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
        assert_eq!(layout.etc_names, vec!["ld.so.cache", "passwd"]);
        // Host entries are copies in the bound directory; the host's secrets are not.
        assert!(etc.path().join("ld.so.cache").is_file());
        assert!(!etc.path().join("shadow").exists());
        // Detecting again (an agent restart) replaces the copies.
        RootLayout::detect_from(host.path(), etc.path()).unwrap();

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
        assert!(joined.contains(&format!("--ro-bind {} /etc", etc.path().display())), "{joined}");
        // The command comes last, after "--", so it cannot add bwrap options.
        let dd = s.iter().position(|a| a == "--").unwrap();
        assert_eq!(&s[dd + 1..], &argv[..]);
    }

    #[test]
    fn memfd_is_sealed_and_rewound() {
        use std::io::Write as _;
        let mut f = sealed_memfd(c"t", b"abc").unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "abc");
        assert!(f.write_all(b"x").is_err());
    }
}
