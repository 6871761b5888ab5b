//! The first layer of the container runtimes: what a session's container may
//! do, decided once ([`hardening`]) for both engines, which render it into
//! their own configuration (the docker runtime's HostConfig, the CRI
//! runtime's pod sandbox and container configs); and the seccomp profile the
//! agent writes, in Docker's format ([`seccomp_profile`]) and the OCI format
//! containerd reads ([`oci_seccomp_profile`]).
//!
//! # The seccomp profile
//! Docker's default profile (moby `profiles/seccomp/default.json`) as it
//! applies to a container with every capability dropped: the same allow
//! list, `socket` and `socketpair` only for the families of the second layer's
//! list (unix, inet, inet6, netlink with `NETLINK_ROUTE`), the same `personality` values, `clone`
//! without namespace flags, `clone3` → `ENOSYS`. On top of it, only what
//! bubblewrap needs to build its sandbox from an unprivileged user namespace
//! (each found by removing it and watching bwrap fail in the hardened
//! container, see docs/security.md):
//!
//! | syscall | why bwrap needs it |
//! |---|---|
//! | `clone` with `CLONE_NEWUSER` set | creating the sandbox's user (and pid, net, ...) namespaces; clone with namespace flags but without a new user namespace stays denied |
//! | `unshare` | the nested user namespace of `--disable-userns` |
//! | `mount` | making `/` a slave, the tmpfs root, binds, `/proc`, `/dev`, `--remount-ro` |
//! | `pivot_root` | switching to the new root |
//! | `umount2` | detaching the old root |
//! | `sethostname` | `--hostname` in the new uts namespace |
//!
//! The kernel still requires `CAP_SYS_ADMIN` in the owning user namespace
//! for every one of them, which the container process (non-root, no
//! capabilities) only has inside the namespace bwrap creates; and the
//! second-layer filter ([`crate::runtime::seccomp`]) denies all of them
//! again to the command bwrap runs.

use std::collections::HashMap;

use std::path::PathBuf;

use serde_json::json;

use crate::executor::{CONTAINER_RUN_DIR, CONTAINER_WORKSPACE};
use crate::runtime::ResolvedSpec;

/// Label: the node that owns the container.
pub const LABEL_NODE: &str = "sandfleet.node";
/// Label: the session (cold-created containers).
pub const LABEL_SESSION: &str = "sandfleet.session";
/// Label: the placement generation the container was created for.
pub const LABEL_GENERATION: &str = "sandfleet.generation";
/// Label: the template of a warm-pool container (pool containers are
/// created before their session is known; a claim is recorded on disk).
pub const LABEL_POOL: &str = "sandfleet.pool";
/// Label: the agent's box (directory) name.
pub const LABEL_BOX: &str = "sandfleet.box";
/// Label: the session slot (host uid = uid_base + slot).
pub const LABEL_SLOT: &str = "sandfleet.slot";
/// Label: the template of a session's container.
pub const LABEL_TEMPLATE: &str = "sandfleet.template";

/// CFS period of every container (100 ms).
pub const CPU_PERIOD_US: i64 = 100_000;
pub use crate::executor::EXECUTOR_PIDS_HEADROOM;

