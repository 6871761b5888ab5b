"""The synchronous client: :class:`Sandfleet`, its sessions, exec and files.

One :class:`Sandfleet` may be shared by any number of threads: its channels
(one per coordinator and per node agent, made on first use) are thread-safe,
and a :class:`Session` replaces its record whole when it refreshes it.
"""

from __future__ import annotations

import builtins
import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import (
    IO,
    Any,
    TypeVar,
)

import grpc

from . import _common as c
from . import _config, _units
from ._base import SessionFields
from ._proto import sandfleet_pb2 as pb
from ._rpc import Control, Data
from .errors import (
    Aborted,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    SandfleetError,
    SessionEnded,
    from_rpc_error,
)
from .types import (
    DiskUsage,
    DownloadUrl,
    ExecEvent,
    ExecResult,
    Exit,
    FileEntry,
    Language,
    SessionState,
    Stderr,
    Stdout,
    SyncResult,
    WriteResult,
    ms_to_datetime,
)

T = TypeVar("T")

#: What an upload takes: bytes, text (UTF-8), a binary or text file object,
#: or an iterable of byte chunks.
UploadData = bytes | bytearray | memoryview | str | IO[bytes] | IO[str] | Iterable[bytes]


class Sandfleet:
    """A client of a Sandfleet cluster (synchronous; :class:`AsyncSandfleet` is the asyncio twin).

    Configuration comes from the arguments, else from the environment as the
    CLI reads it: ``SANDFLEET_ENDPOINT`` (comma-separated coordinators, default
    ``127.0.0.1:7070``), ``SANDFLEET_API_KEY``, ``SANDFLEET_TLS_CA``,
    ``SANDFLEET_TLS_CERT`` and ``SANDFLEET_TLS_KEY``.

    Args:
        endpoint: Coordinator endpoints: ``"host:port"``, ``"a:1,b:2"`` or a list.
        api_key: An API key (``sfk_...``) for control-plane calls.
        tls_ca: The cluster CA certificate (PEM file): speak TLS.
        tls_cert: A client certificate (PEM file) for mutual TLS; needs ``tls_key``.
        tls_key: The client certificate's key (PEM file).
        timeout: Default deadline of control-plane calls, retries included (30 s).
        attempt_timeout: Deadline of each attempt on one coordinator (10 s).
        max_retries: How often a call that may be repeated is retried when no
            coordinator can be reached at all (8). While some coordinator answers
            (UNAVAILABLE during a leader election, say) it is retried until its deadline.

    Connections are made lazily: constructing a client never blocks.
    ``with Sandfleet() as sf:`` closes its channels on exit.
    """

    def __init__(
        self,
        endpoint: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        tls_ca: _config.PathLike | None = None,
        tls_cert: _config.PathLike | None = None,
        tls_key: _config.PathLike | None = None,
        timeout: float | None = None,
        attempt_timeout: float | None = None,
        max_retries: int | None = None,
    ) -> None:
        """A client configured from the arguments and the environment."""
        self._config = _config.resolve(
            endpoint,
            api_key=api_key,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            timeout=timeout,
            attempt_timeout=attempt_timeout,
            max_retries=max_retries,
        )
        self._md: c.Metadata = self._config.control_metadata()
        self._lock = threading.Lock()
        self._control: dict[int, Control] = {}
        self._data: dict[str, Data] = {}
        self._preferred = 0
        self._backoff = c.Backoff()
        self._closed = False
        #: Creating, reading, listing and deleting sessions.
        self.sessions = Sessions(self)

    # -- lifecycle -----------------------------------------------------------

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The coordinator endpoints this client uses (``host:port``)."""
        return self._config.endpoints

    @property
    def timeout(self) -> float:
        """The default deadline of control-plane calls, in seconds."""
        return self._config.timeout

    def close(self) -> None:
        """Closes every channel. Calls made afterwards fail."""
        with self._lock:
            self._closed = True
            channels = [s.channel for s in self._control.values()] + [s.channel for s in self._data.values()]
            self._control.clear()
            self._data.clear()
        for ch in channels:
            ch.close()

    def __enter__(self) -> Sandfleet:
        """The client itself."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Closes the client."""
        self.close()

    def __repr__(self) -> str:
        """The endpoints."""
        return f"<Sandfleet {','.join(self.endpoints)}>"

    # -- channels --------------------------------------------------------------

    def _channel(self, target: str) -> grpc.Channel:
        opts = list(self._config.channel_options)
        if self._config.tls is not None:
            return grpc.secure_channel(target, self._config.tls.credentials(), options=opts)
        return grpc.insecure_channel(target, options=opts)

    def _control_stub(self, idx: int) -> Control:
        with self._lock:
            if self._closed:
                raise InvalidArgument("the client is closed")
            stub = self._control.get(idx)
            if stub is None:
                stub = Control(self._channel(self._config.endpoints[idx]))
                self._control[idx] = stub
            return stub

    def _data_stub(self, address: str) -> Data:
        target = _config.normalize_endpoint(address)
        with self._lock:
            if self._closed:
                raise InvalidArgument("the client is closed")
            stub = self._data.get(target)
            if stub is None:
                stub = Data(self._channel(target))
                self._data[target] = stub
            return stub

    # -- control plane -----------------------------------------------------------

    def _call(self, op: str, fn: Callable[[Control, float], T], timeout: float | None) -> T:
        """One control-plane call with failover across the coordinators (see ``_common``)."""
        deadline = c.Deadline(timeout if timeout is not None else self._config.timeout)
        n = len(self._config.endpoints)
        start = self._preferred % n
        attempt = 0
        # Whether some coordinator answered (UNAVAILABLE: no leader yet, say):
        # the cluster is alive, so the call keeps trying until its deadline;
        # when none can even be reached, it gives up after max_retries.
        answered = False
        last: tuple[grpc.RpcError, int] | None = None
        while True:
            idx = (start + attempt) % n
            stub = self._control_stub(idx)
            attempt_timeout = min(deadline.left(), self._config.attempt_timeout)
            if attempt_timeout <= 0.01:
                if last is not None:
                    raise self._control_error(last[0], op, last[1], deadline) from None
                raise DeadlineExceeded(f"{op}: no time left of its {deadline.total:g}s deadline", from_server=False)
            try:
                result = fn(stub, attempt_timeout)
            except grpc.RpcError as e:
                retry = c.control_retryable(e, deadline_left=deadline.left() > 0.01)
                answered = answered or not c.is_connect_failure(e)
                last = (e, idx)
                out_of_retries = attempt >= self._config.max_retries and not answered
                if not retry or out_of_retries or deadline.left() <= 0.01:
                    raise self._control_error(e, op, idx, deadline) from None
                self._preferred = (idx + 1) % n
                time.sleep(min(self._backoff.delay(attempt), deadline.left()))
                attempt += 1
                continue
            self._preferred = idx
            return result

    def _control_error(self, e: grpc.RpcError, op: str, idx: int, deadline: c.Deadline) -> SandfleetError:
        if c.code_of(e) == grpc.StatusCode.DEADLINE_EXCEEDED and deadline.left() <= 0.01:
            return DeadlineExceeded(
                f"{op}: no answer within {deadline.total:.1f}s (last tried {self._config.endpoints[idx]}): "
                f"{c.details_of(e)}",
                from_server=False,
            )
        return from_rpc_error(e, f"coordinator {self._config.endpoints[idx]}", from_server=not c.is_connect_failure(e))

    def _create(self, req: pb.CreateSessionRequest, timeout: float | None) -> pb.CreateSessionResponse:
        return self._call("create_session", lambda s, t: s.create(req, timeout=t, metadata=self._md), timeout)

    def _get(self, session_id: str, timeout: float | None = None) -> pb.Session:
        req = pb.GetSessionRequest(id=session_id)
        resp = self._call("get_session", lambda s, t: s.get(req, timeout=t, metadata=self._md), timeout)
        return resp.session

    def _delete(self, session_id: str, timeout: float | None = None) -> pb.Session:
        req = pb.DeleteSessionRequest(id=session_id)
        resp = self._call("delete_session", lambda s, t: s.delete(req, timeout=t, metadata=self._md), timeout)
        return resp.session

    def _renew(self, session_id: str, ttl_seconds: int, timeout: float | None) -> pb.Session:
        req = pb.RenewSessionRequest(id=session_id, ttl_seconds=ttl_seconds)
        resp = self._call("renew_session", lambda s, t: s.renew(req, timeout=t, metadata=self._md), timeout)
        return resp.session

    def _list_page(self, req: pb.ListSessionsRequest, timeout: float | None) -> pb.ListSessionsResponse:
        return self._call("list_sessions", lambda s, t: s.list(req, timeout=t, metadata=self._md), timeout)

    def _running(self, s: pb.Session, timeout: float, known: pb.Session | None) -> pb.Session | None:
        """The session with a token once RUNNING; raises once terminal; None to keep waiting.

        Watch events carry no token. A token the caller already holds for the
        same placement (node and generation: a create's, placed at once) is
        valid for it; otherwise the session is read again for a fresh one.
        """
        state = SessionState.from_proto(s.state)
        if state.terminal:
            raise SessionEnded(s.id, state.value, s.message)
        if state is not SessionState.RUNNING:
            return None
        if not s.token and known is not None and known.token and c.same_placement(known, s):
            full = pb.Session()
            full.CopyFrom(s)
            full.token = known.token
            return full if full.node_address else None
        full = s if s.token else self._get(s.id, timeout=max(timeout, 0.5))
        state = SessionState.from_proto(full.state)
        if state.terminal:
            raise SessionEnded(full.id, state.value, full.message)
        return full if state is SessionState.RUNNING and full.node_address else None

    def _wait_running(self, session_id: str, timeout: float, known: pb.Session | None = None) -> pb.Session:
        """Follows WatchSession until the session is RUNNING (GetSession polling on older servers)."""
        deadline = c.Deadline(timeout)
        last: pb.Session | None = None
        attempt = 0
        poll = False
        n = len(self._config.endpoints)
        while True:
            if deadline.expired():
                raise DeadlineExceeded(c.waiting_message(session_id, deadline.total, last), from_server=False)
            if poll:
                s = self._get(session_id, timeout=min(deadline.left(), self._config.attempt_timeout))
                done = self._running(s, deadline.left(), known)
                if done is not None:
                    return done
                last = s
                time.sleep(min(0.25, deadline.left()))
                continue
            idx = self._preferred % n
            stub = self._control_stub(idx)
            call: Any = stub.watch(pb.WatchSessionRequest(id=session_id), timeout=deadline.left(), metadata=self._md)
            try:
                for ev in call:
                    attempt = 0
                    done = self._running(ev.session, deadline.left(), known)
                    if done is not None:
                        call.cancel()
                        return done
                    last = ev.session
                # The server ended the watch (e.g. shutting down): open it again.
            except grpc.RpcError as e:
                code = c.code_of(e)
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    poll = True
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline.left() <= 0.05:
                    raise DeadlineExceeded(
                        c.waiting_message(session_id, deadline.total, last), from_server=False
                    ) from None
                # As for other calls: give up after max_retries only when no coordinator can be reached.
                unreachable = attempt >= self._config.max_retries and c.is_connect_failure(e)
                if not c.control_retryable(e, deadline_left=True) or unreachable:
                    raise from_rpc_error(e, f"coordinator {self._config.endpoints[idx]}") from None
                self._preferred = (idx + 1) % n
            time.sleep(min(self._backoff.delay(attempt), deadline.left()))
            attempt += 1


