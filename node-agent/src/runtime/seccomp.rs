//! The seccomp filter every sandboxed process runs under.
//!
//! A deny list on top of bubblewrap's namespaces and dropped capabilities:
//! the default action is Allow and the syscalls that reach kernel attack
//! surface a sandbox never needs (ptrace, mounts, namespaces, BPF, kernel
//! modules, keyrings, io_uring, ...) return `EPERM`. A syscall from another
//! architecture kills the process (seccompiler's arch check), and on x86_64
//! every x32 syscall number (`>= 0x4000_0000`) returns `EPERM`, since a deny
//! list keyed on x86_64 numbers would not see the x32 aliases. `clone3`
//! returns `ENOSYS` (its flags live in memory a filter cannot read; libc falls
//! back to `clone`), and `clone` with any namespace flag returns `EPERM`.
//!
//! `socket` and `socketpair` are allowed only for the families a sandbox
//! needs ([`SOCKET_FAMILIES`]: unix, inet, inet6, and netlink only with
//! `NETLINK_ROUTE`); every other family (vsock, which network namespaces do
//! not isolate, packet, bluetooth, alg, xdp, ...) returns `EPERM`. The docker
//! runtime's container profile takes the same list
//! ([`crate::runtime::container::hardening::seccomp_profile`]), so both layers
//! agree.
//!
//! The program is built with [`seccompiler`] and serialized in the raw
//! `struct sock_filter` layout bubblewrap reads from `--seccomp FD`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use super::RuntimeError;

/// Syscalls that return `EPERM` inside the sandbox.
pub fn denied_syscalls() -> Vec<(&'static str, i64)> {
    let mut v: Vec<(&'static str, i64)> = vec![
        ("ptrace", libc::SYS_ptrace),
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("pivot_root", libc::SYS_pivot_root),
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("reboot", libc::SYS_reboot),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("name_to_handle_at", libc::SYS_name_to_handle_at),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("acct", libc::SYS_acct),
        ("quotactl", libc::SYS_quotactl),
        ("quotactl_fd", libc::SYS_quotactl_fd),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("io_uring_register", libc::SYS_io_uring_register),
        ("fsopen", libc::SYS_fsopen),
        ("fsconfig", libc::SYS_fsconfig),
        ("fsmount", libc::SYS_fsmount),
        ("fspick", libc::SYS_fspick),
        ("move_mount", libc::SYS_move_mount),
        ("open_tree", libc::SYS_open_tree),
        ("mount_setattr", libc::SYS_mount_setattr),
        ("syslog", libc::SYS_syslog),
        ("settimeofday", libc::SYS_settimeofday),
        ("clock_settime", libc::SYS_clock_settime),
        ("clock_adjtime", libc::SYS_clock_adjtime),
        ("adjtimex", libc::SYS_adjtimex),
        ("vhangup", libc::SYS_vhangup),
        ("kcmp", libc::SYS_kcmp),
        ("pidfd_getfd", libc::SYS_pidfd_getfd),
        ("fanotify_init", libc::SYS_fanotify_init),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        ("iopl", libc::SYS_iopl),
        ("ioperm", libc::SYS_ioperm),
        ("modify_ldt", libc::SYS_modify_ldt),
        ("uselib", libc::SYS_uselib),
        ("_sysctl", libc::SYS__sysctl),
        ("nfsservctl", libc::SYS_nfsservctl),
    ]);
    v
}

/// The socket families a sandboxed program may open, by name and number:
/// the one list both seccomp layers are built from.
pub const SOCKET_FAMILIES: [(&str, i32); 4] = [
    ("AF_UNIX", libc::AF_UNIX),
    ("AF_INET", libc::AF_INET),
    ("AF_INET6", libc::AF_INET6),
    ("AF_NETLINK", libc::AF_NETLINK),
];
/// The only netlink protocol allowed (routes and links: libc's address
/// lookups and bubblewrap's loopback setup use it).
pub const NETLINK_PROTOCOL: i32 = libc::NETLINK_ROUTE;

