"""What the synchronous and the asyncio clients share: requests, retry rules and conversions.

Retry rules (the Rust SDK's, ``client/src/retry.rs`` and ``client.rs``):

* Control-plane calls go to the coordinators. Every session call is idempotent
  (a create carries its request id, a delete of a deleted session succeeds), so
  one that fails with UNAVAILABLE, a broken connection, or its attempt's deadline
  is sent again, to the next coordinator, after a jittered exponential backoff
  (full jitter, 50 ms doubling up to 2 s), within the call's own deadline. The
  coordinators forward writes to the Raft leader themselves; a coordinator that
  cannot (no leader yet, or the leader just died) answers UNAVAILABLE, and the
  SDK moves on. Every other answer is returned at once. Where the Rust SDK stops
  after ``max_retries`` in every case, this one stops after ``max_retries`` only
  while no coordinator can be reached at all; while some answer (an election in
  progress) it keeps trying until the call's deadline, so a leader crash costs
  a create time, never its outcome.
* Data-plane calls go straight to the agent in ``Session.node_address`` with the
  session token. When the agent refuses the token (UNAUTHENTICATED), does not
  have the session (NOT_FOUND "not running on node"), or cannot be reached
  (UNAVAILABLE), the SDK reads the session again, waits for it to run if it is
  being placed again, and repeats the call on its (new) node -- when the call is
  safe to repeat. An exec is repeated only when it provably never started (the
  agent was unreachable, or refused it before starting); once a command may
  have started it is never sent again.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Mapping, Sequence

import grpc

from . import _units
from ._proto import sandfleet_pb2 as pb
from .errors import InvalidArgument
from .types import Language, SessionState

#: Most bytes per WriteFile message.
WRITE_CHUNK_BYTES = 1024 * 1024
#: The server's default exec timeout (seconds), when the caller gives none.
DEFAULT_EXEC_TIMEOUT = 30.0
#: How much longer an exec's gRPC deadline is than the command's own timeout,
#: so the agent can kill the command and report it.
EXEC_DEADLINE_SLACK = 60.0
#: Default deadline of an upload or a download (seconds).
DEFAULT_TRANSFER_TIMEOUT = 600.0
#: Default deadline of a sync or a download URL (a sync may upload a lot).
DEFAULT_SYNC_TIMEOUT = 300.0
#: Default wait for a new session to be RUNNING (seconds).
DEFAULT_WAIT_TIMEOUT = 120.0
#: How much longer a WatchSession may live on the server than the wait itself.
WATCH_SLACK = 2.0
#: Most times one data-plane call follows its session to a new placement.
MAX_FOLLOWS = 8

Metadata = tuple[tuple[str, str], ...]


class Backoff:
    """Exponential backoff with full jitter: before retry ``n`` sleep ``U[0, min(cap, base * 2**n)]``."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        """50 ms doubling up to 2 s by default, as the Rust SDK."""
        self.base = base
        self.cap = cap

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry ``attempt`` (0-based)."""
        return min(self.cap, self.base * (2.0 ** min(attempt, 62)))

    def delay(self, attempt: int) -> float:
        """A random wait before retry ``attempt``."""
        return random.uniform(0.0, self.ceiling(attempt))