class Sessions:
    """Session management of a :class:`Sandfleet` client: ``sf.sessions``."""

    def __init__(self, client: Sandfleet) -> None:
        """The sessions of ``client``."""
        self._client = client

    def create(
        self,
        template: str | None = None,
        memory: _units.Memory | None = None,
        cpu: _units.Cpu | None = None,
        ttl: _units.Duration | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        wait: bool = True,
        *,
        env: Mapping[str, str] | None = None,
        cpu_request: _units.Cpu | None = None,
        pids: int | None = None,
        disk: _units.Memory | None = None,
        disk_inodes: int | None = None,
        idle_timeout: _units.Duration | None = None,
        node_selector: Mapping[str, str] | None = None,
        runtime: str | None = None,
        lost_after: _units.Duration | None = None,
        max_attempts: int | None = None,
        restart_backoff: _units.Duration | None = None,
        pool: str | None = None,
        timeout: _units.Duration | None = None,
        wait_timeout: _units.Duration | None = None,
    ) -> Session:
        """Creates a session and, with ``wait=True`` (the default), waits until it is RUNNING.

        Creates are idempotent: every retry of this call (after UNAVAILABLE or
        a coordinator's deadline, each on the next coordinator) carries the
        same ``request_id`` (a fresh ``sdk-<uuid>`` unless given), so a leader
        crash during ``create()`` never yields two sessions. Calling again
        with the same ``request_id`` and spec returns the same session
        (``existing`` is then True); with another spec it is
        :class:`~sandfleet.errors.AlreadyExists`.

        Args:
            template: ``"default"``, ``"python"``, ``"node"`` or ``"bash"``.
            memory: Memory limit: bytes or ``"512Mi"`` (default 512 MiB).
            cpu: CPU limit in cores (``0.5``) or ``"500m"`` (default 1 core).
            ttl: Time to live: seconds, ``timedelta`` or ``"1h"`` (default 1 h).
            labels: Labels for selection and listing.
            request_id: The idempotency key, 1-128 of ``[A-Za-z0-9._:-]``.
            wait: Wait until the session is RUNNING before returning.
            env: Environment variables given to every exec.
            cpu_request: CPU reserved on the node for placement (at most ``cpu``).
            pids: Most processes and threads (default 128).
            disk: Disk quota: bytes or ``"1Gi"`` (default 1 GiB).
            disk_inodes: Most files, directories and symlinks.
            idle_timeout: End the session after this long without exec or file calls.
            node_selector: Run only on nodes carrying every one of these labels.
            runtime: ``"process"``, ``"docker"`` or ``"cri"`` (default: any offering the template).
            lost_after: Node silence after which the session is placed elsewhere.
            max_attempts: Placements allowed after losing a node before it fails (0: unlimited).
            restart_backoff: Delay before placing a lost session again.
            pool: Claim an idle sandbox of this warm pool instead: RUNNING at
                once (``session.claimed``), or started cold from the pool's spec
                when the pool has none idle (``session.message`` says so). No
                spec argument may be given with it.
            timeout: Deadline of the create call, retries included (default: the client's).
            wait_timeout: How long to wait for RUNNING (default 120 s).

        Raises:
            ResourceExhausted: No node could ever fit the spec, or a tenant quota is full.
            InvalidArgument: A malformed spec (OutOfRange: over a limit).
            SessionEnded: The session FAILED while we waited.
            DeadlineExceeded: It was not RUNNING within ``wait_timeout``. A
                session whose request id the SDK chose is deleted then (nobody
                else could find it); one with your ``request_id`` is kept, and
                a create with the same id resumes the wait.
        """
        client = self._client
        spec = c.build_spec(
            template=template,
            memory=memory,
            cpu=cpu,
            cpu_request=cpu_request,
            ttl=ttl,
            labels=labels,
            env=env,
            pids=pids,
            disk=disk,
            disk_inodes=disk_inodes,
            idle_timeout=idle_timeout,
            node_selector=node_selector,
            runtime=runtime,
            lost_after=lost_after,
            max_attempts=max_attempts,
            restart_backoff=restart_backoff,
        )
        chosen = request_id is None
        rid = c.new_request_id() if request_id is None else c.check_request_id(request_id)
        req = c.create_request(rid, spec, pool)
        resp = client._create(req, c.timeout_of(timeout, client.timeout))
        session = Session(client, resp.session, existing=resp.existing)
        if wait:
            try:
                session.wait(timeout=wait_timeout)
            except DeadlineExceeded:
                if chosen:
                    with contextlib.suppress(SandfleetError):
                        client._delete(session.id)
                raise
        return session

    def get(self, session_id: str, *, timeout: _units.Duration | None = None) -> Session:
        """The session ``session_id`` (a linearizable read). :class:`~sandfleet.errors.NotFound` if unknown."""
        info = self._client._get(session_id, c.timeout_of(timeout, self._client.timeout))
        return Session(self._client, info)

    def list(
        self,
        labels: Mapping[str, str] | None = None,
        state: str | SessionState | Sequence[str | SessionState] | None = None,
        *,
        tenant: str | None = None,
        page_size: int | None = None,
        timeout: _units.Duration | None = None,
    ) -> Iterator[Session]:
        """Every session whose labels contain ``labels`` and whose state is ``state`` (one or several).

        Iterates over every page, fetching the next one as the previous is used
        up; ``timeout`` bounds each page's call. Sessions come ordered by id.
        """
        req = c.list_request(labels, state, page_size, tenant)
        page_timeout = c.timeout_of(timeout, self._client.timeout)
        while True:
            page = self._client._list_page(req, page_timeout)
            for s in page.sessions:
                yield Session(self._client, s)
            if not page.next_page_token:
                return
            nxt = pb.ListSessionsRequest()
            nxt.CopyFrom(req)
            nxt.page_token = page.next_page_token
            req = nxt

    def delete(self, session_id: str, *, timeout: _units.Duration | None = None) -> None:
        """Terminates a session (a no-op for one already terminated)."""
        self._client._delete(session_id, c.timeout_of(timeout, self._client.timeout))