/// Namespace flags `clone` may not use.
const CLONE_NS_FLAGS: [i32; 7] = [
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// Builds the filter program.
pub fn program() -> Result<BpfProgram, RuntimeError> {
    let err = |e: &dyn std::fmt::Display| RuntimeError::Internal(format!("building the seccomp filter: {e}"));
    let arch = std::env::consts::ARCH.try_into().map_err(|e: seccompiler::BackendError| err(&e))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        denied_syscalls().into_iter().map(|(_, nr)| (nr, vec![])).collect();
    let mut clone_rules = Vec::new();
    for flag in CLONE_NS_FLAGS {
        let flag = flag as u32 as u64;
        let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)
            .map_err(|e| err(&e))?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(|e| err(&e))?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    // socket/socketpair(domain, type, protocol): a family outside the list, or
    // netlink with another protocol, is denied.
    let family_rules = || -> Result<Vec<SeccompRule>, RuntimeError> {
        let ne = |v: i32| {
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, v as u32 as u64).map_err(|e| err(&e))
        };
        let other_family = SOCKET_FAMILIES.iter().map(|(_, f)| ne(*f)).collect::<Result<Vec<_>, _>>()?;
        let netlink = vec![
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_NETLINK as u64)
                .map_err(|e| err(&e))?,
            SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, NETLINK_PROTOCOL as u32 as u64)
                .map_err(|e| err(&e))?,
        ];
        Ok(vec![SeccompRule::new(other_family).map_err(|e| err(&e))?, SeccompRule::new(netlink).map_err(|e| err(&e))?])
    };
    rules.insert(libc::SYS_socket, family_rules()?);
    rules.insert(libc::SYS_socketpair, family_rules()?);
    let filter = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)
        .map_err(|e| err(&e))?;
    let mut prog: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| err(&e))?;
    insert_prologue(&mut prog)?;
    Ok(prog)
}

/// Inserts, right after seccompiler's arch check and syscall-number load,
/// the x32 guard (x86_64) and `clone3` → ENOSYS. seccompiler's program starts
/// with `ld arch; jeq arch,+1; ret kill; ld nr` and only jumps forward within
/// its own blocks, so instructions inserted at index 4 keep every jump valid.
fn insert_prologue(prog: &mut BpfProgram) -> Result<(), RuntimeError> {
    use seccompiler::sock_filter;
    // BPF_LD | BPF_W | BPF_ABS (the first two are 0).
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
    const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
    const BPF_RET_K: u16 = 0x06;
    const RET_ERRNO: u32 = 0x0005_0000;
    let ok = prog.len() > 4
        && prog[0].code == BPF_LD_W_ABS
        && prog[0].k == 4
        && prog[1].code == BPF_JMP_JEQ_K
        && prog[1].jt == 1
        && prog[1].jf == 0
        && prog[2].code == BPF_RET_K
        && prog[3].code == BPF_LD_W_ABS
        && prog[3].k == 0;
    if !ok {
        return Err(RuntimeError::Internal("unexpected seccompiler program layout; refusing to patch it".to_string()));
    }
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    let mut extra = Vec::new();
    if cfg!(target_arch = "x86_64") {
        extra.push(ins(BPF_JMP_JGE_K, 0, 1, 0x4000_0000));
        extra.push(ins(BPF_RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32));
    }
    extra.push(ins(BPF_JMP_JEQ_K, 0, 1, libc::SYS_clone3 as u32));
    extra.push(ins(BPF_RET_K, 0, 0, RET_ERRNO | libc::ENOSYS as u32));
    prog.splice(4..4, extra);
    Ok(())
}

