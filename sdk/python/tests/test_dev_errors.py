"""Each error class of ``sandfleet.errors`` from a real server's answer, carrying its message.

PermissionDenied needs a TLS cluster (a certificate that may not call the
public API); it is in test_tls.py with the other credential checks.
"""

from __future__ import annotations

import uuid

import pytest

from sandfleet import Sandfleet, errors

UNKNOWN_ID = "0190c8f2-0000-7000-8000-000000000001"


def test_not_found(sf: Sandfleet) -> None:
    with pytest.raises(errors.NotFound) as e:
        sf.sessions.get(UNKNOWN_ID)
    assert e.value.from_server and UNKNOWN_ID in e.value.message
    assert e.value.code_name == "NOT_FOUND" and str(e.value).startswith("NOT_FOUND: ")
    with sf.sessions.create(memory="64Mi", ttl="5m") as s, pytest.raises(errors.NotFound) as e:
        s.files.read("no/such/file")
    assert e.value.from_server


def test_invalid_argument(sf: Sandfleet) -> None:
    with pytest.raises(errors.InvalidArgument) as e:
        sf.sessions.create(labels={"bad key!": "x"}, wait=False)
    assert e.value.from_server and "label" in e.value.message
    assert not isinstance(e.value, errors.OutOfRange)
    with pytest.raises(errors.InvalidArgument) as e:
        sf.sessions.get("not-a-uuid")
    assert e.value.from_server
    with sf.sessions.create(memory="64Mi", ttl="5m") as s, pytest.raises(errors.InvalidArgument) as e:
        s.files.write("../escape.txt", b"x")
    assert e.value.from_server


def test_out_of_range(sf: Sandfleet) -> None:
    with pytest.raises(errors.OutOfRange) as e:
        sf.sessions.create(memory="1Mi", wait=False)
    assert e.value.from_server and "memory" in e.value.message
    with pytest.raises(errors.OutOfRange):
        sf.sessions.create(ttl="30d", wait=False)
    with sf.sessions.create(memory="64Mi", ttl="5m") as s, pytest.raises(errors.OutOfRange) as e:
        s.exec("true", timeout="2h")
    assert e.value.from_server


def test_already_exists(sf: Sandfleet) -> None:
    rid = f"py-exists-{uuid.uuid4()}"
    s = sf.sessions.create(memory="64Mi", ttl="5m", request_id=rid, wait=False)
    try:
        with pytest.raises(errors.AlreadyExists) as e:
            sf.sessions.create(memory="128Mi", ttl="5m", request_id=rid, wait=False)
        assert e.value.from_server and "memory" in e.value.message
    finally:
        s.delete()


def test_resource_exhausted(sf: Sandfleet) -> None:
    # In range (at most 16 TiB) but no registered node could ever hold it.
    with pytest.raises(errors.ResourceExhausted) as e:
        sf.sessions.create(memory="8Ti", wait=False)
    assert e.value.from_server and e.value.message


def test_failed_precondition(sf: Sandfleet) -> None:
    with sf.sessions.create(memory="64Mi", ttl="5m") as s:
        s.files.write("a.txt", b"a")
        with pytest.raises(errors.FailedPrecondition) as e:
            s.download_url("a.txt")
        assert e.value.from_server
    # Exec in a deleted session: the SDK reads it again and says it ended.
    with pytest.raises(errors.SessionEnded) as ended:
        s.exec("true")
    assert isinstance(ended.value, errors.FailedPrecondition) and ended.value.state == "TERMINATED"


def test_unauthenticated(dev) -> None:  # type: ignore[no-untyped-def]
    # A well-formed key the cluster never issued is refused (the message never says why).
    with Sandfleet(dev.endpoint, api_key="sfk_0123456789abcdef_" + "A" * 43) as bad:
        with pytest.raises(errors.Unauthenticated) as e:
            bad.sessions.get(UNKNOWN_ID)
        assert e.value.from_server and e.value.message


def test_unavailable(dev, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import harness

    # Nobody listens: the transport's UNAVAILABLE, after max_retries.
    port = harness.free_port()
    with Sandfleet([f"127.0.0.1:{port}"], max_retries=1) as dead:
        with pytest.raises(errors.Unavailable) as e:
            dead.sessions.create(wait=False)
        assert f"127.0.0.1:{port}" in e.value.message and not e.value.from_server
    # A coordinator that is up but belongs to no cluster yet answers UNAVAILABLE
    # itself; the SDK keeps trying until the call's deadline, then raises its answer.
    argv = [str(harness.binary("sandfleet-coordinator")), "--id", "1", "--listen", "127.0.0.1:0"]
    argv += ["--data-dir", str(tmp_path / "lonely"), "--insecure"]
    lonely = harness.Proc("lonely-coordinator", argv, tmp_path, "coordinator")
    lonely.start()
    try:
        with Sandfleet(lonely.addr) as sf:
            with pytest.raises(errors.Unavailable) as e:
                sf.sessions.create(wait=False, timeout=2)
            assert e.value.from_server and e.value.message
    finally:
        lonely.kill()


def test_deadline_exceeded(sf: Sandfleet) -> None:
    # A session no node can run stays PENDING: the wait runs out, naming the reason.
    with pytest.raises(errors.DeadlineExceeded) as e:
        sf.sessions.create(memory="64Mi", node_selector={"zone": "nowhere"}, wait_timeout=2)
    assert "PENDING" in e.value.message, e.value.message
    # The session the SDK named itself was deleted (nobody else could find it).
    # A call whose deadline passes on the wire.
    with sf.sessions.create(memory="64Mi", ttl="5m") as s:
        s.files.write("x.bin", b"x" * (8 << 20))
        with pytest.raises(errors.DeadlineExceeded):
            s.files.read("x.bin", timeout=0.001)