class Session(SessionFields):
    """A session: a sandbox on some node, with exec and file access.

    Returned by ``sf.sessions.create()``, ``get()`` and ``list()``. Exec and
    file calls go straight to the node agent that runs the session, with the
    session's token; when the session moved (its node died, it was drained)
    they read the session again and follow it to its new node, repeating the
    call when that is safe. ``with`` deletes the session on exit.
    """

    def __init__(self, client: Sandfleet, info: pb.Session, existing: bool = False) -> None:
        """A session of ``client`` as ``info`` describes it."""
        self._client = client
        self._init_fields(info, existing)
        #: The session's workspace files.
        self.files = Files(self)

    # -- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> Session:
        """The session itself."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Deletes the session (errors are raised only when the block itself raised none)."""
        try:
            self.delete()
        except SandfleetError:
            if exc is None:
                raise

    def refresh(self, *, timeout: _units.Duration | None = None) -> Session:
        """Reads the session again (state, node, a fresh token); returns ``self``."""
        self._set_info(self._client._get(self.id, c.timeout_of(timeout, self._client.timeout)))
        return self

    def wait(self, timeout: _units.Duration | None = None) -> Session:
        """Waits until the session is RUNNING; returns ``self``.

        Raises :class:`~sandfleet.errors.SessionEnded` if it fails or ends, and
        :class:`~sandfleet.errors.DeadlineExceeded` (naming the last state and
        pending reason) after ``timeout`` (default 120 s).
        """
        t = c.timeout_of(timeout, c.DEFAULT_WAIT_TIMEOUT, "wait_timeout")
        info = self._client._wait_running(self.id, t, known=self._info)
        self._set_info(info)
        return self

    def delete(self, *, timeout: _units.Duration | None = None) -> None:
        """Terminates the session and frees its resources (a no-op if it already ended)."""
        try:
            info = self._client._delete(self.id, c.timeout_of(timeout, self._client.timeout))
        except NotFound:
            return
        self._set_info(info)

    def renew(self, ttl: _units.Duration | None = None, *, timeout: _units.Duration | None = None) -> Session:
        """Pushes the expiry out to ``ttl`` from now (default: the session's own ttl); returns ``self``."""
        secs = 0 if ttl is None else _units.ceil_seconds(ttl, "ttl")
        self._set_info(self._client._renew(self.id, secs, c.timeout_of(timeout, self._client.timeout)))
        return self

    # -- data plane plumbing -------------------------------------------------------

    def _follow(self, deadline: c.Deadline) -> pb.Session:
        """Reads the session again and, if it is being placed, waits for it to run."""
        client = self._client
        left = deadline.left()
        if left <= 0:
            raise DeadlineExceeded(f"session {self.id}: no time left to follow it", from_server=False)
        info = client._get(self.id, timeout=min(left, client._config.timeout))
        state = SessionState.from_proto(info.state)
        if state.terminal:
            self._set_info(info)
            raise SessionEnded(info.id, state.value, info.message)
        if state is not SessionState.RUNNING or not info.node_address or not info.token:
            info = client._wait_running(self.id, max(deadline.left(), 0.001))
        self._set_info(info)
        return info

    def _data_call(
        self,
        op: str,
        fn: Callable[[Data, c.Metadata, pb.Session, float], T],
        deadline: c.Deadline,
        repeatable: Callable[[grpc.RpcError], bool],
    ) -> T:
        """One data-plane call on the session's agent, following the session when it moves."""
        info = self._info
        if not info.token or not info.node_address or info.state != pb.SESSION_STATE_RUNNING:
            info = self._follow(deadline)
        moves = 0
        same_place = 0
        attempt = 0
        while True:
            if deadline.expired():
                raise DeadlineExceeded(f"{op}: no time left of its {deadline.total:g}s deadline", from_server=False)
            stub = self._client._data_stub(info.node_address)
            md = (("authorization", f"Bearer {info.token}"),)
            try:
                return fn(stub, md, info, deadline.left())
            except grpc.RpcError as e:
                if not c.follow_hint(e) or not repeatable(e) or deadline.left() <= 0.01 or moves >= c.MAX_FOLLOWS:
                    raise self._data_error(e, info) from None
                before = c.placement(info)
                code = c.code_of(e)
                try:
                    info = self._follow(deadline)
                except DeadlineExceeded:
                    raise self._data_error(e, info) from None
                if c.placement(info) != before:
                    moves += 1
                    same_place = 0
                    continue
                # Nothing moved. A refused token gets one fresh try; an agent the
                # cluster still places the session on but that does not answer
                # is tried again (it restarts, or the session moves) until the deadline.
                same_place += 1
                if code == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(min(self._client._backoff.delay(attempt), deadline.left()))
                    attempt += 1
                    continue
                if same_place > 1 or code == grpc.StatusCode.NOT_FOUND:
                    raise self._data_error(e, info) from None

    def _data_error(self, e: grpc.RpcError, info: pb.Session) -> SandfleetError:
        where = f"node agent {info.node_id} at {info.node_address}"
        return from_rpc_error(e, where, from_server=not c.is_connect_failure(e))

    # -- exec ------------------------------------------------------------------------

    def exec(
        self,
        *argv: str,
        timeout: _units.Duration | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        workdir: str | None = None,
    ) -> ExecResult:
        """Runs a command to completion and returns its output and exit status.

        ``s.exec("python3", "-c", "print(6*7)", timeout=30)``. ``argv[0]`` is
        looked up on the sandbox's PATH. ``timeout`` is the command's wall-clock
        limit (default 30 s, at most 1 h): on expiry the process tree is killed
        and ``timed_out`` is set. A non-zero exit is not an error: check
        ``exit_code`` (or ``ok``).
        """
        return self.exec_stream(*argv, timeout=timeout, env=env, stdin=stdin, workdir=workdir).wait()

    def run_code(
        self,
        code: str,
        language: str | Language = Language.PYTHON,
        *,
        timeout: _units.Duration | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        workdir: str | None = None,
    ) -> ExecResult:
        """Runs source code with an interpreter (``python3 -c``, ``node -e``, ``bash -c``) to completion."""
        return self.run_code_stream(code, language, timeout=timeout, env=env, stdin=stdin, workdir=workdir).wait()

    def exec_stream(
        self,
        *argv: str,
        timeout: _units.Duration | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        workdir: str | None = None,
    ) -> ExecStream:
        """Starts a command; iterate the result for :class:`Stdout`, :class:`Stderr` and :class:`Exit` events.

        Events arrive as the command produces output. Breaking out of the loop
        (or ``close()``) cancels the call, and the agent kills the command (at the
        latest when it next writes output).
        """
        req, grpc_timeout = c.exec_request(self.id, argv, timeout=timeout, env=env, stdin=stdin, workdir=workdir)
        return ExecStream(self, req, grpc_timeout)

    def run_code_stream(
        self,
        code: str,
        language: str | Language = Language.PYTHON,
        *,
        timeout: _units.Duration | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        workdir: str | None = None,
    ) -> ExecStream:
        """Like :meth:`exec_stream`, for source code run by an interpreter."""
        req, grpc_timeout = c.exec_request(
            self.id, (), code=code, language=language, timeout=timeout, env=env, stdin=stdin, workdir=workdir
        )
        return ExecStream(self, req, grpc_timeout)

    # -- workspace -------------------------------------------------------------------

    def sync(self, *, timeout: _units.Duration | None = None) -> SyncResult:
        """Copies the workspace's changes to the workspace store; returns once they are durable there.

        :class:`~sandfleet.errors.FailedPrecondition` when the node keeps no durable copy.
        """
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_SYNC_TIMEOUT))

        def call(stub: Data, md: c.Metadata, info: pb.Session, left: float) -> pb.SyncWorkspaceResponse:
            return stub.sync(pb.SyncWorkspaceRequest(session_id=info.id), timeout=left, metadata=md)

        r = self._data_call("sync_workspace", call, deadline, lambda e: True)
        return SyncResult(
            files=r.files,
            bytes=r.bytes,
            uploaded_files=r.uploaded_files,
            uploaded_bytes=r.uploaded_bytes,
            manifest_version=r.manifest_version,
            store=r.store,
        )

    def download_url(
        self,
        path: str,
        expires_in: _units.Duration | None = None,
        *,
        timeout: _units.Duration | None = None,
    ) -> DownloadUrl:
        """A presigned URL that downloads ``path`` straight from the workspace store (S3).

        ``expires_in`` defaults to 15 minutes (at most 7 days).
        :class:`~sandfleet.errors.FailedPrecondition` when the store cannot presign (a local store).
        """
        c.check_path(path)
        secs = 0 if expires_in is None else _units.ceil_seconds(expires_in, "expires_in")
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_SYNC_TIMEOUT))

        def call(stub: Data, md: c.Metadata, info: pb.Session, left: float) -> pb.GetDownloadUrlResponse:
            req = pb.GetDownloadUrlRequest(session_id=info.id, path=path, expires_in_seconds=secs)
            return stub.download_url(req, timeout=left, metadata=md)

        r = self._data_call("get_download_url", call, deadline, lambda e: True)
        return DownloadUrl(url=r.url, expires_at=ms_to_datetime(r.expires_at_ms), size=r.size, sha256=r.sha256)

    def disk_usage(self, *, timeout: _units.Duration | None = None) -> DiskUsage:
        """How much of its disk quota the session uses now, as the kernel counts it."""
        deadline = c.Deadline(c.timeout_of(timeout, self._client.timeout))

        def call(stub: Data, md: c.Metadata, info: pb.Session, left: float) -> pb.GetDiskUsageResponse:
            return stub.disk_usage(pb.GetDiskUsageRequest(session_id=info.id), timeout=left, metadata=md)

        r = self._data_call("get_disk_usage", call, deadline, lambda e: True)
        return DiskUsage(
            used_bytes=r.used_bytes, limit_bytes=r.limit_bytes, used_inodes=r.used_inodes, limit_inodes=r.limit_inodes
        )


