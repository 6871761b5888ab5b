"""What needs no cluster: configuration from the environment, quantities, error classes, retry rules."""

from __future__ import annotations

import datetime

import grpc
import pytest

import sandfleet
from sandfleet import Sandfleet, SessionState, _common, _config, _units, errors
from sandfleet._proto import sandfleet_pb2 as pb
from sandfleet.types import ExecResult, Language

KEY = "sfk_0123456789abcdef_" + "A" * 43


def test_environment_names_match_the_cli_and_the_rust_sdk() -> None:
    # The Rust SDK's ENV_* constants (client/src/client.rs) and the CLI's clap env names.
    assert sandfleet.ENV_ENDPOINT == "SANDFLEET_ENDPOINT"
    assert sandfleet.ENV_API_KEY == "SANDFLEET_API_KEY"
    assert (sandfleet.ENV_TLS_CA, sandfleet.ENV_TLS_CERT, sandfleet.ENV_TLS_KEY) == (
        "SANDFLEET_TLS_CA",
        "SANDFLEET_TLS_CERT",
        "SANDFLEET_TLS_KEY",
    )
    assert sandfleet.DEFAULT_ENDPOINT == "127.0.0.1:7070"


def test_config_from_the_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"CA")
    cert = tmp_path / "me.crt"
    cert.write_bytes(b"CERT")
    key = tmp_path / "me.key"
    key.write_bytes(b"KEY")
    env = {
        "SANDFLEET_ENDPOINT": " a:1, http://b:2 ,,a:1",
        "SANDFLEET_API_KEY": f" {KEY} ",
        "SANDFLEET_TLS_CA": str(ca),
        "SANDFLEET_TLS_CERT": str(cert),
        "SANDFLEET_TLS_KEY": str(key),
    }
    c = _config.resolve(environ=env)
    assert c.endpoints == ("a:1", "b:2")
    assert c.api_key == KEY
    assert c.control_metadata() == (("authorization", f"Bearer {KEY}"),)
    assert c.tls == _config.TlsFiles(ca=b"CA", cert=b"CERT", key=b"KEY")
    assert KEY not in repr(c), "the key must not be printed"
    # Arguments win over the environment.
    c = _config.resolve(["x:9", "y:8,z:7"], api_key="", tls_ca=str(ca), tls_cert=None, environ={})
    assert c.endpoints == ("x:9", "y:8", "z:7")
    assert c.api_key is None
    assert c.tls is not None and c.tls.cert is None
    # Nothing set: a sandfleet dev cluster.
    c = _config.resolve(environ={"SANDFLEET_API_KEY": "  "})
    assert c.endpoints == ("127.0.0.1:7070",) and c.api_key is None and c.tls is None


def test_bad_configuration_is_refused_before_any_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.InvalidArgument, match="API key"):
        _config.resolve(api_key="sfk_short", environ={})
    with pytest.raises(errors.InvalidArgument, match="needs the cluster CA"):
        _config.resolve(environ={"SANDFLEET_TLS_CERT": "/c", "SANDFLEET_TLS_KEY": "/k"})
    with pytest.raises(errors.InvalidArgument, match="go together"):
        _config.resolve(environ={"SANDFLEET_TLS_CA": str(tmp_path), "SANDFLEET_TLS_CERT": "/c"})
    with pytest.raises(errors.InvalidArgument, match="cannot read"):
        _config.resolve(environ={"SANDFLEET_TLS_CA": str(tmp_path / "missing.crt")})
    with pytest.raises(errors.InvalidArgument, match="endpoint"):
        _config.resolve(" , ", environ={})
    with pytest.raises(ValueError, match="endpoint"):  # InvalidArgument is a ValueError too
        Sandfleet("http://a/b")