def code_of(err: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call."""
    fn = getattr(err, "code", None)
    code = fn() if callable(fn) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def details_of(err: grpc.RpcError) -> str:
    """The message of a failed call."""
    fn = getattr(err, "details", None)
    d = fn() if callable(fn) else None
    return str(d) if d else ""


# The transport's words for a connection that could not be made: the request
# never left this process.
_CONNECT_FAILURE = re.compile(
    r"failed to connect to all addresses|Failed to connect to remote host|connections to all backends failing"
    r"|DNS resolution failed|Name resolution failure|Connection refused|No route to host|Network is unreachable"
    r"|Connect Failed|connect\(\) failed|Handshake failed|Socket closed before connect",
    re.IGNORECASE,
)
# An agent's words for a call it refused before doing anything (its data plane).
_AGENT_NOT_STARTED = re.compile(
    r"the command was not started|is still starting; retry|has not registered with the cluster yet"
)


def is_connect_failure(err: grpc.RpcError) -> bool:
    """UNAVAILABLE because no connection could be made: the call never reached a server."""
    return code_of(err) == grpc.StatusCode.UNAVAILABLE and bool(_CONNECT_FAILURE.search(details_of(err)))


def never_started(err: grpc.RpcError) -> bool:
    """The agent provably did not start the call: unreachable, or it said so."""
    if code_of(err) != grpc.StatusCode.UNAVAILABLE:
        return False
    d = details_of(err)
    return bool(_CONNECT_FAILURE.search(d) or _AGENT_NOT_STARTED.search(d))


def control_retryable(err: grpc.RpcError, deadline_left: bool) -> bool:
    """Whether a control-plane call may go to the next coordinator.

    UNAVAILABLE (the coordinator is down, or has no leader to forward to) and a
    broken connection always; DEADLINE_EXCEEDED when the call's own deadline
    has not passed (the attempt's did: the coordinator hung).
    """
    code = code_of(err)
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return deadline_left
    # A peer killed mid-call can surface as UNKNOWN/INTERNAL with a transport message.
    if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        return bool(re.search(r"Socket closed|Connection reset|Broken pipe|GOAWAY|Stream removed", details_of(err)))
    return False


def follow_hint(err: grpc.RpcError) -> bool:
    """Whether a data-plane failure may mean the session's token or placement changed.

    UNAUTHENTICATED (token expired, or for an older placement or another node),
    NOT_FOUND "not running on node" (the agent no longer has the session),
    UNAVAILABLE (the agent is down, starting the session, or shutting down).
    """
    code = code_of(err)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE):
        return True
    return code == grpc.StatusCode.NOT_FOUND and "is not running on node" in details_of(err)


def placement(s: pb.Session) -> tuple[str, str, int]:
    """Where a session runs: (node id, node address, generation)."""
    return (s.node_id, s.node_address, s.generation)


def same_placement(a: pb.Session, b: pb.Session) -> bool:
    """Whether two records of a session are of the same placement (a token of one is valid for the other)."""
    return a.id == b.id and bool(a.node_id) and a.node_id == b.node_id and a.generation == b.generation


def new_request_id() -> str:
    """A fresh request id, ``sdk-<uuid4>`` (as the Rust SDK makes them)."""
    return f"sdk-{uuid.uuid4()}"


def create_request(request_id: str, spec: pb.SessionSpec, pool: str | None) -> pb.CreateSessionRequest:
    """The CreateSession request: with ``pool``, a claim (the spec must be empty)."""
    if pool is None:
        return pb.CreateSessionRequest(request_id=request_id, spec=spec)
    if spec != pb.SessionSpec():
        raise InvalidArgument("invalid spec: give a spec or a pool, not both (a pool's sandboxes run the pool's spec)")
    return pb.CreateSessionRequest(request_id=request_id, pool=pool)


def build_spec(
    *,
    template: str | None,
    memory: _units.Memory | None,
    cpu: _units.Cpu | None,
    cpu_request: _units.Cpu | None,
    ttl: _units.Duration | None,
    labels: Mapping[str, str] | None,
    env: Mapping[str, str] | None,
    pids: int | None,
    disk: _units.Memory | None,
    disk_inodes: int | None,
    idle_timeout: _units.Duration | None,
    node_selector: Mapping[str, str] | None,
    runtime: str | None,
    lost_after: _units.Duration | None,
    max_attempts: int | None,
    restart_backoff: _units.Duration | None,
) -> pb.SessionSpec:
    """The wire spec; unset values take the server defaults (see the proto)."""
    spec = pb.SessionSpec()
    if template is not None:
        spec.template = template
    if memory is not None:
        spec.memory_bytes = _units.parse_memory(memory, "memory")
    if cpu is not None:
        spec.cpu_millis = _units.parse_cpu(cpu, "cpu")
    if cpu_request is not None:
        spec.cpu_request_millis = _units.parse_cpu(cpu_request, "cpu_request")
    if ttl is not None:
        spec.ttl_seconds = _units.ceil_seconds(ttl, "ttl")
    if pids is not None:
        spec.pids_limit = _int(pids, "pids")
    if disk is not None:
        spec.disk_bytes = _units.parse_memory(disk, "disk")
    if disk_inodes is not None:
        spec.disk_inodes = _int(disk_inodes, "disk_inodes")
    if idle_timeout is not None:
        spec.idle_timeout_seconds = _units.ceil_seconds(idle_timeout, "idle_timeout")
    if runtime is not None:
        spec.runtime = runtime
    for target, source, what in ((spec.labels, labels, "labels"), (spec.env, env, "env")):
        _fill(target, source, what)
    _fill(spec.node_selector, node_selector, "node_selector")
    if lost_after is not None or max_attempts is not None or restart_backoff is not None:
        if lost_after is not None:
            spec.restart_policy.lost_after_ms = _units.millis(lost_after, "lost_after")
        if max_attempts is not None:
            spec.restart_policy.max_attempts = _int(max_attempts, "max_attempts")
        if restart_backoff is not None:
            spec.restart_policy.backoff_ms = _units.millis(restart_backoff, "restart_backoff")
    return spec


def _int(v: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise InvalidArgument(f"{what} must be a non-negative int, not {v!r}")
    return v


def _fill(target: Mapping[str, str], source: Mapping[str, str] | None, what: str) -> None:
    if source is None:
        return
    for k, v in source.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"{what} keys and values must be strings, not {k!r}: {v!r}")
        target[k] = v  # type: ignore[index]


def check_request_id(request_id: str) -> str:
    """The request id if it has the server's shape (1-128 of ``[A-Za-z0-9._:-]``)."""
    if not isinstance(request_id, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", request_id):
        raise InvalidArgument(
            f"invalid request_id {request_id!r}: 1-128 characters of [A-Za-z0-9._:-], unique per logical create"
        )
    return request_id


def exec_request(
    session_id: str,
    argv: Sequence[str],
    *,
    code: str | None = None,
    language: str | Language | None = None,
    timeout: _units.Duration | None,
    env: Mapping[str, str] | None,
    stdin: bytes | str | None,
    workdir: str | None,
) -> tuple[pb.ExecRequest, float]:
    """The wire request and the gRPC deadline (the command's timeout plus slack)."""
    req = pb.ExecRequest(session_id=session_id)
    if code is not None:
        if not isinstance(code, str):
            raise InvalidArgument("code must be a str")
        req.code.code = code
        req.code.language = Language.parse(language or Language.PYTHON).to_proto()  # type: ignore[assignment]
    else:
        if not argv:
            raise InvalidArgument("an exec needs a command: exec('python3', '-c', 'print(1)')")
        for a in argv:
            if not isinstance(a, str):
                raise InvalidArgument(f"argv entries must be strings, not {a!r}")
        req.argv.argv.extend(argv)
    command_timeout = DEFAULT_EXEC_TIMEOUT
    if timeout is not None:
        req.timeout_ms = _units.millis(timeout, "timeout")
        command_timeout = req.timeout_ms / 1000.0
    _fill(req.env, env, "env")
    if stdin is not None:
        req.stdin = stdin.encode("utf-8") if isinstance(stdin, str) else bytes(stdin)
    if workdir:
        req.workdir = workdir
    return req, command_timeout + EXEC_DEADLINE_SLACK


def list_request(
    labels: Mapping[str, str] | None,
    state: str | SessionState | Sequence[str | SessionState] | None,
    page_size: int | None,
    tenant: str | None,
) -> pb.ListSessionsRequest:
    """The first page's request."""
    req = pb.ListSessionsRequest()
    _fill(req.label_selector, labels, "labels")
    if state is not None:
        states = [state] if isinstance(state, (str, SessionState)) else list(state)
        req.states.extend(SessionState.parse(s).to_proto() for s in states)  # type: ignore[misc]
    if page_size is not None:
        req.page_size = _int(page_size, "page_size")
    if tenant:
        req.tenant = tenant
    return req


def check_path(path: str) -> str:
    """A workspace path the SDK will send (the agent checks the rest)."""
    if not isinstance(path, str) or not path:
        raise InvalidArgument("the file path must be a non-empty str, relative to the workspace root")
    return path


def waiting_message(session_id: str, waited: float, last: pb.Session | None) -> str:
    """Why a wait for RUNNING ran out, naming the last state and pending reason."""
    msg = f"session {session_id} is not running after {waited:.1f}s"
    if last is not None:
        msg += f" (state {SessionState.from_proto(last.state).value}"
        if last.pending_reason:
            msg += f": {last.pending_reason}"
        msg += ")"
    return msg


class Deadline:
    """A point in time a call must end by."""

    __slots__ = ("at", "total")

    def __init__(self, seconds: float) -> None:
        """``seconds`` from now."""
        self.total = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left (never negative)."""
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        """True once the deadline passed."""
        return time.monotonic() >= self.at


def timeout_of(value: _units.Duration | None, default: float, what: str = "timeout") -> float:
    """A call's deadline in seconds: ``value`` or the default."""
    if value is None:
        return default
    t = _units.parse_duration(value, what)
    if t <= 0:
        raise InvalidArgument(f"{what} must be positive, not {value!r}")
    return t