class ExecStream:
    """The events of a running exec: iterate it for :class:`Stdout`, :class:`Stderr`, then :class:`Exit`.

    The call starts on the first ``next()``. ``result`` holds the whole
    :class:`ExecResult` once the stream ended; :meth:`wait` runs it to the end.
    ``close()`` (or leaving a ``with`` block) cancels the call, and the agent
    kills the command (when it next writes output).
    """

    def __init__(self, session: Session, req: pb.ExecRequest, grpc_timeout: float) -> None:
        """An exec of ``req`` in ``session``."""
        self._session = session
        self._req = req
        self._deadline = c.Deadline(grpc_timeout)
        self._call: Any | None = None
        self._events = self._run()
        self._stdout: list[bytes] = []
        self._stderr: list[bytes] = []
        self._cancelled = False
        #: The whole result, once the stream ended with its exit status.
        self.result: ExecResult | None = None

    def __iter__(self) -> Iterator[ExecEvent]:
        """The events."""
        return self

    def __next__(self) -> ExecEvent:
        """The next event."""
        return next(self._events)

    def __enter__(self) -> ExecStream:
        """The stream itself."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Cancels the call if it is still running."""
        self.close()

    def close(self) -> None:
        """Cancels the call if it is still running (the agent kills the command when it next writes output)."""
        self._cancelled = True
        if self._call is not None and self.result is None:
            self._call.cancel()
        self._events.close()

    def wait(self) -> ExecResult:
        """Runs the exec to its end and returns its result."""
        for _ in self:
            pass
        if self.result is None:
            raise Internal("the exec stream ended without an exit status")
        return self.result

    def _start(self, stub: Data, md: c.Metadata, info: pb.Session, left: float) -> tuple[Any, pb.ExecResponse]:
        call: Any = stub.exec(self._req, timeout=left, metadata=md)
        self._call = call
        first = next(call)
        return call, first

    def _run(self) -> Generator[ExecEvent, None, None]:
        try:
            call, first = self._session._data_call(
                "exec",
                self._start,
                self._deadline,
                # Repeated only when the agent refused it or was never reached: it did not start.
                lambda e: c.code_of(e) != grpc.StatusCode.UNAVAILABLE or c.never_started(e),
            )
        except StopIteration:
            raise Internal("the exec stream ended without an exit status") from None
        msg: pb.ExecResponse | None = first
        it = iter(call)
        try:
            while msg is not None:
                kind = msg.WhichOneof("event")
                if kind == "output":
                    data = msg.output.data
                    if msg.output.stream == pb.OUTPUT_STREAM_STDERR:
                        self._stderr.append(data)
                        yield Stderr(data)
                    else:
                        self._stdout.append(data)
                        yield Stdout(data)
                elif kind == "exit":
                    self.result = ExecResult.build(b"".join(self._stdout), b"".join(self._stderr), msg.exit)
                    yield Exit.from_proto(msg.exit)
                    return
                try:
                    msg = next(it)
                except StopIteration:
                    msg = None
                except grpc.RpcError as e:
                    if self._cancelled:
                        return
                    raise self._session._data_error(e, self._session._info) from None
        finally:
            if self.result is None:
                call.cancel()
        raise Internal("the exec stream ended without an exit status")