/// Docker's default allow list (the entries without conditions), as of moby
/// 20.10–27; names unknown to the host's libseccomp are ignored by the engine.
const DEFAULT_ALLOW: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "io_uring_enter",
    "io_uring_register",
    "io_uring_setup",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Namespace flags of `clone` (the mask of Docker's default clone rule).
const CLONE_NAMESPACE_MASK: u64 = 0x7E02_0000;
/// `CLONE_NEWUSER`.
const CLONE_NEWUSER: u64 = 0x1000_0000;

/// The syscalls added to Docker's default for bwrap (besides `clone` with `CLONE_NEWUSER`).
pub const BWRAP_EXTRA_SYSCALLS: [&str; 5] = ["unshare", "mount", "pivot_root", "umount2", "sethostname"];

/// The seccomp profile of every session container (Docker's JSON format).
pub fn seccomp_profile() -> serde_json::Value {
    let mut syscalls = vec![
        json!({"names": DEFAULT_ALLOW, "action": "SCMP_ACT_ALLOW"}),
        json!({"names": ["arch_prctl", "modify_ldt"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64", "x32", "x86"]}}),
    ];
    // socket and socketpair only for the families of the second layer's list
    // (crate::runtime::seccomp::SOCKET_FAMILIES); netlink only for NETLINK_ROUTE.
    for (_, family) in crate::runtime::seccomp::SOCKET_FAMILIES {
        let mut args = vec![json!({"index": 0, "value": family, "op": "SCMP_CMP_EQ"})];
        if family == libc::AF_NETLINK {
            args.push(json!({"index": 2, "value": crate::runtime::seccomp::NETLINK_PROTOCOL, "op": "SCMP_CMP_EQ"}));
        }
        syscalls.push(json!({"names": ["socket", "socketpair"], "action": "SCMP_ACT_ALLOW", "args": args}));
    }
    for v in [0u64, 8, 131_072, 131_080, 4_294_967_295] {
        syscalls.push(json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}]}));
    }
    // Docker's default: clone without namespace flags.
    syscalls.push(json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_NAMESPACE_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}));
    // Added for bwrap: clone that creates a user namespace (with any other namespaces).
    syscalls.push(json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}],
        "comment": "sandfleet: bwrap creates its namespaces together with a new user namespace"}));
    syscalls.push(json!({"names": BWRAP_EXTRA_SYSCALLS, "action": "SCMP_ACT_ALLOW",
        "comment": "sandfleet: bwrap builds its sandbox inside its own user namespace"}));
    // Docker's default: clone3 -> ENOSYS, so libc falls back to clone (whose flags a filter can read).
    syscalls.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS}));
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}
        ],
        "syscalls": syscalls,
    })
}

/// Architectures of the profile: the host's with its compatibility ones.
const ARCH_MAP: [(&str, &[&str]); 2] =
    [("SCMP_ARCH_X86_64", &["SCMP_ARCH_X86", "SCMP_ARCH_X32"]), ("SCMP_ARCH_AARCH64", &["SCMP_ARCH_ARM"])];

/// The same profile as [`seccomp_profile`] in the OCI runtime-spec format
/// (`LinuxSeccomp`), which containerd's CRI reads from a `Localhost` profile
/// file: Docker's `archMap` becomes the host architecture's list, and a rule
/// restricted to other architectures (`includes.arches`) is dropped.
pub fn oci_seccomp_profile() -> serde_json::Value {
    let docker = seccomp_profile();
    let (host_arch, docker_arch) = match std::env::consts::ARCH {
        "aarch64" => (ARCH_MAP[1], "arm64"),
        _ => (ARCH_MAP[0], "amd64"),
    };
    let mut architectures = vec![host_arch.0];
    architectures.extend_from_slice(host_arch.1);
    let syscalls: Vec<serde_json::Value> = docker["syscalls"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|r| {
            r["includes"]["arches"]
                .as_array()
                .is_none_or(|arches| arches.iter().any(|a| a.as_str() == Some(docker_arch)))
        })
        .map(|r| {
            let mut rule = json!({"names": r["names"], "action": r["action"]});
            if let Some(args) = r.get("args") {
                rule["args"] = args.clone();
            }
            if let Some(errno) = r.get("errnoRet") {
                rule["errnoRet"] = errno.clone();
            }
            rule
        })
        .collect();
    json!({
        "defaultAction": docker["defaultAction"],
        "defaultErrnoRet": docker["defaultErrnoRet"],
        "architectures": architectures,
        "syscalls": syscalls,
    })
}

