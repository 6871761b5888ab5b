//! Group commit: concurrent proposals of this member become one Raft entry.
//!
//! Every write of the coordinator ([`crate::core::Core::propose`], forwarded
//! proposals, the leader loop) goes through one [`Committer`] queue. Its task
//! takes a proposal and everything queued behind it, up to [`MAX_COMMANDS`]
//! commands and [`MAX_BYTES`] of encoded commands, and proposes them as one
//! [`Command::Batch`] entry; each proposer gets its own response back.
//!
//! The batches clock themselves: at most [`MAX_IN_FLIGHT`] entries are being
//! committed at once. A lone proposal on an idle member goes at once (no
//! added latency). Under load, proposals queue while earlier entries replicate
//! and fsync, and the next entry carries all of them. While another entry is
//! in flight, the task also lets the handlers that are already running add
//! theirs for at most [`WINDOW`] before it proposes.
//!
//! Applying a batch applies its commands in order, each exactly as if it were
//! its own entry (idempotency on request ids, generation fencing and the
//! capacity re-check at apply are per command), so batching changes no
//! outcome, only how many entries and fsyncs carry them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::CoreError;
use crate::raft::{typ, Raft};
use crate::state::{Command, CommandResponse};

/// Most commands in one entry (the default and the largest `--group-commit`).
pub const MAX_COMMANDS: usize = 256;
/// Most encoded bytes of commands in one entry (a single larger command goes
/// alone). With [`MAX_PAYLOAD_ENTRIES`] this keeps an AppendEntries message
/// well under the gRPC message limit.
pub const MAX_BYTES: usize = 128 * 1024;
/// Most entries per AppendEntries message (openraft's `max_payload_entries`).
pub const MAX_PAYLOAD_ENTRIES: u64 = 24;
/// Entries being committed at once; the next batch forms while they are.
pub const MAX_IN_FLIGHT: usize = 2;
/// How long a batch waits for handlers already running to add proposals,
/// only while another entry is in flight.
pub const WINDOW: Duration = Duration::from_micros(300);
/// Proposals waiting for the task; a full queue makes proposers wait.
const QUEUE: usize = 8192;

const _: () = assert!(
    (MAX_BYTES as u64) * MAX_PAYLOAD_ENTRIES < (sandfleet_common::limits::MAX_GRPC_MESSAGE_BYTES as u64),
    "an AppendEntries of full batches must fit in one gRPC message"
);

/// What committing one command produced: its response, or Raft's refusal
/// (not the leader, a membership error, Raft stopped).
pub type Committed = Result<CommandResponse, typ::RaftError<typ::ClientWriteError>>;

struct Proposal {
    cmd: Command,
    bytes: usize,
    reply: oneshot::Sender<Result<Committed, CoreError>>,
}

/// The handle proposers use; cheap to clone. The task ends when the last
/// handle is dropped (with the [`crate::core::Core`] that owns it).
#[derive(Clone)]
pub struct Committer {
    queue: mpsc::Sender<Proposal>,
}

impl Committer {
    /// Starts the group-commit task for `raft`: at most `max_commands` (1 to
    /// [`MAX_COMMANDS`]; 1 never batches) per entry, each entry's commit
    /// bounded by `timeout`.
    pub fn start(raft: Raft, timeout: Duration, max_commands: usize) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx, timeout, max_commands.clamp(1, MAX_COMMANDS)));
        Self { queue }
    }

    /// Commits `cmd`, alone or with others, and returns its own response.
    pub async fn commit(&self, cmd: Command) -> Result<Committed, CoreError> {
        let (reply, answer) = oneshot::channel();
        let bytes = encoded_len(&cmd);
        self.queue
            .send(Proposal { cmd, bytes, reply })
            .await
            .map_err(|_| CoreError::RaftStopped("the commit queue is closed".into()))?;
        answer.await.map_err(|_| CoreError::RaftStopped("the commit task stopped".into()))?
    }
}

/// The size of a command in JSON, counted without allocating: the larger of
/// the two encodings an entry may travel in (a member that does not read the
/// binary codec yet is sent JSON), so the byte bounds hold for both.
fn encoded_len(cmd: &Command) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, cmd);
    count.0
}

/// One entry in the making.
struct Batch {
    proposals: Vec<Proposal>,
    bytes: usize,
    max_commands: usize,
}

impl Batch {
    fn new(max_commands: usize) -> Self {
        Self { proposals: Vec::new(), bytes: 0, max_commands }
    }

    fn full(&self) -> bool {
        self.proposals.len() >= self.max_commands || self.bytes >= MAX_BYTES
    }

