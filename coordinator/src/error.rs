//! [`CoreError`]: what can go wrong in the coordinator's core (proposals,
//! forwarding, read barriers) and its leader loop. It is mapped to a gRPC
//! status in one place, in [`crate::service`], with the codes callers relied
//! on before: a retryable condition is UNAVAILABLE, a refused membership
//! change FAILED_PRECONDITION, a broken invariant INTERNAL.

/// An error of the coordinator's core.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// No leader is known right now.
    #[error("no coordinator leader is elected right now; retry shortly")]
    NoLeader,
    /// The leader loop's write reached a member that no longer leads.
    #[error("this coordinator is no longer the leader; the new leader decides afresh")]
    NotLeader,
    /// A write did not commit in time: the member may be cut off from its quorum.
    #[error(
        "the write did not commit within {0:?}: this coordinator may be cut off from its quorum; retry, preferably on \
         another coordinator (creates are idempotent on their request id)"
    )]
    WriteTimeout(std::time::Duration),
    /// A read found no quorum in time.
    #[error("no quorum confirmed the read within {0:?}; retry on another coordinator")]
    ReadTimeout(std::time::Duration),
    /// Retryable: forwarding to the leader failed, leadership moved, or the
    /// leader could not confirm a read; the text says which.
    #[error("{0}")]
    Unavailable(String),
    /// This member could not catch up with the leader's read index.
    #[error("this coordinator is lagging: {0}")]
    Lagging(String),
    /// Raft itself stopped.
    #[error("raft stopped: {0}")]
    RaftStopped(String),
    /// A membership change was refused.
    #[error("{0}")]
    Membership(String),
    /// Something that should not happen (a bad peer address, an undecodable answer).
    #[error("{0}")]
    Internal(String),
}