def test_quantities_and_durations_read_like_the_cli() -> None:
    assert _units.parse_memory("256Mi") == 256 << 20
    assert _units.parse_memory("1G") == 1_000_000_000
    assert _units.parse_memory("1.5Gi") == 3 << 29
    assert _units.parse_memory(1024) == 1024
    assert _units.parse_cpu(0.5) == 500
    assert _units.parse_cpu("250m") == 250
    assert _units.parse_cpu("2") == 2000
    assert _units.parse_cpu(2) == 2000
    assert _units.parse_duration("1h") == 3600
    assert _units.parse_duration("1h30m") == 5400
    assert _units.parse_duration("1h 30m") == 5400
    assert _units.parse_duration("250ms") == 0.25
    assert _units.parse_duration("45") == 45
    assert _units.parse_duration(datetime.timedelta(minutes=2)) == 120
    assert _units.ceil_seconds(1.5, "ttl") == 2
    assert _units.millis(0.0001, "timeout") == 1
    for bad in ("12Zi", "Mi", "", "x"):
        with pytest.raises(errors.InvalidArgument):
            _units.parse_memory(bad)
    for bad_cpu in ("x", "1.5m", True):
        with pytest.raises(errors.InvalidArgument):
            _units.parse_cpu(bad_cpu)  # type: ignore[arg-type]
    for bad_d in ("soon", "5 parsecs", "-1", -1):
        with pytest.raises(errors.InvalidArgument):
            _units.parse_duration(bad_d)


def test_the_spec_carries_every_argument() -> None:
    spec = _common.build_spec(
        template="python",
        memory="512Mi",
        cpu=0.5,
        cpu_request="100m",
        ttl="1h",
        labels={"team": "ml"},
        env={"A": "1"},
        pids=64,
        disk="1Gi",
        disk_inodes=4096,
        idle_timeout="15m",
        node_selector={"zone": "b"},
        runtime="process",
        lost_after="10s",
        max_attempts=3,
        restart_backoff=1,
    )
    assert spec.template == "python"
    assert (spec.memory_bytes, spec.cpu_millis, spec.cpu_request_millis) == (512 << 20, 500, 100)
    assert (spec.ttl_seconds, spec.idle_timeout_seconds, spec.pids_limit) == (3600, 900, 64)
    assert (spec.disk_bytes, spec.disk_inodes, spec.runtime) == (1 << 30, 4096, "process")
    assert dict(spec.labels) == {"team": "ml"} and dict(spec.env) == {"A": "1"}
    assert dict(spec.node_selector) == {"zone": "b"}
    assert (spec.restart_policy.lost_after_ms, spec.restart_policy.max_attempts) == (10000, 3)
    assert spec.restart_policy.backoff_ms == 1000
    with pytest.raises(errors.InvalidArgument):
        _common.check_request_id("has space")
    assert _common.new_request_id().startswith("sdk-")


def test_exec_requests() -> None:
    req, deadline = _common.exec_request(
        "s1", ["python3", "-c", "print(1)"], timeout=5, env={"A": "1"}, stdin="in", workdir="sub"
    )
    assert list(req.argv.argv) == ["python3", "-c", "print(1)"]
    assert (req.timeout_ms, req.stdin, req.workdir, dict(req.env)) == (5000, b"in", "sub", {"A": "1"})
    assert deadline == 65.0, "the command's timeout plus 60 s for the agent to report it"
    req, deadline = _common.exec_request(
        "s1", (), code="print(1)", language="js", timeout=None, env=None, stdin=None, workdir=None
    )
    assert req.code.language == pb.LANGUAGE_NODE and req.timeout_ms == 0 and deadline == 90.0
    with pytest.raises(errors.InvalidArgument):
        _common.exec_request("s1", (), timeout=None, env=None, stdin=None, workdir=None)
    with pytest.raises(errors.InvalidArgument):
        Language.parse("cobol")


