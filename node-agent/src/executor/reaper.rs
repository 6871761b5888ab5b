//! The executor reaps what its commands leave behind.
//!
//! bwrap runs each command in a new pid namespace whose init process outlives
//! bwrap itself by a moment (it dies with bwrap, `--die-with-parent`). Orphaned,
//! that init would be reparented to the host's init and stay a zombie until
//! the host's init reaps it, and a zombie still counts against the session's
//! `pids.max`: a session running execs back to back would run out of pids
//! (seen: 20 zombies after 20 quick execs, reaped only seconds later). So the
//! executor makes itself a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphans
//! of its commands are reparented to it, and [`Reaper::run`] reaps them on
//! every SIGCHLD (and every second, as a net).
//!
//! It reaps only children that are not its own commands: those tokio waits
//! for, by pid. [`Reaper::spawn`] registers a command's pid before the reaper
//! can look at it, so an exit status is never taken from under tokio.

use std::collections::HashSet;
use std::io;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::process::Child;

/// The executor's reaper of orphaned descendants.
#[derive(Debug, Default)]
pub struct Reaper {
    /// Pids of the commands tokio waits for.
    own: Mutex<HashSet<i32>>,
}

impl Reaper {
    /// Makes this process the subreaper of its descendants.
    pub fn new() -> io::Result<Self> {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes plain integers and changes only this process.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self::default())
    }

    /// Spawns a command with `spawn` and registers its pid, with reaping
    /// held off meanwhile; the returned guard unregisters it when dropped
    /// (after tokio has waited for it).
    pub fn spawn<T>(&self, spawn: impl FnOnce() -> io::Result<(Child, T)>) -> io::Result<(Child, T, Registered<'_>)> {
        let mut own = self.own.lock();
        let (child, extra) = spawn()?;
        let pid = child.id().map(|p| p as i32);
        if let Some(pid) = pid {
            own.insert(pid);
        }
        Ok((child, extra, Registered { reaper: self, pid }))
    }

    /// Reaps every exited child that is not a registered command; returns how many.
    pub fn reap(&self) -> usize {
        let own = self.own.lock();
        let mut reaped = 0;
        for pid in children() {
            if own.contains(&pid) {
                continue;
            }
            let mut status = 0;
            // SAFETY: waitpid on a child of ours with WNOHANG; `status` is a valid out-pointer.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                reaped += 1;
            }
        }
        reaped
    }

    /// Reaps on every SIGCHLD and every second until `shutdown` fires.
    pub async fn run(&self, shutdown: tokio_util::sync::CancellationToken) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGCHLD stream; reaping orphans once a second only");
                None
            }
        };
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = async { match sigchld.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let n = self.reap();
            if n > 0 {
                tracing::trace!(reaped = n, "reaped orphaned processes");
            }
        }
    }
}

/// A registered command; unregistered on drop.
#[derive(Debug)]
pub struct Registered<'a> {
    reaper: &'a Reaper,
    pid: Option<i32>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            self.reaper.own.lock().remove(&pid);
        }
    }
}

/// This process's children, from `/proc/self/task/*/children` (a child
/// belongs to the thread that forked it; an adopted orphan to the main one).
fn children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return out };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An orphaned grandchild is reparented to the subreaper and reaped;
    /// a registered child is left for tokio to wait for.
    #[tokio::test]
    async fn orphans_are_reaped_and_own_children_are_left_alone() {
        let reaper = Reaper::new().unwrap();
        // sh starts a grandchild that outlives it by a moment, then exits: the grandchild is orphaned.
        let mut orphaner = tokio::process::Command::new("/bin/sh").args(["-c", "sleep 0.2 & exit 0"]).spawn().unwrap();
        assert!(orphaner.wait().await.unwrap().success());
        let (mut own, (), registered) =
            reaper.spawn(|| Ok((tokio::process::Command::new("/bin/sh").args(["-c", "exit 7"]).spawn()?, ()))).unwrap();
        // Wait for the orphan to exit, then reap.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut reaped = 0;
        while reaped == 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            reaped += reaper.reap();
        }
        assert_eq!(reaped, 1, "the orphaned sleep was reaped");
        // Our own child's status is still there for tokio.
        assert_eq!(own.wait().await.unwrap().code(), Some(7));
        drop(registered);
        assert!(reaper.own.lock().is_empty());
    }
}
