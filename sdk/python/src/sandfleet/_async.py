"""The asyncio client: :class:`AsyncSandfleet`, the twin of :class:`~sandfleet.Sandfleet`.

Same shape, with coroutines: ``await sf.sessions.create(...)``, ``await s.exec(...)``,
``async for ev in s.exec_stream(...)``, ``async for s in sf.sessions.list(...)``.
One client may be shared by any number of tasks of one event loop; its
channels are made on first use, inside the loop.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import (
    IO,
    Any,
    TypeVar,
)

import grpc
import grpc.aio

from . import _common as c
from . import _config, _units
from ._base import SessionFields
from ._proto import sandfleet_pb2 as pb
from ._rpc import AsyncControl, AsyncData
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

#: What a stream's ``read()`` returns at its end (not in the type stubs).
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]

#: What an async upload takes: bytes, text, a (sync) file object, or an
#: iterable or async iterable of byte chunks.
AsyncUploadData = bytes | bytearray | memoryview | str | IO[bytes] | IO[str] | Iterable[bytes] | AsyncIterable[bytes]


class AsyncSandfleet:
    """A client of a Sandfleet cluster for asyncio; the same shape as :class:`~sandfleet.Sandfleet`.

    Configuration comes from the arguments, else from ``SANDFLEET_ENDPOINT``,
    ``SANDFLEET_API_KEY`` and ``SANDFLEET_TLS_CA`` / ``_CERT`` / ``_KEY``. See
    :class:`~sandfleet.Sandfleet` for the arguments. ``async with
    AsyncSandfleet() as sf:`` closes its channels on exit.
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
        """A client configured from the arguments and the environment; never blocks."""
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
        self._control: dict[int, AsyncControl] = {}
        self._data: dict[str, AsyncData] = {}
        self._preferred = 0
        self._backoff = c.Backoff()
        self._closed = False
        #: Creating, reading, listing and deleting sessions.
        self.sessions = AsyncSessions(self)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The coordinator endpoints this client uses (``host:port``)."""
        return self._config.endpoints

    @property
    def timeout(self) -> float:
        """The default deadline of control-plane calls, in seconds."""
        return self._config.timeout

    async def close(self) -> None:
        """Closes every channel. Calls made afterwards fail."""
        self._closed = True
        channels = [s.channel for s in self._control.values()] + [s.channel for s in self._data.values()]
        self._control.clear()
        self._data.clear()
        for ch in channels:
            await ch.close(None)

    async def __aenter__(self) -> AsyncSandfleet:
        """The client itself."""
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Closes the client."""
        await self.close()

    def __repr__(self) -> str:
        """The endpoints."""
        return f"<AsyncSandfleet {','.join(self.endpoints)}>"

    def _channel(self, target: str) -> grpc.aio.Channel:
        opts = list(self._config.channel_options)
        if self._config.tls is not None:
            return grpc.aio.secure_channel(target, self._config.tls.credentials(), options=opts)
        return grpc.aio.insecure_channel(target, options=opts)

    def _control_stub(self, idx: int) -> AsyncControl:
        if self._closed:
            raise InvalidArgument("the client is closed")
        stub = self._control.get(idx)
        if stub is None:
            stub = AsyncControl(self._channel(self._config.endpoints[idx]))
            self._control[idx] = stub
        return stub

    def _data_stub(self, address: str) -> AsyncData:
        if self._closed:
            raise InvalidArgument("the client is closed")
        target = _config.normalize_endpoint(address)
        stub = self._data.get(target)
        if stub is None:
            stub = AsyncData(self._channel(target))
            self._data[target] = stub
        return stub

    async def _call(self, op: str, fn: Callable[[AsyncControl, float], Awaitable[T]], timeout: float | None) -> T:
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
                result = await fn(stub, attempt_timeout)
            except grpc.RpcError as e:
                retry = c.control_retryable(e, deadline_left=deadline.left() > 0.01)
                answered = answered or not c.is_connect_failure(e)
                last = (e, idx)
                out_of_retries = attempt >= self._config.max_retries and not answered
                if not retry or out_of_retries or deadline.left() <= 0.01:
                    raise self._control_error(e, op, idx, deadline) from None
                self._preferred = (idx + 1) % n
                await asyncio.sleep(min(self._backoff.delay(attempt), deadline.left()))
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

    async def _create(self, req: pb.CreateSessionRequest, timeout: float | None) -> pb.CreateSessionResponse:
        async def call(s: AsyncControl, t: float) -> pb.CreateSessionResponse:
            return await s.create(req, timeout=t, metadata=self._md)

        return await self._call("create_session", call, timeout)

    async def _get(self, session_id: str, timeout: float | None = None) -> pb.Session:
        req = pb.GetSessionRequest(id=session_id)

        async def call(s: AsyncControl, t: float) -> pb.GetSessionResponse:
            return await s.get(req, timeout=t, metadata=self._md)

        return (await self._call("get_session", call, timeout)).session

    async def _delete(self, session_id: str, timeout: float | None = None) -> pb.Session:
        req = pb.DeleteSessionRequest(id=session_id)

        async def call(s: AsyncControl, t: float) -> pb.DeleteSessionResponse:
            return await s.delete(req, timeout=t, metadata=self._md)

        return (await self._call("delete_session", call, timeout)).session

    async def _renew(self, session_id: str, ttl_seconds: int, timeout: float | None) -> pb.Session:
        req = pb.RenewSessionRequest(id=session_id, ttl_seconds=ttl_seconds)

        async def call(s: AsyncControl, t: float) -> pb.RenewSessionResponse:
            return await s.renew(req, timeout=t, metadata=self._md)

        return (await self._call("renew_session", call, timeout)).session

    async def _list_page(self, req: pb.ListSessionsRequest, timeout: float | None) -> pb.ListSessionsResponse:
        async def call(s: AsyncControl, t: float) -> pb.ListSessionsResponse:
            return await s.list(req, timeout=t, metadata=self._md)

        return await self._call("list_sessions", call, timeout)

    async def _running(self, s: pb.Session, timeout: float, known: pb.Session | None) -> pb.Session | None:
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
        full = s if s.token else await self._get(s.id, timeout=max(timeout, 0.5))
        state = SessionState.from_proto(full.state)
        if state.terminal:
            raise SessionEnded(full.id, state.value, full.message)
        return full if state is SessionState.RUNNING and full.node_address else None

    async def _wait_running(self, session_id: str, timeout: float, known: pb.Session | None = None) -> pb.Session:
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
                s = await self._get(session_id, timeout=min(deadline.left(), self._config.attempt_timeout))
                done = await self._running(s, deadline.left(), known)
                if done is not None:
                    return done
                last = s
                await asyncio.sleep(min(0.25, deadline.left()))
                continue
            idx = self._preferred % n
            stub = self._control_stub(idx)
            call = stub.watch(pb.WatchSessionRequest(id=session_id), timeout=deadline.left(), metadata=self._md)
            try:
                async for ev in call:
                    attempt = 0
                    done = await self._running(ev.session, deadline.left(), known)
                    if done is not None:
                        call.cancel()
                        return done
                    last = ev.session
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
            finally:
                call.cancel()
            await asyncio.sleep(min(self._backoff.delay(attempt), deadline.left()))
            attempt += 1