def test_error_classes_per_status_family() -> None:
    families = {
        grpc.StatusCode.NOT_FOUND: errors.NotFound,
        grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
        grpc.StatusCode.OUT_OF_RANGE: errors.OutOfRange,
        grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
        grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
        grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
        grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
        grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
        grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
        grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
        grpc.StatusCode.ABORTED: errors.Aborted,
        grpc.StatusCode.CANCELLED: errors.Cancelled,
        grpc.StatusCode.INTERNAL: errors.Internal,
        grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
        grpc.StatusCode.DATA_LOSS: errors.DataLoss,
        grpc.StatusCode.UNKNOWN: errors.Unknown,
    }
    for code, cls in families.items():
        e = errors.error_class(code)("the server's words", code=code, from_server=True)
        assert isinstance(e, cls) and isinstance(e, errors.SandfleetError)
        assert e.code == code and e.message == "the server's words"
        assert str(e) == f"{code.name}: the server's words"
    assert issubclass(errors.OutOfRange, errors.InvalidArgument)
    assert issubclass(errors.InvalidArgument, ValueError)
    assert issubclass(errors.SessionEnded, errors.FailedPrecondition)


def test_retry_classification_and_backoff() -> None:
    class Fake(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, details: str) -> None:
            self._c, self._d = code, details

        def code(self) -> grpc.StatusCode:
            return self._c

        def details(self) -> str:
            return self._d

    refused = Fake(
        grpc.StatusCode.UNAVAILABLE,
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
        "Failed to connect to remote host: Connection refused",
    )
    broken = Fake(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")
    assert _common.is_connect_failure(refused) and not _common.is_connect_failure(broken)
    assert _common.never_started(refused) and not _common.never_started(broken)
    assert _common.never_started(Fake(grpc.StatusCode.UNAVAILABLE, "session x is still starting; retry"))
    assert _common.control_retryable(broken, deadline_left=True)
    assert _common.control_retryable(Fake(grpc.StatusCode.DEADLINE_EXCEEDED, ""), deadline_left=True)
    assert not _common.control_retryable(Fake(grpc.StatusCode.DEADLINE_EXCEEDED, ""), deadline_left=False)
    assert not _common.control_retryable(Fake(grpc.StatusCode.NOT_FOUND, "x"), deadline_left=True)
    assert _common.follow_hint(Fake(grpc.StatusCode.NOT_FOUND, "session s is not running on node n"))
    assert not _common.follow_hint(Fake(grpc.StatusCode.NOT_FOUND, "no such file"))
    assert _common.follow_hint(Fake(grpc.StatusCode.UNAUTHENTICATED, "token expired"))
    b = _common.Backoff()
    assert [b.ceiling(i) for i in (0, 1, 2, 5, 6, 40)] == [0.05, 0.1, 0.2, 1.6, 2.0, 2.0]
    draws = {b.delay(4) for _ in range(200)}
    assert all(0 <= d <= 0.8 for d in draws) and len(draws) > 10


def test_results_and_states() -> None:
    exit_status = pb.ExitStatus(exit_code=0, duration_ms=1500, timed_out=False)
    r = ExecResult.build(b"caf\xc3\xa9\n", b"\xff", exit_status)
    assert (r.stdout, r.stdout_bytes, r.stderr, r.duration, r.ok) == ("café\n", b"caf\xc3\xa9\n", "\ufffd", 1.5, True)
    assert SessionState.parse("running") is SessionState.RUNNING
    assert SessionState.parse("SESSION_STATE_FAILED").terminal
    assert SessionState.from_proto(99) is SessionState.UNSPECIFIED
    assert SessionState.RUNNING == "RUNNING"
    with pytest.raises(errors.InvalidArgument):
        SessionState.parse("bogus")


def test_an_unreachable_cluster_is_unavailable_after_the_retries() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Sandfleet(f"127.0.0.1:{port}", max_retries=2) as sf:
        with pytest.raises(errors.Unavailable) as info:
            sf.sessions.get("0190c8f2-0000-7000-8000-000000000001")
        assert not info.value.from_server
        assert f"127.0.0.1:{port}" in info.value.message


def test_every_public_name_has_a_docstring() -> None:
    import inspect

    missing = []
    for name in sandfleet.__all__:
        obj = getattr(sandfleet, name)
        if isinstance(obj, (str, type(None))) or name.startswith("__"):
            continue
        if not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or (not callable(member) and not isinstance(member, property)):
                    continue
                if not inspect.getdoc(member):
                    missing.append(f"{name}.{attr}")
    assert not missing, f"public names without a docstring: {missing}"
