"""The exceptions of the Sandfleet SDK: one class per gRPC status family.

Every error the SDK raises is a :class:`SandfleetError`. An answer from a
coordinator or a node agent becomes the class of its gRPC status code, carrying
the server's own message (``err.message``) and the code (``err.code``)::

    from sandfleet import errors

    try:
        sf.sessions.get("0190c8f2-0000-7000-8000-000000000001")
    except errors.NotFound as e:
        print(e.code.name, e.message)   # NOT_FOUND session ... not found

Families, as the server uses them (see ``proto/sandfleet/v1/sandfleet.proto``):

* :class:`InvalidArgument` (malformed input) and its subclass :class:`OutOfRange`
  (over a documented limit); both are also :class:`ValueError`.
* :class:`NotFound` (unknown id or path), :class:`AlreadyExists` (a request id
  reused with another spec), :class:`FailedPrecondition` (not possible in the
  current state; :class:`SessionEnded` when a session the call needs has ended).
* :class:`Unauthenticated`, :class:`PermissionDenied`, :class:`ResourceExhausted`
  (no node could ever fit it, or a tenant quota).
* :class:`Unavailable` (no coordinator or agent answered, after the SDK's
  retries), :class:`DeadlineExceeded` (the call's deadline passed; also a
  client-side wait that ran out), :class:`Cancelled`, :class:`Aborted`.
* :class:`Internal`, :class:`Unknown`, :class:`Unimplemented`, :class:`DataLoss`.
"""

from __future__ import annotations

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "SandfleetError",
    "SessionEnded",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "from_rpc_error",
]


class SandfleetError(Exception):
    """Base class of every error the SDK raises.

    Attributes:
        code: The gRPC status code this error stands for.
        message: The server's message (or the SDK's, for errors raised before
            or without an answer).
        from_server: True when a coordinator or a node agent answered with this status.
    """

    #: The status code of the class; instances carry theirs in ``code``.
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, from_server: bool = False) -> None:
        """An error with the server's (or the SDK's) message and its status code."""
        super().__init__(message)
        self.message: str = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.from_server: bool = from_server

    @property
    def code_name(self) -> str:
        """The code as the gRPC spec names it: ``NOT_FOUND``, ``UNAVAILABLE``, ..."""
        return str(self.code.name)

    def __str__(self) -> str:
        """``NOT_FOUND: session ... not found``, as the Rust SDK and the CLI print it."""
        return f"{self.code_name}: {self.message}"

    def __repr__(self) -> str:
        """The class, code and message."""
        return f"{type(self).__name__}({self.message!r}, code={self.code_name})"


class Cancelled(SandfleetError):
    """CANCELLED: the call was cancelled (usually by the caller)."""

    default_code = grpc.StatusCode.CANCELLED


class Unknown(SandfleetError):
    """UNKNOWN: an error the server did not classify."""

    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgument(SandfleetError, ValueError):
    """INVALID_ARGUMENT: malformed input (a bad label, path, quantity or spec).

    Also raised before sending, for arguments the SDK can tell are wrong.
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(InvalidArgument):
    """OUT_OF_RANGE: a value over a documented limit (memory, ttl, timeout, ...)."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class DeadlineExceeded(SandfleetError):
    """DEADLINE_EXCEEDED: the call's deadline passed, or a wait for a session ran out."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(SandfleetError):
    """NOT_FOUND: an unknown session id, a missing file, or another tenant's session."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SandfleetError):
    """ALREADY_EXISTS: a request id reused with a different spec (use a new id)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(SandfleetError):
    """PERMISSION_DENIED: the caller's role may not make this call."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SandfleetError):
    """RESOURCE_EXHAUSTED: no node could ever fit the session, or a tenant quota is full."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(SandfleetError):
    """FAILED_PRECONDITION: not possible in the current state (e.g. no durable store)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class SessionEnded(FailedPrecondition):
    """A session the call needs is TERMINATED or FAILED.

    Attributes:
        session_id: The session.
        state: Its terminal state, ``"TERMINATED"`` or ``"FAILED"``.
    """

    def __init__(self, session_id: str, state: str, detail: str) -> None:
        """The session ``session_id`` ended in ``state``; ``detail`` is the server's reason."""
        text = f"session {session_id} ended in state {state}"
        if detail:
            text += f": {detail}"
        super().__init__(text)
        self.session_id = session_id
        self.state = state


class Aborted(SandfleetError):
    """ABORTED: the operation was aborted (e.g. an upload that cannot be replayed)."""

    default_code = grpc.StatusCode.ABORTED


class Unimplemented(SandfleetError):
    """UNIMPLEMENTED: the server does not offer this call (an older server)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class Internal(SandfleetError):
    """INTERNAL: the server failed, or broke the protocol."""

    default_code = grpc.StatusCode.INTERNAL


class Unavailable(SandfleetError):
    """UNAVAILABLE: no coordinator or node agent could answer (after the SDK's retries)."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DataLoss(SandfleetError):
    """DATA_LOSS: unrecoverable data loss or corruption."""

    default_code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(SandfleetError):
    """UNAUTHENTICATED: a missing, wrong or expired API key or session token."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[SandfleetError]] = {
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNKNOWN: Unknown,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_class(code: grpc.StatusCode) -> type[SandfleetError]:
    """The exception class of a gRPC status code."""
    return _BY_CODE.get(code, Unknown)


def from_rpc_error(err: grpc.RpcError, context: str = "", *, from_server: bool = True) -> SandfleetError:
    """The SDK exception for a failed gRPC call, keeping the server's message.

    ``context`` (e.g. the endpoint tried) is appended to UNAVAILABLE errors,
    which the transport rather than a server often makes up (connection failures).
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = details_fn() if callable(details_fn) else None
    message = str(details) if details else str(err)
    if context and code == grpc.StatusCode.UNAVAILABLE:
        message = f"{message} ({context})"
    return error_class(code)(message, code=code, from_server=from_server)