    /// Adds `p` if it fits; gives it back otherwise.
    fn add(&mut self, p: Proposal) -> Option<Proposal> {
        if self.full() || (!self.proposals.is_empty() && self.bytes + p.bytes > MAX_BYTES) {
            return Some(p);
        }
        self.bytes += p.bytes;
        self.proposals.push(p);
        None
    }

    /// Adds what is queued now; returns a proposal that did not fit.
    fn take_queued(&mut self, queue: &mut mpsc::Receiver<Proposal>) -> Option<Proposal> {
        while !self.full() {
            match queue.try_recv() {
                Ok(p) => {
                    if let Some(back) = self.add(p) {
                        return Some(back);
                    }
                }
                Err(_) => break,
            }
        }
        None
    }
}

async fn run(raft: Raft, mut queue: mpsc::Receiver<Proposal>, timeout: Duration, max_commands: usize) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    // A proposal that did not fit the previous batch starts the next one.
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match queue.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Waits while MAX_IN_FLIGHT entries are being committed; proposals queue meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = Batch::new(max_commands);
        batch.add(first);
        carried = batch.take_queued(&mut queue);
        if carried.is_none() && !batch.full() && slots.available_permits() + 1 < MAX_IN_FLIGHT {
            // Another entry is in flight: let running handlers add theirs, briefly.
            let started = Instant::now();
            while carried.is_none() && !batch.full() && started.elapsed() < WINDOW {
                tokio::task::yield_now().await;
                carried = batch.take_queued(&mut queue);
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write(&raft, batch.proposals, timeout).await;
            drop(slot);
        });
    }
}

/// Proposes one entry and answers each of its proposers.
async fn write(raft: &Raft, proposals: Vec<Proposal>, timeout: Duration) {
    crate::metrics::metrics().commit_batch.record(proposals.len() as u64, &[]);
    let (cmds, replies): (Vec<Command>, Vec<_>) = proposals.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let single = cmds.len() == 1;
    let cmd = if single { cmds.into_iter().next().expect("one command") } else { Command::Batch { commands: cmds } };
    let written = match tokio::time::timeout(timeout, raft.client_write(cmd)).await {
        Ok(w) => w,
        Err(_) => {
            for reply in replies {
                let _ = reply.send(Err(CoreError::WriteTimeout(timeout)));
            }
            return;
        }
    };
    match written {
        Ok(resp) if single => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Ok(Ok(resp.data)));
            }
        }
        Ok(resp) => match resp.data {
            CommandResponse::Batch(responses) if responses.len() == replies.len() => {
                for (reply, response) in replies.into_iter().zip(responses) {
                    let _ = reply.send(Ok(Ok(response)));
                }
            }
            other => {
                let msg = format!("a batch of {} commands was answered with {other:?}", replies.len());
                tracing::error!("{msg}");
                for reply in replies {
                    let _ = reply.send(Err(CoreError::Internal(msg.clone())));
                }
            }
        },
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Ok(Err(e.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposal(bytes: usize) -> Proposal {
        let (reply, _) = oneshot::channel();
        Proposal { cmd: Command::SetSchedulerPaused { paused: false }, bytes, reply }
    }

    #[test]
    fn a_batch_stops_at_its_command_and_byte_bounds() {
        let mut b = Batch::new(MAX_COMMANDS);
        for _ in 0..MAX_COMMANDS {
            assert!(b.add(proposal(10)).is_none());
        }
        assert!(b.full());
        assert!(b.add(proposal(10)).is_some(), "a full batch takes no more");

        let mut b = Batch::new(MAX_COMMANDS);
        assert!(b.add(proposal(MAX_BYTES - 100)).is_none());
        assert!(b.add(proposal(200)).is_some(), "a proposal that would overflow the bytes waits for the next");
        assert!(b.add(proposal(100)).is_none());

        let mut b = Batch::new(MAX_COMMANDS);
        assert!(b.add(proposal(MAX_BYTES * 3)).is_none(), "an oversized command still goes, alone");
        assert!(b.add(proposal(1)).is_some());

        let mut b = Batch::new(1);
        assert!(b.add(proposal(1)).is_none());
        assert!(b.add(proposal(1)).is_some(), "--group-commit 1 never batches");
    }

    #[test]
    fn encoded_len_is_the_json_length() {
        let cmd = Command::RenewSession { id: "s".into(), expires_at_ms: 5, now_ms: 1, tenant: None };
        assert_eq!(encoded_len(&cmd), serde_json::to_vec(&cmd).unwrap().len());
    }
}