/// What one container is made of: which box, which image, which limits.
#[derive(Debug, Clone)]
pub struct ContainerPlan<'a> {
    /// The container's (and box's) name.
    pub name: &'a str,
    /// The image (from the template).
    pub image: String,
    /// Host uid (and gid) the container's processes run as.
    pub uid: u32,
    /// Limits (memory, CPU, pids).
    pub limits: &'a ResolvedSpec,
    /// Host directory bound at `/workspace`.
    pub workspace_dir: PathBuf,
    /// Host directory bound at `/sandfleet` (the executor's socket).
    pub run_dir: PathBuf,
    /// Labels for reconciliation.
    pub labels: HashMap<String, String>,
}

/// A bind mount of a host directory into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// Host path.
    pub host: PathBuf,
    /// Path in the container.
    pub container: &'static str,
}

/// Every hardening option of a session's container, decided once here and
/// rendered by each engine into its own configuration (the docker runtime's
/// HostConfig, the CRI runtime's pod sandbox and container configs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardening {
    /// uid and gid of every process (non-root: the session's host uid).
    pub uid: u32,
    /// Capabilities dropped: all of them.
    pub cap_drop: Vec<&'static str>,
    /// `no_new_privs`: nothing in the container gains privileges by exec.
    pub no_new_privileges: bool,
    /// The image's filesystem is read-only.
    pub read_only_root: bool,
    /// Memory limit in bytes; memory + swap is the same number (no swap).
    pub memory_bytes: i64,
    /// CFS period (us).
    pub cpu_period_us: i64,
    /// CFS quota (us per period): the session's CPU limit.
    pub cpu_quota_us: i64,
    /// Process limit: the session's plus [`EXECUTOR_PIDS_HEADROOM`].
    pub pids_limit: i64,
    /// No network: docker's `none`; under CRI the pod's network namespace
    /// (and each exec gets an empty one of its own from bwrap).
    pub network_none: bool,
    /// Paths of `/proc` and `/sys` masked or made read-only by the engine:
    /// none, because the kernel refuses bwrap a fresh `/proc` for its pid
    /// namespace while anything is mounted over the container's
    /// (`mount_too_revealing`); bwrap's `/proc` shows only the exec's own
    /// processes, and the container runs as a non-root uid with no
    /// capabilities (see docs/security.md).
    pub masked_paths: Vec<&'static str>,
    /// See [`Hardening::masked_paths`].
    pub readonly_paths: Vec<&'static str>,
    /// The workspace and the executor's run directory.
    pub binds: Vec<Bind>,
    /// The container's hostname.
    pub hostname: &'static str,
    /// Working directory.
    pub workdir: &'static str,
    /// Arguments of the image's entrypoint (`sandfleet-executor`): its
    /// generated `/etc` lives in the run directory, which both engines bind
    /// writable (CRI has no tmpfs mounts).
    pub args: Vec<String>,
    /// Environment of the executor.
    pub env: Vec<(&'static str, &'static str)>,
}

/// The directory of the executor's generated `/etc` files inside the container.
pub const EXECUTOR_ETC_DIR: &str = "/sandfleet/etc";

/// The hardening of the container of `p`.
pub fn hardening(p: &ContainerPlan<'_>) -> Hardening {
    let (memory_bytes, cpu_period_us, cpu_quota_us, pids_limit) = resources(p.limits);
    Hardening {
        uid: p.uid,
        cap_drop: vec!["ALL"],
        no_new_privileges: true,
        read_only_root: true,
        memory_bytes,
        cpu_period_us,
        cpu_quota_us,
        pids_limit,
        network_none: true,
        masked_paths: vec![],
        readonly_paths: vec![],
        binds: vec![
            Bind { host: p.workspace_dir.clone(), container: CONTAINER_WORKSPACE },
            Bind { host: p.run_dir.clone(), container: CONTAINER_RUN_DIR },
        ],
        hostname: "sandbox",
        workdir: CONTAINER_WORKSPACE,
        args: vec!["--etc-dir".into(), EXECUTOR_ETC_DIR.into()],
        env: vec![("SANDFLEET_LOG", "info")],
    }
}

