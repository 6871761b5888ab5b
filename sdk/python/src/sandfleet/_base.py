"""What sync and asyncio sessions share: the session's fields, read from its latest record."""

from __future__ import annotations

import datetime
import threading

from ._proto import sandfleet_pb2 as pb
from .types import SessionState, ms_to_datetime


class SessionFields:
    """Read-only views of a session record (``Session`` in the proto), refreshed by the SDK.

    The record is replaced whole (never edited), so readers in other threads
    always see one consistent version.
    """

    _info: pb.Session
    _existing: bool

    def _init_fields(self, info: pb.Session, existing: bool = False) -> None:
        self._info = info
        self._existing = existing
        self._info_lock = threading.Lock()

    def _set_info(self, info: pb.Session) -> None:
        """Keeps a newer record; a record without a token keeps the token we have, if any."""
        with self._info_lock:
            if not info.token and self._info.token and info.generation == self._info.generation:
                merged = pb.Session()
                merged.CopyFrom(info)
                merged.token = self._info.token
                info = merged
            self._info = info

    @property
    def id(self) -> str:
        """The session id (a lowercase, hyphenated UUID)."""
        return self._info.id

    @property
    def request_id(self) -> str:
        """The request id that created the session."""
        return self._info.request_id

    @property
    def existing(self) -> bool:
        """True when the create found that its request id had already created this session."""
        return self._existing

    @property
    def pool(self) -> str:
        """The warm pool this session was claimed from (``""`` for other sessions)."""
        return self._info.pool

    @property
    def claimed(self) -> bool:
        """True when this session is a warm-pool sandbox a client claimed (it ran before the claim)."""
        return self._info.claimed_at_ms != 0

    @property
    def state(self) -> SessionState:
        """The state when the SDK last read the session (see ``refresh()``)."""
        return SessionState.from_proto(self._info.state)

    @property
    def node_id(self) -> str:
        """The node the session is placed on; empty while unplaced."""
        return self._info.node_id

    @property
    def node_address(self) -> str:
        """The data-plane address (host:port) of that node's agent."""
        return self._info.node_address

    @property
    def generation(self) -> int:
        """Placement generation: incremented each time the session is placed (again)."""
        return self._info.generation

    @property
    def labels(self) -> dict[str, str]:
        """The session's labels (a copy)."""
        return dict(self._info.spec.labels)

    @property
    def spec(self) -> pb.SessionSpec:
        """What the session asked for, with server defaults filled in (a copy of the proto message)."""
        s = pb.SessionSpec()
        s.CopyFrom(self._info.spec)
        return s

    @property
    def template(self) -> str:
        """The sandbox template."""
        return self._info.spec.template

    @property
    def memory(self) -> int:
        """Memory limit in bytes."""
        return self._info.spec.memory_bytes

    @property
    def cpu(self) -> float:
        """CPU limit in cores."""
        return self._info.spec.cpu_millis / 1000.0

    @property
    def created_at(self) -> datetime.datetime | None:
        """Creation time, UTC."""
        return ms_to_datetime(self._info.created_at_ms)

    @property
    def expires_at(self) -> datetime.datetime | None:
        """Expiry time, UTC; ``renew()`` pushes it out."""
        return ms_to_datetime(self._info.expires_at_ms)

    @property
    def pending_reason(self) -> str:
        """Why a PENDING or LOST session is not running yet."""
        return self._info.pending_reason

    @property
    def message(self) -> str:
        """The server's detail for a FAILED or TERMINATED session."""
        return self._info.message

    @property
    def restarts(self) -> int:
        """How many times it was placed again after losing its node."""
        return self._info.restarts

    @property
    def tenant(self) -> str:
        """The tenant that owns it."""
        return self._info.tenant

    @property
    def proto(self) -> pb.Session:
        """The latest record as the wire message (a copy, without the data-plane token)."""
        s = pb.Session()
        s.CopyFrom(self._info)
        s.token = ""
        return s

    def __repr__(self) -> str:
        """The id, state and node."""
        node = f" on {self.node_id}" if self.node_id else ""
        return f"<{type(self).__name__} {self.id} {self.state.value}{node}>"
