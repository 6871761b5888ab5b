//! The one error type of the SDK, and the names of gRPC codes as the wire spells them.

use crate::proto;
use crate::session::state_name;

/// Everything an SDK call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server (a coordinator or a node agent) answered with a gRPC status.
    /// Displayed as `NOT_FOUND: session ... not found`. (The status is not
    /// also reported as the error's `source`, so error reporters that print
    /// causes do not repeat the message.)
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    /// No coordinator or agent could be reached (after every retry), or an
    /// endpoint address is malformed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint tried last, as a URI.
        endpoint: String,
        /// Why the connection failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A client-side wait ran out (for example [`Client::wait_running`](crate::Client::wait_running)).
    #[error("timed out: {0}")]
    Timeout(String),
    /// The session reached a terminal state (FAILED or TERMINATED) while the
    /// caller needed it running.
    #[error("session {id} ended in state {}: {message}", state_name(*.state as i32))]
    SessionFailed {
        /// The session id.
        id: String,
        /// The terminal state it reached.
        state: proto::SessionState,
        /// The server's explanation (`Session.message`).
        message: String,
    },
    /// A replica of a batch reached a terminal state (or the batch was
    /// deleted) while the caller waited for all of them to run.
    #[error("batch {id} will not be all running: {failed} replicas failed, {terminated} terminated{}", if *.deleted { " (the batch was deleted)" } else { "" })]
    BatchFailed {
        /// The batch id.
        id: String,
        /// Replicas FAILED.
        failed: u32,
        /// Replicas TERMINATED.
        terminated: u32,
        /// Whether the batch was deleted.
        deleted: bool,
    },
    /// The caller passed something the SDK refuses before sending it.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The server broke the protocol, e.g. an exec stream ended without an exit status.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The TLS files given to the client cannot be used (unreadable, not PEM,
    /// not a Sandfleet certificate).
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// Local I/O failed (reading an upload, for instance).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Status(status)
    }
}

impl Error {
    /// The gRPC code this error stands for: the server's code for [`Error::Status`],
    /// `UNAVAILABLE` for [`Error::Connect`], `DEADLINE_EXCEEDED` for [`Error::Timeout`],
    /// `FAILED_PRECONDITION` for [`Error::SessionFailed`], `INVALID_ARGUMENT` for
    /// [`Error::InvalidArgument`], `INTERNAL` for [`Error::Protocol`]; `None` for local TLS and I/O errors.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Status(s) => Some(s.code()),
            Error::Connect { .. } => Some(tonic::Code::Unavailable),
            Error::Timeout(_) => Some(tonic::Code::DeadlineExceeded),
            Error::SessionFailed { .. } | Error::BatchFailed { .. } => Some(tonic::Code::FailedPrecondition),
            Error::InvalidArgument(_) => Some(tonic::Code::InvalidArgument),
            Error::Protocol(_) => Some(tonic::Code::Internal),
            Error::Tls(_) | Error::Io(_) => None,
        }
    }

    /// True when the server answered `NOT_FOUND`.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Status(s) if s.code() == tonic::Code::NotFound)
    }
}

/// The canonical name of a gRPC code, as in the gRPC spec: `NOT_FOUND`, `UNAVAILABLE`, ...
pub use sandfleet_common::grpc::code_name;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_uses_wire_code_names() {
        let e = Error::from(tonic::Status::not_found("session x not found"));
        assert_eq!(e.to_string(), "NOT_FOUND: session x not found");
        assert_eq!(e.code(), Some(tonic::Code::NotFound));
        assert!(e.is_not_found());
        assert!(std::error::Error::source(&e).is_none(), "the message must not repeat in the cause chain");

        let e = Error::SessionFailed {
            id: "s1".into(),
            state: proto::SessionState::Failed,
            message: "image missing".into(),
        };
        assert_eq!(e.to_string(), "session s1 ended in state FAILED: image missing");
        assert_eq!(Error::Timeout("x".into()).code(), Some(tonic::Code::DeadlineExceeded));
        assert_eq!(Error::Io(std::io::Error::other("x")).code(), None);
    }
}