class _CreateCall:
    """What ``AsyncSessions.create()`` returns: await it, or use it in ``async with`` directly."""

    def __init__(self, make: Callable[[], Awaitable[AsyncSession]]) -> None:
        self._make = make
        self._session: AsyncSession | None = None

    def __await__(self) -> Generator[Any, None, AsyncSession]:
        return self._make().__await__()

    async def __aenter__(self) -> AsyncSession:
        self._session = await self._make()
        return self._session

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.__aexit__(exc_type, exc, tb)


class AsyncSessions:
    """Session management of an :class:`AsyncSandfleet` client: ``sf.sessions``."""

    def __init__(self, client: AsyncSandfleet) -> None:
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
    ) -> _CreateCall:
        """Creates a session; ``await`` it, or ``async with sf.sessions.create(...) as s:`` (deleted on exit).

        The arguments, idempotency and errors are those of
        :meth:`sandfleet.Sessions.create`.
        """
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
        client = self._client
        call_timeout = c.timeout_of(timeout, client.timeout)

        async def make() -> AsyncSession:
            resp = await client._create(req, call_timeout)
            session = AsyncSession(client, resp.session, existing=resp.existing)
            if wait:
                try:
                    await session.wait(timeout=wait_timeout)
                except DeadlineExceeded:
                    if chosen:
                        with contextlib.suppress(SandfleetError):
                            await client._delete(session.id)
                    raise
            return session

        return _CreateCall(make)

    async def get(self, session_id: str, *, timeout: _units.Duration | None = None) -> AsyncSession:
        """The session ``session_id`` (a linearizable read). :class:`~sandfleet.errors.NotFound` if unknown."""
        info = await self._client._get(session_id, c.timeout_of(timeout, self._client.timeout))
        return AsyncSession(self._client, info)

    async def list(
        self,
        labels: Mapping[str, str] | None = None,
        state: str | SessionState | Sequence[str | SessionState] | None = None,
        *,
        tenant: str | None = None,
        page_size: int | None = None,
        timeout: _units.Duration | None = None,
    ) -> AsyncIterator[AsyncSession]:
        """Every matching session, over every page: ``async for s in sf.sessions.list(labels=..., state=...)``."""
        req = c.list_request(labels, state, page_size, tenant)
        page_timeout = c.timeout_of(timeout, self._client.timeout)
        while True:
            page = await self._client._list_page(req, page_timeout)
            for s in page.sessions:
                yield AsyncSession(self._client, s)
            if not page.next_page_token:
                return
            nxt = pb.ListSessionsRequest()
            nxt.CopyFrom(req)
            nxt.page_token = page.next_page_token
            req = nxt

    async def delete(self, session_id: str, *, timeout: _units.Duration | None = None) -> None:
        """Terminates a session (a no-op for one already terminated)."""
        await self._client._delete(session_id, c.timeout_of(timeout, self._client.timeout))


