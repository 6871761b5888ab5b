"""The values the SDK returns: exec results and events, file entries, and session states."""

from __future__ import annotations

import datetime
import enum
from dataclasses import dataclass, field

from ._proto import sandfleet_pb2 as pb

__all__ = [
    "DiskUsage",
    "DownloadUrl",
    "ExecEvent",
    "ExecResult",
    "Exit",
    "FileEntry",
    "Language",
    "SessionState",
    "Stderr",
    "Stdout",
    "SyncResult",
    "WriteResult",
]


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def ms_to_datetime(ms: int) -> datetime.datetime | None:
    """A Unix-milliseconds timestamp as an aware UTC datetime; ``None`` for 0 (unset)."""
    if ms <= 0:
        return None
    return datetime.datetime.fromtimestamp(ms / 1000.0, tz=datetime.timezone.utc)


class SessionState(str, enum.Enum):
    """The lifecycle state of a session (a ``str``: ``SessionState.RUNNING == "RUNNING"``)."""

    #: Never sent by servers; a newer server's state this SDK does not know.
    UNSPECIFIED = "UNSPECIFIED"
    #: Accepted and durable, waiting to be placed or started (see ``pending_reason``).
    PENDING = "PENDING"
    #: Its sandbox is ready; exec and file calls are accepted.
    RUNNING = "RUNNING"
    #: Its node stopped heartbeating; it waits to be placed again.
    LOST = "LOST"
    #: Ended: deleted, expired, or failed for good. Terminal.
    TERMINATED = "TERMINATED"
    #: Could not be started and will not be retried. Terminal.
    FAILED = "FAILED"

    @property
    def terminal(self) -> bool:
        """True for states a session never leaves (TERMINATED, FAILED)."""
        return self in (SessionState.TERMINATED, SessionState.FAILED)

    @classmethod
    def from_proto(cls, value: int) -> SessionState:
        """The state of a wire value (UNSPECIFIED for one this SDK does not know)."""
        try:
            name = pb.SessionState.Name(value)
        except ValueError:
            return cls.UNSPECIFIED
        return cls(name[len("SESSION_STATE_") :])

    @classmethod
    def parse(cls, value: str | SessionState) -> SessionState:
        """``"running"``, ``"RUNNING"``, ``"SESSION_STATE_RUNNING"`` or a ``SessionState``."""
        if isinstance(value, SessionState):
            return value
        text = str(value).strip().upper()
        if text.startswith("SESSION_STATE_"):
            text = text[len("SESSION_STATE_") :]
        try:
            state = cls(text)
        except ValueError:
            state = cls.UNSPECIFIED
        if state is cls.UNSPECIFIED:
            from .errors import InvalidArgument  # noqa: PLC0415

            raise InvalidArgument(f"unknown state {value!r}; expected pending, running, lost, terminated or failed")
        return state

    def to_proto(self) -> int:
        """The wire value."""
        return int(pb.SessionState.Value("SESSION_STATE_" + self.value))


class Language(str, enum.Enum):
    """The interpreter of :meth:`Session.run_code`: ``python3 -c``, ``node -e`` or ``bash -c``."""

    PYTHON = "python"
    NODE = "node"
    BASH = "bash"

    @classmethod
    def parse(cls, value: str | Language) -> Language:
        """``"python"`` (or ``"python3"``, ``"py"``), ``"node"`` (``"javascript"``, ``"js"``), ``"bash"`` (``"sh"``)."""
        if isinstance(value, Language):
            return value
        text = str(value).strip().lower()
        aliases = {
            "python3": "python",
            "py": "python",
            "javascript": "node",
            "js": "node",
            "nodejs": "node",
            "sh": "bash",
        }
        text = aliases.get(text, text)
        try:
            return cls(text)
        except ValueError:
            from .errors import InvalidArgument  # noqa: PLC0415

            raise InvalidArgument(f"unknown language {value!r}; expected python, node or bash") from None

    def to_proto(self) -> int:
        """The wire value."""
        return int(pb.Language.Value("LANGUAGE_" + self.name))