/// The resources part of the HostConfig (also used to re-limit a claimed pool container).
pub fn resources(limits: &ResolvedSpec) -> (i64, i64, i64, i64) {
    let memory = i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX);
    let quota = i64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
    let pids = i64::from(limits.pids_limit.saturating_add(EXECUTOR_PIDS_HEADROOM));
    (memory, CPU_PERIOD_US, quota, pids)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn profile_adds_only_what_bwrap_needs() {
        let p = seccomp_profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        let text = p.to_string();
        for forbidden in
            ["\"ptrace\"", "\"bpf\"", "\"setns\"", "\"chroot\"", "\"kexec_load\"", "\"init_module\"", "\"keyctl\""]
        {
            assert!(!text.contains(forbidden), "{forbidden} must not be allowed");
        }
        let names: Vec<String> = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["args"].is_null() && r["includes"].is_null() && r["action"] == "SCMP_ACT_ALLOW")
            .flat_map(|r| r["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()))
            .collect();
        assert!(!names.contains(&"clone".to_string()), "clone is only allowed with conditions");
        for extra in BWRAP_EXTRA_SYSCALLS {
            assert!(names.contains(&extra.to_string()));
        }
    }

    pub(crate) fn limits() -> ResolvedSpec {
        ResolvedSpec {
            template: sandfleet_common::spec::Template::Python,
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            pids_limit: 64,
            env: Default::default(),
            disk_bytes: 1 << 30,
            disk_inodes: 65_536,
            image: String::new(),
        }
    }

    pub(crate) fn plan(limits: &ResolvedSpec) -> ContainerPlan<'_> {
        ContainerPlan {
            name: "sandfleet-n-0123456789abcdef",
            image: "img".into(),
            uid: 200_001,
            limits,
            workspace_dir: PathBuf::from("/d/ws"),
            run_dir: PathBuf::from("/d/run"),
            labels: HashMap::from([(LABEL_NODE.to_string(), "n".to_string())]),
        }
    }

    #[test]
    fn hardening_of_a_plan() {
        let l = limits();
        let h = hardening(&plan(&l));
        assert_eq!(h.uid, 200_001);
        assert_eq!(h.cap_drop, vec!["ALL"]);
        assert!(h.no_new_privileges && h.read_only_root && h.network_none);
        assert_eq!((h.memory_bytes, h.cpu_period_us, h.cpu_quota_us), (256 << 20, 100_000, 50_000));
        assert_eq!(h.pids_limit, 64 + i64::from(EXECUTOR_PIDS_HEADROOM));
        assert_eq!(h.binds.len(), 2);
        assert_eq!(h.args, vec!["--etc-dir".to_string(), EXECUTOR_ETC_DIR.to_string()]);
    }

    #[test]
    fn oci_profile_is_the_docker_profile_for_this_arch() {
        let d = seccomp_profile();
        let o = oci_seccomp_profile();
        assert_eq!(o["defaultAction"], d["defaultAction"]);
        assert!(o.get("archMap").is_none());
        let arch = o["architectures"].as_array().unwrap();
        assert!(arch.len() >= 2, "{arch:?}");
        let rules = o["syscalls"].as_array().unwrap();
        assert!(rules.iter().all(|r| r.get("includes").is_none() && r.get("comment").is_none()));
        // Every rule of the docker profile for this architecture is there, in order.
        let kept = d["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["includes"].is_null() || cfg!(any(target_arch = "x86_64", target_arch = "x86")))
            .count();
        assert_eq!(rules.len(), kept);
        let clone3 = rules.iter().find(|r| r["names"] == json!(["clone3"])).unwrap();
        assert_eq!(clone3["errnoRet"], libc::ENOSYS);
    }
}