class _Upload:
    """The source of an upload, read in 1 MiB chunks; replayable when it can be read again."""

    def __init__(self, data: UploadData) -> None:
        self._bytes: bytes | None = None
        self._file: Any | None = None
        self._iter: Iterable[bytes] | None = None
        self._start = 0
        self._seekable = False
        self._touched = False
        self.error: BaseException | None = None
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._bytes = bytes(data)
        elif isinstance(data, str):
            self._bytes = data.encode("utf-8")
        elif hasattr(data, "read"):
            f: Any = data
            self._file = f
            try:
                self._seekable = bool(f.seekable()) if hasattr(f, "seekable") else False
                if self._seekable:
                    self._start = f.tell()
            except (OSError, ValueError):
                self._seekable = False
        elif isinstance(data, Iterable):
            self._iter = data
        else:
            raise InvalidArgument(f"cannot upload {type(data).__name__}: give bytes, str, a file object or chunks")

    def replayable(self) -> bool:
        return self._bytes is not None or self._seekable or not self._touched

    def chunks(self) -> Iterator[bytes]:
        if self._bytes is not None:
            data = self._bytes
            for i in range(0, len(data), c.WRITE_CHUNK_BYTES):
                yield data[i : i + c.WRITE_CHUNK_BYTES]
            return
        if self._file is not None:
            if self._touched:
                if not self._seekable:
                    raise Aborted("the upload's source was partly read and cannot be read again; upload again")
                self._file.seek(self._start)
            self._touched = True
            while True:
                piece = self._file.read(c.WRITE_CHUNK_BYTES)
                if not piece:
                    return
                yield piece.encode("utf-8") if isinstance(piece, str) else bytes(piece)
        if self._iter is not None:
            if self._touched:
                raise Aborted("the upload's chunks were partly sent and cannot be sent again; upload again")
            self._touched = True
            buf = bytearray()
            for piece in self._iter:
                buf += piece
                while len(buf) >= c.WRITE_CHUNK_BYTES:
                    yield bytes(buf[: c.WRITE_CHUNK_BYTES])
                    del buf[: c.WRITE_CHUNK_BYTES]
            if buf:
                yield bytes(buf)

    def requests(self, session_id: str, path: str, mode: int) -> Iterator[pb.WriteFileRequest]:
        """The upload messages: the first carries the session, path and mode (and maybe data)."""
        self.error = None
        header = pb.WriteFileRequest(session_id=session_id, path=path, mode=mode)
        try:
            sent_header = False
            for piece in self.chunks():
                if not sent_header:
                    header.data = piece
                    sent_header = True
                    yield header
                else:
                    yield pb.WriteFileRequest(data=piece)
            if not sent_header:
                yield header
        except Exception as e:
            # Never end the stream cleanly: the agent would commit a partial file.
            self.error = e
            raise