@dataclass(frozen=True)
class ExecResult:
    """Everything an exec produced, once it ended.

    Attributes:
        exit_code: The exit code; ``128 + N`` when a signal N ended it (shell convention).
        stdout: All of standard output, decoded as UTF-8 (undecodable bytes replaced).
        stderr: All of standard error, decoded likewise.
        stdout_bytes: Standard output as the command wrote it.
        stderr_bytes: Standard error as the command wrote it.
        timed_out: The timeout expired and the process tree was killed.
        oom_killed: The kernel's OOM killer ended a process of the session during the exec.
        output_truncated: Output went past the per-exec cap and the command was killed.
        duration: Wall-clock time of the command, in seconds.
        signal: The signal that ended the command, or 0.
        message: The server's explanation when the command did not end on its own.
    """

    exit_code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes = field(repr=False)
    stderr_bytes: bytes = field(repr=False)
    timed_out: bool
    oom_killed: bool
    output_truncated: bool
    duration: float
    signal: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the command exited 0 on its own (no signal, no timeout)."""
        return self.exit_code == 0 and self.signal == 0 and not self.timed_out

    @classmethod
    def build(cls, stdout: bytes, stderr: bytes, exit: pb.ExitStatus) -> ExecResult:
        """The result of collected output and the final status."""
        return cls(
            exit_code=exit.exit_code,
            stdout=_decode(stdout),
            stderr=_decode(stderr),
            stdout_bytes=stdout,
            stderr_bytes=stderr,
            timed_out=exit.timed_out,
            oom_killed=exit.oom_killed,
            output_truncated=exit.output_truncated,
            duration=exit.duration_ms / 1000.0,
            signal=exit.signal,
            message=exit.message,
        )


@dataclass(frozen=True)
class Stdout:
    """Bytes the command wrote to standard output, as they arrived."""

    data: bytes

    @property
    def text(self) -> str:
        """The bytes decoded as UTF-8 (a chunk may split a character: prefer decoding whole output)."""
        return _decode(self.data)


@dataclass(frozen=True)
class Stderr:
    """Bytes the command wrote to standard error, as they arrived."""

    data: bytes

    @property
    def text(self) -> str:
        """The bytes decoded as UTF-8."""
        return _decode(self.data)


@dataclass(frozen=True)
class Exit:
    """How the command ended: always the last event of an exec stream.

    Attributes:
        exit_code: The exit code (``128 + N`` when signal N ended it).
        timed_out: The timeout expired and the process tree was killed.
        oom_killed: The OOM killer ended a process of the session during the exec.
        output_truncated: Output went past the per-exec cap and the command was killed.
        duration: Wall-clock time of the command, in seconds.
        signal: The signal that ended it, or 0.
        message: The server's explanation when the command did not end on its own.
    """

    exit_code: int
    timed_out: bool
    oom_killed: bool
    output_truncated: bool
    duration: float
    signal: int = 0
    message: str = ""

    @classmethod
    def from_proto(cls, exit: pb.ExitStatus) -> Exit:
        """The event of the wire status."""
        return cls(
            exit_code=exit.exit_code,
            timed_out=exit.timed_out,
            oom_killed=exit.oom_killed,
            output_truncated=exit.output_truncated,
            duration=exit.duration_ms / 1000.0,
            signal=exit.signal,
            message=exit.message,
        )


#: One event of a running exec.
ExecEvent = Stdout | Stderr | Exit


@dataclass(frozen=True)
class FileEntry:
    """One entry of a workspace directory.

    Attributes:
        name: Its name within the listed directory.
        kind: ``"file"``, ``"directory"``, ``"symlink"`` or ``"other"`` (symlinks are never followed).
        size: Size in bytes.
        mode: Mode bits (e.g. ``0o644``).
        modified_at: Last modification, UTC.
    """

    name: str
    kind: str
    size: int
    mode: int
    modified_at: datetime.datetime | None

    @property
    def is_dir(self) -> bool:
        """True for a directory."""
        return self.kind == "directory"

    @property
    def is_file(self) -> bool:
        """True for a regular file."""
        return self.kind == "file"

    @classmethod
    def from_proto(cls, e: pb.FileEntry) -> FileEntry:
        """The entry of the wire message."""
        kinds = {pb.FILE_KIND_FILE: "file", pb.FILE_KIND_DIRECTORY: "directory", pb.FILE_KIND_SYMLINK: "symlink"}
        return cls(
            name=e.name,
            kind=kinds.get(e.kind, "other"),
            size=e.size,
            mode=e.mode,
            modified_at=ms_to_datetime(e.modified_at_ms),
        )


@dataclass(frozen=True)
class WriteResult:
    """What an upload wrote: its size and the hex SHA-256 of the content, as the agent computed them."""

    size: int
    sha256: str


@dataclass(frozen=True)
class SyncResult:
    """The workspace as a sync left it in the store.

    Attributes:
        files: Regular files in the workspace.
        bytes: Their total size.
        uploaded_files: Files whose content this sync uploaded.
        uploaded_bytes: Bytes this sync uploaded.
        manifest_version: Version of the workspace manifest now current in the store.
        store: Where the workspace is kept.
    """

    files: int
    bytes: int
    uploaded_files: int
    uploaded_bytes: int
    manifest_version: int
    store: str


@dataclass(frozen=True)
class DownloadUrl:
    """A presigned URL that downloads one file straight from the workspace store.

    Attributes:
        url: The URL; it needs no credentials.
        expires_at: When it stops working, UTC.
        size: Size of the file in bytes.
        sha256: Hex SHA-256 of the file.
    """

    url: str
    expires_at: datetime.datetime | None
    size: int
    sha256: str


@dataclass(frozen=True)
class DiskUsage:
    """How much of its disk quota a session uses, as the kernel counts it."""

    used_bytes: int
    limit_bytes: int
    used_inodes: int
    limit_inodes: int
