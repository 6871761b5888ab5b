//! The first layer of the docker runtime: what a session's container looks
//! like to the engine. Owns the container create body (every hardening
//! option of the HostConfig) and the seccomp profile the agent writes.
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
use std::path::Path;

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, RestartPolicy, RestartPolicyNameEnum};
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

/// CFS period of every container (100 ms).
pub const CPU_PERIOD_US: i64 = 100_000;
/// pids on top of the session's `pids_limit`: tini, the executor's threads,
/// and the two bwrap processes of each exec.
pub const EXECUTOR_PIDS_HEADROOM: u32 = 32;
/// Size of the container's own `/tmp` (the executor's files; each exec gets
/// its own tmpfs `/tmp` from bwrap).
pub const CONTAINER_TMP: &str = "rw,noexec,nosuid,nodev,size=64m";
/// json-file log cap.
pub const LOG_MAX_SIZE: &str = "10m";
/// json-file log files kept.
pub const LOG_MAX_FILE: &str = "3";

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

/// What one container is made of.
#[derive(Debug, Clone)]
pub struct ContainerPlan<'a> {
    /// The image (from the template).
    pub image: &'a str,
    /// Host uid (and gid) the container's processes run as.
    pub uid: u32,
    /// Limits (memory, CPU, pids).
    pub limits: &'a ResolvedSpec,
    /// Host directory bound at `/workspace`.
    pub workspace_dir: &'a Path,
    /// Host directory bound at `/sandfleet` (the executor's socket).
    pub run_dir: &'a Path,
    /// Labels for reconciliation.
    pub labels: HashMap<String, String>,
    /// The seccomp profile (JSON text).
    pub seccomp_json: &'a str,
}

/// The resources part of the HostConfig (also used to re-limit a claimed pool container).
pub fn resources(limits: &ResolvedSpec) -> (i64, i64, i64, i64) {
    let memory = i64::try_from(limits.memory_bytes).unwrap_or(i64::MAX);
    let quota = i64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
    let pids = i64::from(limits.pids_limit.saturating_add(EXECUTOR_PIDS_HEADROOM));
    (memory, CPU_PERIOD_US, quota, pids)
}

/// The container create body: every hardening option of the docker runtime.
pub fn container_body(p: &ContainerPlan<'_>) -> ContainerCreateBody {
    let (memory, period, quota, pids) = resources(p.limits);
    let host = HostConfig {
        // Memory with memory+swap equal to it: no swap.
        memory: Some(memory),
        memory_swap: Some(memory),
        cpu_period: Some(period),
        cpu_quota: Some(quota),
        pids_limit: Some(pids),
        network_mode: Some("none".to_string()),
        cap_drop: Some(vec!["ALL".to_string()]),
        security_opt: Some(vec!["no-new-privileges:true".to_string(), format!("seccomp={}", p.seccomp_json)]),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([("/tmp".to_string(), CONTAINER_TMP.to_string())])),
        binds: Some(vec![
            format!("{}:{}:rw", p.workspace_dir.display(), CONTAINER_WORKSPACE),
            format!("{}:{}:rw", p.run_dir.display(), CONTAINER_RUN_DIR),
        ]),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".to_string()),
            config: Some(HashMap::from([
                ("max-size".to_string(), LOG_MAX_SIZE.to_string()),
                ("max-file".to_string(), LOG_MAX_FILE.to_string()),
            ])),
        }),
        // docker-init (tini) as pid 1 reaps every child.
        init: Some(true),
        ipc_mode: Some("private".to_string()),
        restart_policy: Some(RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None }),
        // bwrap mounts a fresh procfs for its pid namespace; the kernel refuses
        // that while the container's /proc has Docker's masking mounts on it
        // ("Can't mount proc on /newroot/proc: Operation not permitted"). The
        // masked files stay root-only and the container runs as a non-root uid
        // with no capabilities (see docs/security.md).
        masked_paths: Some(vec![]),
        readonly_paths: Some(vec![]),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(p.image.to_string()),
        user: Some(format!("{}:{}", p.uid, p.uid)),
        hostname: Some("sandbox".to_string()),
        working_dir: Some(CONTAINER_WORKSPACE.to_string()),
        network_disabled: Some(true),
        labels: Some(p.labels.clone()),
        env: Some(vec!["SANDFLEET_LOG=info".to_string()]),
        stop_timeout: Some(1),
        host_config: Some(host),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn body_has_every_hardening_option() {
        let limits = ResolvedSpec {
            template: sandfleet_common::spec::Template::Python,
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            pids_limit: 64,
            env: Default::default(),
            disk_bytes: 1 << 30,
            disk_inodes: 65_536,
        };
        let b = container_body(&ContainerPlan {
            image: "img",
            uid: 200_001,
            limits: &limits,
            workspace_dir: Path::new("/d/ws"),
            run_dir: Path::new("/d/run"),
            labels: HashMap::from([(LABEL_NODE.to_string(), "n".to_string())]),
            seccomp_json: "{}",
        });
        let h = b.host_config.unwrap();
        assert_eq!(h.memory, h.memory_swap);
        assert_eq!(h.cpu_quota, Some(50_000));
        assert_eq!(h.pids_limit, Some(64 + i64::from(EXECUTOR_PIDS_HEADROOM)));
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(h.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.init, Some(true));
        assert!(h.security_opt.unwrap().contains(&"no-new-privileges:true".to_string()));
        assert_eq!(b.user.as_deref(), Some("200001:200001"));
    }
}
