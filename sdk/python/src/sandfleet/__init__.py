r"""Sandfleet's Python SDK: run untrusted code in hardened sandboxes across a fleet.

::

    from sandfleet import Sandfleet            # AsyncSandfleet for asyncio

    sf = Sandfleet()                            # SANDFLEET_ENDPOINT, SANDFLEET_API_KEY, SANDFLEET_TLS_*
    with sf.sessions.create(template="python", memory="512Mi", cpu=0.5, ttl="1h") as s:
        r = s.exec("python3", "-c", "print(6*7)", timeout=30)
        assert r.exit_code == 0 and r.stdout == "42\\n"

Control-plane calls (sessions) go to the coordinators with failover and
idempotent retries; exec and file calls go straight to the node agent that
runs the session, following it when it moves. Errors are the classes of
:mod:`sandfleet.errors`, one per gRPC status family.
"""

from __future__ import annotations

from . import errors
from ._async import AsyncExecStream, AsyncFiles, AsyncSandfleet, AsyncSession, AsyncSessions
from ._config import (
    DEFAULT_ENDPOINT,
    ENV_API_KEY,
    ENV_ENDPOINT,
    ENV_TLS_CA,
    ENV_TLS_CERT,
    ENV_TLS_KEY,
)
from ._sync import ExecStream, Files, Sandfleet, Session, Sessions
from .errors import SandfleetError
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
)

#: The SDK's version.
__version__ = "0.1.0"

__all__ = [
    "DEFAULT_ENDPOINT",
    "ENV_API_KEY",
    "ENV_ENDPOINT",
    "ENV_TLS_CA",
    "ENV_TLS_CERT",
    "ENV_TLS_KEY",
    "AsyncExecStream",
    "AsyncFiles",
    "AsyncSandfleet",
    "AsyncSession",
    "AsyncSessions",
    "DiskUsage",
    "DownloadUrl",
    "ExecEvent",
    "ExecResult",
    "ExecStream",
    "Exit",
    "FileEntry",
    "Files",
    "Language",
    "Sandfleet",
    "SandfleetError",
    "Session",
    "SessionState",
    "Sessions",
    "Stderr",
    "Stdout",
    "SyncResult",
    "WriteResult",
    "__version__",
    "errors",
]