class Files:
    """A session's workspace: ``s.files``. Paths are relative to the workspace root."""

    def __init__(self, session: Session) -> None:
        """The files of ``session``."""
        self._session = session

    def write(
        self,
        path: str,
        data: UploadData,
        *,
        mode: int = 0,
        timeout: _units.Duration | None = None,
    ) -> WriteResult:
        """Uploads ``data`` to ``path`` (replacing it atomically once the upload completes).

        ``data`` is bytes, text (written as UTF-8), a file object (binary or
        text; read in 1 MiB chunks, never whole), or an iterable of byte
        chunks. ``mode`` 0 means 0o644. Parent directories are created.
        Retried on the session's new node when it moved, if the data can be
        read again (bytes, text, seekable files).
        """
        c.check_path(path)
        source = _Upload(data)
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_TRANSFER_TIMEOUT))

        def call(stub: Data, md: c.Metadata, info: pb.Session, left: float) -> pb.WriteFileResponse:
            try:
                return stub.write(source.requests(info.id, path, mode), timeout=left, metadata=md)
            except grpc.RpcError:
                if source.error is not None:
                    raise source.error from None
                raise

        r = self._session._data_call("write_file", call, deadline, lambda e: source.replayable())
        return WriteResult(size=r.size, sha256=r.sha256)

    def _open_read(self, path: str, deadline: c.Deadline) -> tuple[Any, pb.ReadFileResponse | None]:
        def start(stub: Data, md: c.Metadata, info: pb.Session, left: float) -> tuple[Any, pb.ReadFileResponse | None]:
            call: Any = stub.read(pb.ReadFileRequest(session_id=info.id, path=path), timeout=left, metadata=md)
            try:
                first: pb.ReadFileResponse | None = next(call)
            except StopIteration:
                first = None
            return call, first

        return self._session._data_call("read_file", start, deadline, lambda e: True)

    def iter_read(self, path: str, *, timeout: _units.Duration | None = None) -> Iterator[bytes]:
        """Downloads ``path`` as pieces of at most 64 KiB, as they arrive."""
        c.check_path(path)
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_TRANSFER_TIMEOUT))
        call, first = self._open_read(path, deadline)
        try:
            if first is None:
                return
            yield first.data
            for r in call:
                yield r.data
        except grpc.RpcError as e:
            raise self._session._data_error(e, self._session._info) from None
        finally:
            call.cancel()

    def read(self, path: str, *, timeout: _units.Duration | None = None) -> bytes:
        """Downloads the whole file ``path``. Retried from the start on the session's new node when it moved."""
        c.check_path(path)
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_TRANSFER_TIMEOUT))

        def call(stub: Data, md: c.Metadata, info: pb.Session, left: float) -> bytes:
            buf = bytearray()
            for r in stub.read(pb.ReadFileRequest(session_id=info.id, path=path), timeout=left, metadata=md):
                buf += r.data
            return bytes(buf)

        return self._session._data_call("read_file", call, deadline, lambda e: True)

    def read_text(self, path: str, *, encoding: str = "utf-8", timeout: _units.Duration | None = None) -> str:
        """Downloads ``path`` and decodes it (undecodable bytes replaced)."""
        return self.read(path, timeout=timeout).decode(encoding, errors="replace")

    def download(self, path: str, dest: str | IO[bytes], *, timeout: _units.Duration | None = None) -> int:
        """Downloads ``path`` into a local file (a path or a binary file object), streaming; returns the size."""
        if isinstance(dest, str):
            with open(dest, "wb") as f:
                return self.download(path, f, timeout=timeout)
        n = 0
        for piece in self.iter_read(path, timeout=timeout):
            dest.write(piece)
            n += len(piece)
        return n

    def list(self, path: str = "", *, timeout: _units.Duration | None = None) -> builtins.list[FileEntry]:
        """The entries of one directory (``""`` is the workspace root), sorted by name."""
        deadline = c.Deadline(c.timeout_of(timeout, self._session._client.timeout))

        def call(stub: Data, md: c.Metadata, info: pb.Session, left: float) -> pb.ListFilesResponse:
            return stub.list(pb.ListFilesRequest(session_id=info.id, path=path), timeout=left, metadata=md)

        r = self._session._data_call("list_files", call, deadline, lambda e: True)
        return [FileEntry.from_proto(e) for e in r.entries]

    def exists(self, path: str, *, timeout: _units.Duration | None = None) -> bool:
        """True when ``path`` exists in the workspace (a file, directory or symlink)."""
        c.check_path(path)
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            return any(e.name == name for e in self.list(parent, timeout=timeout))
        except NotFound:
            return False

    def remove(self, path: str, *, recursive: bool = False, timeout: _units.Duration | None = None) -> None:
        """Removes a file, or a directory and everything under it with ``recursive=True``."""
        c.check_path(path)
        deadline = c.Deadline(c.timeout_of(timeout, self._session._client.timeout))
        attempts = [0]

        def call(stub: Data, md: c.Metadata, info: pb.Session, left: float) -> None:
            attempts[0] += 1
            req = pb.RemoveFileRequest(session_id=info.id, path=path, recursive=recursive)
            try:
                stub.remove(req, timeout=left, metadata=md)
            except grpc.RpcError as e:
                # A repeated remove finding nothing: the first one did it.
                if attempts[0] > 1 and c.code_of(e) == grpc.StatusCode.NOT_FOUND and not c.follow_hint(e):
                    return
                raise

        self._session._data_call("remove_file", call, deadline, lambda e: True)
