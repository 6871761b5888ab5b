//! One agent per node id and per data dir on a host.
//!
//! At start-up an agent takes over whatever its node id names on the host:
//! the process runtime kills every process under `sandfleet/<node_id>` in the
//! cgroup tree and removes the cgroups it does not know, and the docker
//! runtime removes the containers labelled with its node id that it does not
//! know. A second agent started with the same node id (two `sandfleet dev`
//! on one machine name their nodes after the hostname) would destroy the
//! first one's sessions. So before it touches anything, an agent takes two
//! exclusive `flock`s that it holds for its whole life, and refuses to start
//! when either is held:
//!
//! - `<lock dir>/agent-<node_id>.lock`, keyed by node id, where the lock dir
//!   is [`NODE_LOCK_DIR`] (`/run/sandfleet`) for root, and
//!   `$XDG_RUNTIME_DIR/sandfleet` or `<tmp>/sandfleet-<uid>` otherwise;
//! - `<data_dir>/agent.lock`, since two agents on one data dir would share
//!   workspaces.
//!
//! The kernel drops a `flock` when its holder dies, so a crashed agent never
//! leaves a stale lock behind; each file holds the pid of its holder, for the
//! error message.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Where root agents keep their node-id locks.
pub const NODE_LOCK_DIR: &str = "/run/sandfleet";
/// The data dir lock's file name.
pub const DATA_DIR_LOCK: &str = "agent.lock";

/// An agent could not take its locks.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error(
        "{what} is in use by another sandfleet agent{holder}, which holds the lock {}. Starting would kill \
         that agent's sessions, so this agent refuses to start: stop the other agent first, or give this one {fix}",
        path.display(),
        holder = holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Held {
        /// What is in use: "node id \"x\"" or "data dir /d".
        what: String,
        /// The lock file.
        path: PathBuf,
        /// The pid written in the lock file by its holder, if readable.
        holder: Option<u32>,
        /// What to change to run both.
        fix: &'static str,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The locks of a running agent; dropping it releases them.
#[derive(Debug)]
pub struct AgentLock {
    _node: Flock<File>,
    _data_dir: Flock<File>,
    node_path: PathBuf,
}

impl AgentLock {
    /// Takes the node-id lock (in [`default_lock_dir`]) and the data dir lock.
    pub fn acquire(node_id: &str, data_dir: &Path) -> Result<Self, LockError> {
        Self::acquire_in(&default_lock_dir(), node_id, data_dir)
    }

    /// Takes the node-id lock in `lock_dir` and the data dir lock.
    pub fn acquire_in(lock_dir: &Path, node_id: &str, data_dir: &Path) -> Result<Self, LockError> {
        std::fs::create_dir_all(lock_dir).map_err(|source| LockError::Io { path: lock_dir.to_path_buf(), source })?;
        let node_path = lock_dir.join(format!("agent-{node_id}.lock"));
        let node = lock(&node_path, format!("node id {node_id:?}"), "another --node-id")?;
        let data_path = data_dir.join(DATA_DIR_LOCK);
        let data_dir = lock(&data_path, format!("data dir {}", data_dir.display()), "another --data-dir")?;
        Ok(Self { _node: node, _data_dir: data_dir, node_path })
    }

    /// The node-id lock file.
    pub fn node_lock_path(&self) -> &Path {
        &self.node_path
    }
}

/// Where node-id locks live for this process: [`NODE_LOCK_DIR`] for root,
/// else `$XDG_RUNTIME_DIR/sandfleet`, else `<tmp>/sandfleet-<uid>`.
pub fn default_lock_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from(NODE_LOCK_DIR);
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("sandfleet"),
        _ => std::env::temp_dir().join(format!("sandfleet-{uid}")),
    }
}

fn lock(path: &Path, what: String, fix: &'static str) -> Result<Flock<File>, LockError> {
    let io = |source| LockError::Io { path: path.to_path_buf(), source };
    // Not truncated on open: the holder's pid stays readable for the message.
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut held) => {
            let pid = std::process::id();
            held.set_len(0).and_then(|()| held.rewind()).and_then(|()| writeln!(held, "{pid}")).map_err(io)?;
            Ok(held)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let holder = file.read_to_string(&mut text).ok().and_then(|_| text.trim().parse().ok());
            Err(LockError::Held { what, path: path.to_path_buf(), holder, fix })
        }
        Err((_, errno)) => Err(io(std::io::Error::from(errno))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let (locks, data_a, data_b) = (dir.path().join("locks"), dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&data_a).unwrap();
        std::fs::create_dir_all(&data_b).unwrap();
        let first = AgentLock::acquire_in(&locks, "node-1", &data_a).unwrap();
        assert_eq!(std::fs::read_to_string(first.node_lock_path()).unwrap().trim(), std::process::id().to_string());

        // Same node id, another data dir: refused, naming the node id, the file, the holder and the fix.
        let e = AgentLock::acquire_in(&locks, "node-1", &data_b).unwrap_err().to_string();
        let path = locks.join("agent-node-1.lock");
        for part in [
            "node id \"node-1\" is in use by another sandfleet agent",
            &format!("pid {}", std::process::id()),
            &path.display().to_string(),
            "another --node-id",
        ] {
            assert!(e.contains(part), "{e:?} lacks {part:?}");
        }
        // Another node id on the same data dir: refused for the data dir.
        let e = AgentLock::acquire_in(&locks, "node-2", &data_a).unwrap_err().to_string();
        assert!(e.contains(&format!("data dir {} is in use", data_a.display())), "{e}");
        assert!(e.contains("another --data-dir"), "{e}");
        // The failed attempt released node-2's lock: another data dir takes it.
        let second = AgentLock::acquire_in(&locks, "node-2", &data_b).unwrap();

        drop(first);
        drop(second);
        AgentLock::acquire_in(&locks, "node-1", &data_b).unwrap();
    }
}