class AsyncSession(SessionFields):
    """A session for asyncio: the twin of :class:`~sandfleet.Session` (``async with`` deletes it on exit)."""

    def __init__(self, client: AsyncSandfleet, info: pb.Session, existing: bool = False) -> None:
        """A session of ``client`` as ``info`` describes it."""
        self._client = client
        self._init_fields(info, existing)
        #: The session's workspace files.
        self.files = AsyncFiles(self)

    async def __aenter__(self) -> AsyncSession:
        """The session itself."""
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Deletes the session (errors are raised only when the block itself raised none)."""
        try:
            await self.delete()
        except SandfleetError:
            if exc is None:
                raise

    async def refresh(self, *, timeout: _units.Duration | None = None) -> AsyncSession:
        """Reads the session again (state, node, a fresh token); returns ``self``."""
        self._set_info(await self._client._get(self.id, c.timeout_of(timeout, self._client.timeout)))
        return self

    async def wait(self, timeout: _units.Duration | None = None) -> AsyncSession:
        """Waits until the session is RUNNING (default at most 120 s); returns ``self``."""
        t = c.timeout_of(timeout, c.DEFAULT_WAIT_TIMEOUT, "wait_timeout")
        self._set_info(await self._client._wait_running(self.id, t, known=self._info))
        return self

    async def delete(self, *, timeout: _units.Duration | None = None) -> None:
        """Terminates the session and frees its resources (a no-op if it already ended)."""
        try:
            info = await self._client._delete(self.id, c.timeout_of(timeout, self._client.timeout))
        except NotFound:
            return
        self._set_info(info)

    async def renew(
        self, ttl: _units.Duration | None = None, *, timeout: _units.Duration | None = None
    ) -> AsyncSession:
        """Pushes the expiry out to ``ttl`` from now (default: the session's own ttl); returns ``self``."""
        secs = 0 if ttl is None else _units.ceil_seconds(ttl, "ttl")
        self._set_info(await self._client._renew(self.id, secs, c.timeout_of(timeout, self._client.timeout)))
        return self

    async def _follow(self, deadline: c.Deadline) -> pb.Session:
        client = self._client
        left = deadline.left()
        if left <= 0:
            raise DeadlineExceeded(f"session {self.id}: no time left to follow it", from_server=False)
        info = await client._get(self.id, timeout=min(left, client._config.timeout))
        state = SessionState.from_proto(info.state)
        if state.terminal:
            self._set_info(info)
            raise SessionEnded(info.id, state.value, info.message)
        if state is not SessionState.RUNNING or not info.node_address or not info.token:
            info = await client._wait_running(self.id, max(deadline.left(), 0.001))
        self._set_info(info)
        return info

    async def _data_call(
        self,
        op: str,
        fn: Callable[[AsyncData, c.Metadata, pb.Session, float], Awaitable[T]],
        deadline: c.Deadline,
        repeatable: Callable[[grpc.RpcError], bool],
    ) -> T:
        """One data-plane call on the session's agent, following the session when it moves."""
        info = self._info
        if not info.token or not info.node_address or info.state != pb.SESSION_STATE_RUNNING:
            info = await self._follow(deadline)
        moves = 0
        same_place = 0
        attempt = 0
        while True:
            if deadline.expired():
                raise DeadlineExceeded(f"{op}: no time left of its {deadline.total:g}s deadline", from_server=False)
            stub = self._client._data_stub(info.node_address)
            md = (("authorization", f"Bearer {info.token}"),)
            try:
                return await fn(stub, md, info, deadline.left())
            except grpc.RpcError as e:
                if not c.follow_hint(e) or not repeatable(e) or deadline.left() <= 0.01 or moves >= c.MAX_FOLLOWS:
                    raise self._data_error(e, info) from None
                before = c.placement(info)
                code = c.code_of(e)
                try:
                    info = await self._follow(deadline)
                except DeadlineExceeded:
                    raise self._data_error(e, info) from None
                if c.placement(info) != before:
                    moves += 1
                    same_place = 0
                    continue
                same_place += 1
                if code == grpc.StatusCode.UNAVAILABLE:
                    await asyncio.sleep(min(self._client._backoff.delay(attempt), deadline.left()))
                    attempt += 1
                    continue
                if same_place > 1 or code == grpc.StatusCode.NOT_FOUND:
                    raise self._data_error(e, info) from None

    def _data_error(self, e: grpc.RpcError, info: pb.Session) -> SandfleetError:
        where = f"node agent {info.node_id} at {info.node_address}"
        return from_rpc_error(e, where, from_server=not c.is_connect_failure(e))

    async def exec(
        self,
        *argv: str,
        timeout: _units.Duration | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        workdir: str | None = None,
    ) -> ExecResult:
        """Runs a command to completion; see :meth:`sandfleet.Session.exec`."""
        return await self.exec_stream(*argv, timeout=timeout, env=env, stdin=stdin, workdir=workdir).wait()

    async def run_code(
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
        stream = self.run_code_stream(code, language, timeout=timeout, env=env, stdin=stdin, workdir=workdir)
        return await stream.wait()

    def exec_stream(
        self,
        *argv: str,
        timeout: _units.Duration | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        workdir: str | None = None,
    ) -> AsyncExecStream:
        """Starts a command: ``async for ev in s.exec_stream(...)`` yields Stdout, Stderr, then Exit."""
        req, grpc_timeout = c.exec_request(self.id, argv, timeout=timeout, env=env, stdin=stdin, workdir=workdir)
        return AsyncExecStream(self, req, grpc_timeout)

    def run_code_stream(
        self,
        code: str,
        language: str | Language = Language.PYTHON,
        *,
        timeout: _units.Duration | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes | str | None = None,
        workdir: str | None = None,
    ) -> AsyncExecStream:
        """Like :meth:`exec_stream`, for source code run by an interpreter."""
        req, grpc_timeout = c.exec_request(
            self.id, (), code=code, language=language, timeout=timeout, env=env, stdin=stdin, workdir=workdir
        )
        return AsyncExecStream(self, req, grpc_timeout)

    async def sync(self, *, timeout: _units.Duration | None = None) -> SyncResult:
        """Copies the workspace's changes to the store; returns once they are durable there."""
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_SYNC_TIMEOUT))

        async def call(stub: AsyncData, md: c.Metadata, info: pb.Session, left: float) -> pb.SyncWorkspaceResponse:
            return await stub.sync(pb.SyncWorkspaceRequest(session_id=info.id), timeout=left, metadata=md)

        r = await self._data_call("sync_workspace", call, deadline, lambda e: True)
        return SyncResult(
            files=r.files,
            bytes=r.bytes,
            uploaded_files=r.uploaded_files,
            uploaded_bytes=r.uploaded_bytes,
            manifest_version=r.manifest_version,
            store=r.store,
        )

    async def download_url(
        self,
        path: str,
        expires_in: _units.Duration | None = None,
        *,
        timeout: _units.Duration | None = None,
    ) -> DownloadUrl:
        """A presigned URL that downloads ``path`` straight from the workspace store (S3)."""
        c.check_path(path)
        secs = 0 if expires_in is None else _units.ceil_seconds(expires_in, "expires_in")
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_SYNC_TIMEOUT))

        async def call(stub: AsyncData, md: c.Metadata, info: pb.Session, left: float) -> pb.GetDownloadUrlResponse:
            req = pb.GetDownloadUrlRequest(session_id=info.id, path=path, expires_in_seconds=secs)
            return await stub.download_url(req, timeout=left, metadata=md)

        r = await self._data_call("get_download_url", call, deadline, lambda e: True)
        return DownloadUrl(url=r.url, expires_at=ms_to_datetime(r.expires_at_ms), size=r.size, sha256=r.sha256)

    async def disk_usage(self, *, timeout: _units.Duration | None = None) -> DiskUsage:
        """How much of its disk quota the session uses now, as the kernel counts it."""
        deadline = c.Deadline(c.timeout_of(timeout, self._client.timeout))

        async def call(stub: AsyncData, md: c.Metadata, info: pb.Session, left: float) -> pb.GetDiskUsageResponse:
            return await stub.disk_usage(pb.GetDiskUsageRequest(session_id=info.id), timeout=left, metadata=md)

        r = await self._data_call("get_disk_usage", call, deadline, lambda e: True)
        return DiskUsage(
            used_bytes=r.used_bytes, limit_bytes=r.limit_bytes, used_inodes=r.used_inodes, limit_inodes=r.limit_inodes
        )


