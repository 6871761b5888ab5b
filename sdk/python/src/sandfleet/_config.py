"""Client configuration: arguments first, then the environment, as the CLI and the Rust SDK read it.

* ``SANDFLEET_ENDPOINT``: coordinator endpoints, comma-separated, ``host:port``
  or ``http://host:port`` (default ``127.0.0.1:7070``, a ``sandfleet dev`` cluster).
* ``SANDFLEET_API_KEY``: an API key (``sfk_<id>_<secret>``), sent as
  ``authorization: Bearer <key>`` with every control-plane call.
* ``SANDFLEET_TLS_CA``, ``SANDFLEET_TLS_CERT``, ``SANDFLEET_TLS_KEY``: PEM files;
  the CA alone authenticates the servers, with a certificate and its key the
  client authenticates itself too (mutual TLS).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc

from .errors import InvalidArgument

ENV_ENDPOINT = "SANDFLEET_ENDPOINT"
ENV_API_KEY = "SANDFLEET_API_KEY"
ENV_TLS_CA = "SANDFLEET_TLS_CA"
ENV_TLS_CERT = "SANDFLEET_TLS_CERT"
ENV_TLS_KEY = "SANDFLEET_TLS_KEY"
DEFAULT_ENDPOINT = "127.0.0.1:7070"

#: Deadline of a control-plane call, retries included (seconds).
DEFAULT_TIMEOUT = 30.0
#: Deadline of each attempt of a control-plane call (seconds); a hung
#: coordinator costs at most this before the next one is tried.
DEFAULT_ATTEMPT_TIMEOUT = 10.0
#: Retries of a call that may be repeated (so at most this plus one attempts).
DEFAULT_MAX_RETRIES = 8
#: Largest gRPC message any Sandfleet server decodes (a 1 MiB chunk plus headroom).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024

_API_KEY = re.compile(r"sfk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TlsFiles:
    """PEM contents for TLS: the cluster CA, and optionally a client certificate and key."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)

    def credentials(self) -> grpc.ChannelCredentials:
        """GRPC channel credentials for these files."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


@dataclass(frozen=True)
class Config:
    """What a client needs to reach a cluster."""

    endpoints: tuple[str, ...]
    api_key: str | None = field(default=None, repr=False)
    tls: TlsFiles | None = None
    timeout: float = DEFAULT_TIMEOUT
    attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    channel_options: tuple[tuple[str, int | str], ...] = ()

    def control_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of every control-plane call: the API key, if any."""
        if self.api_key:
            return (("authorization", f"Bearer {self.api_key}"),)
        return ()


def normalize_endpoint(endpoint: str) -> str:
    """``http://host:port`` (or ``https://``) becomes the gRPC target ``host:port``."""
    e = endpoint.strip()
    for scheme in ("http://", "https://", "grpc://", "grpcs://"):
        if e.lower().startswith(scheme):
            e = e[len(scheme) :]
            break
    e = e.rstrip("/")
    if not e or "/" in e:
        raise InvalidArgument(f"invalid endpoint {endpoint!r}: expected host:port or http://host:port")
    return e


def _env(environ: Mapping[str, str], key: str) -> str | None:
    v = environ.get(key)
    if v is None or not v.strip():
        return None
    return v.strip()


def _read(path: PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidArgument(f"cannot read the TLS {what} {os.fspath(path)!r}: {e.strerror or e}") from e


def resolve(
    endpoint: str | Sequence[str] | None = None,
    *,
    api_key: str | None = None,
    tls_ca: PathLike | None = None,
    tls_cert: PathLike | None = None,
    tls_key: PathLike | None = None,
    timeout: float | None = None,
    attempt_timeout: float | None = None,
    max_retries: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """The configuration from the arguments, falling back to the environment for each one unset."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    raw: list[str]
    if endpoint is None:
        raw = (_env(env, ENV_ENDPOINT) or DEFAULT_ENDPOINT).split(",")
    elif isinstance(endpoint, str):
        raw = endpoint.split(",")
    else:
        raw = [p for e in endpoint for p in e.split(",")]
    endpoints: list[str] = []
    for e in raw:
        if e.strip():
            n = normalize_endpoint(e)
            if n not in endpoints:
                endpoints.append(n)
    if not endpoints:
        raise InvalidArgument("no coordinator endpoint given")

    key = api_key if api_key is not None else _env(env, ENV_API_KEY)
    key = key.strip() if key else None
    if key and not _API_KEY.fullmatch(key):
        raise InvalidArgument("invalid API key: expected sfk_<16 hex>_<43 base64url characters>")

    ca = tls_ca if tls_ca is not None else _env(env, ENV_TLS_CA)
    cert = tls_cert if tls_cert is not None else _env(env, ENV_TLS_CERT)
    tkey = tls_key if tls_key is not None else _env(env, ENV_TLS_KEY)
    tls: TlsFiles | None = None
    if ca is None and (cert is not None or tkey is not None):
        raise InvalidArgument(f"a TLS client certificate needs the cluster CA too ({ENV_TLS_CA} or tls_ca=)")
    if ca is not None:
        if (cert is None) != (tkey is None):
            raise InvalidArgument(
                "a TLS client certificate and its key go together "
                f"({ENV_TLS_CERT}/tls_cert= and {ENV_TLS_KEY}/tls_key=)"
            )
        tls = TlsFiles(
            ca=_read(ca, "CA certificate"),
            cert=_read(cert, "client certificate") if cert is not None else None,
            key=_read(tkey, "client key") if tkey is not None else None,
        )

    def positive(v: float | None, default: float, name: str) -> float:
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise InvalidArgument(f"{name} must be a positive number of seconds, not {v!r}")
        return float(v)

    retries = DEFAULT_MAX_RETRIES if max_retries is None else max_retries
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgument(f"max_retries must be a non-negative int, not {max_retries!r}")
    return Config(
        endpoints=tuple(endpoints),
        api_key=key or None,
        tls=tls,
        timeout=positive(timeout, DEFAULT_TIMEOUT, "timeout"),
        attempt_timeout=positive(attempt_timeout, DEFAULT_ATTEMPT_TIMEOUT, "attempt_timeout"),
        max_retries=retries,
        channel_options=CHANNEL_OPTIONS,
    )


#: Channel settings: messages as large as the servers take, quick reconnects
#: (a restarted coordinator or agent is used again within a second or two),
#: and keepalives so a silently dead peer is noticed during long calls.
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 0),
)