/// The filter in the raw `struct sock_filter` layout (8 bytes per
/// instruction: code u16, jt u8, jf u8, k u32, native endian), as
/// `bwrap --seccomp FD` reads it.
pub fn filter_bytes() -> Result<Vec<u8>, RuntimeError> {
    let prog = program()?;
    let mut out = Vec::with_capacity(prog.len() * 8);
    for i in &prog {
        out.extend_from_slice(&i.code.to_ne_bytes());
        out.push(i.jt);
        out.push(i.jf);
        out.extend_from_slice(&i.k.to_ne_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod docs_tests {
    /// docs/security.md lists every denied syscall, so the documented filter
    /// cannot fall behind the real one.
    #[test]
    fn the_security_doc_names_every_denied_syscall() {
        let doc = include_str!("../../../docs/security.md");
        let row = doc.lines().find(|l| l.starts_with("| seccomp |")).expect("the seccomp row of docs/security.md");
        let words: std::collections::HashSet<&str> =
            row.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).collect();
        let missing: Vec<&str> =
            super::denied_syscalls().into_iter().map(|(name, _)| name).filter(|name| !words.contains(name)).collect();
        assert!(missing.is_empty(), "docs/security.md's seccomp row lacks {missing:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes() {
        let b = filter_bytes().unwrap();
        assert_eq!(b.len() % 8, 0);
        assert!(b.len() / 8 > denied_syscalls().len());
        assert!(b.len() / 8 < 4096, "BPF_MAXINSNS");
        // First instruction loads the arch (offset 4).
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 0x20);
        assert_eq!(u32::from_ne_bytes([b[4], b[5], b[6], b[7]]), 4);
    }

    /// Runs the filter in a forked child and checks what syscalls return.
    #[test]
    fn denies_in_a_child() {
        let prog = program().unwrap();
        // SAFETY: the child only makes raw syscalls and _exit()s.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = (|| {
                    // SAFETY: prctl/syscall with plain integer arguments.
                    unsafe {
                        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                            return 10;
                        }
                    }
                    if seccompiler::apply_filter(&prog).is_err() {
                        return 11;
                    }
                    // SAFETY: raw syscalls with integer arguments; the denied ones fail.
                    unsafe {
                        *libc::__errno_location() = 0;
                        if libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) != -1
                            || *libc::__errno_location() != libc::EPERM
                        {
                            return 12;
                        }
                        if libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) != -1
                            || *libc::__errno_location() != libc::EPERM
                        {
                            return 13;
                        }
                        if libc::syscall(libc::SYS_clone3, 0, 0) != -1 || *libc::__errno_location() != libc::ENOSYS {
                            return 14;
                        }
                        #[cfg(target_arch = "x86_64")]
                        if libc::syscall(0x4000_0000 | 101, 0, 0, 0, 0) != -1
                            || *libc::__errno_location() != libc::EPERM
                        {
                            return 15;
                        }
                        if libc::syscall(libc::SYS_getpid) <= 0 {
                            return 16;
                        }
                        // Socket families: vsock, packet and a netlink protocol other than
                        // NETLINK_ROUTE are refused; unix, inet, inet6 and rtnetlink open.
                        for (family, protocol, code) in [
                            (libc::AF_VSOCK, 0, 17),
                            (libc::AF_PACKET, 0, 18),
                            (libc::AF_NETLINK, libc::NETLINK_KOBJECT_UEVENT, 19),
                            (libc::AF_ALG, 0, 20),
                        ] {
                            *libc::__errno_location() = 0;
                            if libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) != -1
                                || *libc::__errno_location() != libc::EPERM
                            {
                                return code;
                            }
                        }
                        let mut pair = [0; 2];
                        if libc::socketpair(libc::AF_VSOCK, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) != -1
                            || *libc::__errno_location() != libc::EPERM
                        {
                            return 21;
                        }
                        for (family, kind, protocol, code) in [
                            (libc::AF_UNIX, libc::SOCK_STREAM, 0, 22),
                            (libc::AF_INET, libc::SOCK_DGRAM, 0, 23),
                            (libc::AF_INET6, libc::SOCK_DGRAM, 0, 24),
                            (libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE, 25),
                        ] {
                            let fd = libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol);
                            if fd < 0 {
                                return code;
                            }
                            libc::close(fd);
                        }
                        if libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, pair.as_mut_ptr()) != 0 {
                            return 26;
                        }
                    }
                    0
                })();
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let st = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(st, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }
}