class AsyncExecStream:
    """The events of a running exec, for ``async for``; ``result`` holds the :class:`ExecResult` at the end.

    ``await stream.wait()`` runs it to the end; ``await stream.close()`` (or
    leaving ``async with``) cancels the call, and the agent kills the command
    (when it next writes output).
    """

    def __init__(self, session: AsyncSession, req: pb.ExecRequest, grpc_timeout: float) -> None:
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

    def __aiter__(self) -> AsyncIterator[ExecEvent]:
        """The events."""
        return self

    async def __anext__(self) -> ExecEvent:
        """The next event."""
        return await self._events.__anext__()

    async def __aenter__(self) -> AsyncExecStream:
        """The stream itself."""
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Cancels the call if it is still running."""
        await self.close()

    async def close(self) -> None:
        """Cancels the call if it is still running (the agent kills the command when it next writes output)."""
        self._cancelled = True
        if self._call is not None and self.result is None:
            self._call.cancel()
        await self._events.aclose()

    async def wait(self) -> ExecResult:
        """Runs the exec to its end and returns its result."""
        async for _ in self:
            pass
        if self.result is None:
            raise Internal("the exec stream ended without an exit status")
        return self.result

    async def _start(
        self, stub: AsyncData, md: c.Metadata, info: pb.Session, left: float
    ) -> tuple[Any, pb.ExecResponse | None]:
        call: Any = stub.exec(self._req, timeout=left, metadata=md)
        self._call = call
        first = await call.read()
        if first is _EOF:
            return call, None
        return call, first

    async def _run(self) -> AsyncGenerator[ExecEvent, None]:
        call, first = await self._session._data_call(
            "exec",
            self._start,
            self._deadline,
            lambda e: c.code_of(e) != grpc.StatusCode.UNAVAILABLE or c.never_started(e),
        )
        msg: pb.ExecResponse | None = first
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
                    nxt = await call.read()
                except grpc.RpcError as e:
                    if self._cancelled:
                        return
                    raise self._session._data_error(e, self._session._info) from None
                msg = None if nxt is _EOF else nxt
        finally:
            if self.result is None:
                call.cancel()
        raise Internal("the exec stream ended without an exit status")


class _AsyncUpload:
    """The source of an async upload, read in 1 MiB chunks; replayable when it can be read again."""

    def __init__(self, data: AsyncUploadData) -> None:
        self._bytes: bytes | None = None
        self._file: Any | None = None
        self._iter: Iterable[bytes] | None = None
        self._aiter: AsyncIterable[bytes] | None = None
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
        elif isinstance(data, AsyncIterable):
            self._aiter = data
        elif isinstance(data, Iterable):
            self._iter = data
        else:
            raise InvalidArgument(f"cannot upload {type(data).__name__}: give bytes, str, a file object or chunks")

    def replayable(self) -> bool:
        return self._bytes is not None or self._seekable or not self._touched

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._bytes is not None:
            data = self._bytes
            for i in range(0, len(data), c.WRITE_CHUNK_BYTES):
                yield data[i : i + c.WRITE_CHUNK_BYTES]
            return
        if self._file is not None:
            f = self._file
            loop = asyncio.get_running_loop()
            if self._touched:
                if not self._seekable:
                    raise Aborted("the upload's source was partly read and cannot be read again; upload again")
                await loop.run_in_executor(None, f.seek, self._start)
            self._touched = True
            while True:
                piece = await loop.run_in_executor(None, f.read, c.WRITE_CHUNK_BYTES)
                if not piece:
                    return
                yield piece.encode("utf-8") if isinstance(piece, str) else bytes(piece)
        source: AsyncIterator[bytes] | None = None
        if self._aiter is not None:
            source = self._aiter.__aiter__()
        elif self._iter is not None:
            source = _aiter_of(self._iter)
        if source is not None:
            if self._touched:
                raise Aborted("the upload's chunks were partly sent and cannot be sent again; upload again")
            self._touched = True
            buf = bytearray()
            async for piece in source:
                buf += piece
                while len(buf) >= c.WRITE_CHUNK_BYTES:
                    yield bytes(buf[: c.WRITE_CHUNK_BYTES])
                    del buf[: c.WRITE_CHUNK_BYTES]
            if buf:
                yield bytes(buf)

    async def requests(self, session_id: str, path: str, mode: int) -> AsyncIterator[pb.WriteFileRequest]:
        """The upload messages: the first carries the session, path and mode (and maybe data)."""
        self.error = None
        header = pb.WriteFileRequest(session_id=session_id, path=path, mode=mode)
        try:
            sent_header = False
            async for piece in self.chunks():
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


async def _aiter_of(it: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in it:
        yield piece


class AsyncFiles:
    """A session's workspace for asyncio: ``s.files``; the twin of :class:`sandfleet.Files`."""

    def __init__(self, session: AsyncSession) -> None:
        """The files of ``session``."""
        self._session = session

    async def write(
        self,
        path: str,
        data: AsyncUploadData,
        *,
        mode: int = 0,
        timeout: _units.Duration | None = None,
    ) -> WriteResult:
        """Uploads ``data`` (bytes, text, a file object, or (async) byte chunks) to ``path``, in 1 MiB chunks."""
        c.check_path(path)
        source = _AsyncUpload(data)
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_TRANSFER_TIMEOUT))

        async def call(stub: AsyncData, md: c.Metadata, info: pb.Session, left: float) -> pb.WriteFileResponse:
            try:
                return await stub.write(source.requests(info.id, path, mode), timeout=left, metadata=md)
            except grpc.RpcError:
                if source.error is not None:
                    raise source.error from None
                raise

        r = await self._session._data_call("write_file", call, deadline, lambda e: source.replayable())
        return WriteResult(size=r.size, sha256=r.sha256)

    async def read(self, path: str, *, timeout: _units.Duration | None = None) -> bytes:
        """Downloads the whole file ``path``."""
        c.check_path(path)
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_TRANSFER_TIMEOUT))

        async def call(stub: AsyncData, md: c.Metadata, info: pb.Session, left: float) -> bytes:
            buf = bytearray()
            stream = stub.read(pb.ReadFileRequest(session_id=info.id, path=path), timeout=left, metadata=md)
            async for r in stream:
                buf += r.data
            return bytes(buf)

        return await self._session._data_call("read_file", call, deadline, lambda e: True)

    async def read_text(self, path: str, *, encoding: str = "utf-8", timeout: _units.Duration | None = None) -> str:
        """Downloads ``path`` and decodes it (undecodable bytes replaced)."""
        return (await self.read(path, timeout=timeout)).decode(encoding, errors="replace")

    async def iter_read(self, path: str, *, timeout: _units.Duration | None = None) -> AsyncIterator[bytes]:
        """Downloads ``path`` as pieces of at most 64 KiB, as they arrive."""
        c.check_path(path)
        deadline = c.Deadline(c.timeout_of(timeout, c.DEFAULT_TRANSFER_TIMEOUT))

        async def start(
            stub: AsyncData, md: c.Metadata, info: pb.Session, left: float
        ) -> tuple[Any, pb.ReadFileResponse | None]:
            call: Any = stub.read(pb.ReadFileRequest(session_id=info.id, path=path), timeout=left, metadata=md)
            first = await call.read()
            return call, (None if first is _EOF else first)

        call, first = await self._session._data_call("read_file", start, deadline, lambda e: True)
        try:
            if first is None:
                return
            yield first.data
            while True:
                r = await call.read()
                if r is _EOF:
                    return
                yield r.data
        except grpc.RpcError as e:
            raise self._session._data_error(e, self._session._info) from None
        finally:
            call.cancel()

    async def list(self, path: str = "", *, timeout: _units.Duration | None = None) -> builtins.list[FileEntry]:
        """The entries of one directory (``""`` is the workspace root), sorted by name."""
        deadline = c.Deadline(c.timeout_of(timeout, self._session._client.timeout))

        async def call(stub: AsyncData, md: c.Metadata, info: pb.Session, left: float) -> pb.ListFilesResponse:
            return await stub.list(pb.ListFilesRequest(session_id=info.id, path=path), timeout=left, metadata=md)

        r = await self._session._data_call("list_files", call, deadline, lambda e: True)
        return [FileEntry.from_proto(e) for e in r.entries]

    async def exists(self, path: str, *, timeout: _units.Duration | None = None) -> bool:
        """True when ``path`` exists in the workspace (a file, directory or symlink)."""
        c.check_path(path)
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            return any(e.name == name for e in await self.list(parent, timeout=timeout))
        except NotFound:
            return False

    async def remove(self, path: str, *, recursive: bool = False, timeout: _units.Duration | None = None) -> None:
        """Removes a file, or a directory and everything under it with ``recursive=True``."""
        c.check_path(path)
        deadline = c.Deadline(c.timeout_of(timeout, self._session._client.timeout))
        attempts = [0]

        async def call(stub: AsyncData, md: c.Metadata, info: pb.Session, left: float) -> None:
            attempts[0] += 1
            req = pb.RemoveFileRequest(session_id=info.id, path=path, recursive=recursive)
            try:
                await stub.remove(req, timeout=left, metadata=md)
            except grpc.RpcError as e:
                if attempts[0] > 1 and c.code_of(e) == grpc.StatusCode.NOT_FOUND and not c.follow_hint(e):
                    return
                raise

        await self._session._data_call("remove_file", call, deadline, lambda e: True)
