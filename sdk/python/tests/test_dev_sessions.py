"""Sessions and exec against ``sandfleet dev``: create, wait, the context manager, idempotent request
ids, get, list over pages with label and state filters, renew, and every field of ExecResult."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import harness
import pytest

from sandfleet import ExecResult, Sandfleet, SessionState, errors


def small(sf: Sandfleet, **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("memory", "128Mi")
    kw.setdefault("cpu", 0.5)
    kw.setdefault("ttl", "10m")
    return sf.sessions.create(**kw)  # type: ignore[arg-type]


def test_the_issue_example(sf: Sandfleet) -> None:
    with sf.sessions.create(
        template="python", memory="512Mi", cpu=0.5, ttl="1h", labels={"team": "ml"}, request_id=None, wait=True
    ) as s:
        assert s.state is SessionState.RUNNING and s.node_id and s.node_address
        assert (s.template, s.memory, s.cpu, s.labels) == ("python", 512 << 20, 0.5, {"team": "ml"})
        assert s.request_id.startswith("sdk-") and not s.existing
        assert s.expires_at is not None and s.created_at is not None
        assert (s.expires_at - s.created_at).total_seconds() == pytest.approx(3600, abs=2)
        r = s.exec("python3", "-c", "print(6*7)", timeout=30)
        assert r.exit_code == 0 and r.stdout == "42\n"
        r = s.run_code("print(6*7)", language="python")
        assert r.exit_code == 0 and r.stdout == "42\n"
        sid = s.id
    # Leaving the block deleted the session.
    assert sf.sessions.get(sid).state is SessionState.TERMINATED
    assert s.state is SessionState.TERMINATED


def test_exec_result_fields(sf: Sandfleet) -> None:
    with small(sf, memory="64Mi") as s:
        r = s.exec("bash", "-c", "printf 'caf\\xc3\\xa9\\n'; printf 'bad \\xff\\n' >&2; exit 3")
        assert isinstance(r, ExecResult)
        assert (r.exit_code, r.ok, r.timed_out, r.oom_killed, r.output_truncated) == (3, False, False, False, False)
        assert r.stdout == "café\n" and r.stdout_bytes == b"caf\xc3\xa9\n"
        assert r.stderr == "bad \ufffd\n" and r.stderr_bytes == b"bad \xff\n"
        assert 0 <= r.duration < 10

        r = s.exec("sleep", "10", timeout=1)
        assert r.timed_out and not r.ok and r.message
        assert 0.9 <= r.duration < 5

        # A process that outgrows the session's 64 MiB is OOM-killed.
        r = s.run_code("b = bytearray(512 * 1024 * 1024)", timeout=20)
        assert r.oom_killed and r.exit_code != 0, r

        # Output past the 16 MiB cap ends the command.
        r = s.exec("bash", "-c", "head -c 40000000 /dev/zero; sleep 5", timeout=20)
        assert r.output_truncated and r.message, r
        assert len(r.stdout_bytes) <= 17 * 1024 * 1024

        r = s.exec("bash", "-c", "kill -9 $$")
        assert (r.exit_code, r.signal) == (137, 9)

        r = s.exec("cat", stdin=b"from stdin")
        assert r.stdout == "from stdin"
        r = s.exec("bash", "-c", "mkdir -p sub && cd sub && echo $GREETING > g.txt && pwd", env={"GREETING": "hi"})
        assert r.ok and r.stdout.strip().endswith("/sub")
        assert s.exec("cat", "g.txt", workdir="sub").stdout == "hi\n"

        for lang, code, out in (
            ("python", "import sys; print(sys.version_info[0])", "3\n"),
            ("node", "console.log(6*7)", "42\n"),
            ("bash", "echo $((6*7))", "42\n"),
        ):
            r = s.run_code(code, language=lang)
            assert (r.exit_code, r.stdout) == (0, out), (lang, r)


def test_create_is_idempotent_on_request_id(sf: Sandfleet) -> None:
    rid = f"py-idem-{uuid.uuid4()}"
    a = small(sf, request_id=rid, labels={"idem": "1"}, wait=False)
    b = small(sf, request_id=rid, labels={"idem": "1"}, wait=False)
    try:
        assert a.id == b.id and not a.existing and b.existing
        with pytest.raises(errors.AlreadyExists) as e:
            small(sf, request_id=rid, labels={"idem": "2"}, wait=False)
        assert e.value.from_server and "labels" in e.value.message
        assert a.wait(timeout=60).state is SessionState.RUNNING
    finally:
        a.delete()


def test_get_list_pages_filters_and_renew(sf: Sandfleet) -> None:
    run = uuid.uuid4().hex[:10]
    made = [small(sf, labels={"listrun": run, "i": str(i)}, wait=False) for i in range(5)]
    try:
        for s in made:
            s.wait(timeout=60)
        got = sf.sessions.get(made[0].id)
        assert got.id == made[0].id and got.state is SessionState.RUNNING and got.labels["listrun"] == run
        # Every page: 5 sessions in pages of 2.
        listed = list(sf.sessions.list(labels={"listrun": run}, page_size=2))
        assert sorted(s.id for s in listed) == sorted(s.id for s in made)
        assert [s.id for s in listed] == sorted(s.id for s in listed), "ordered by id"
        assert len(list(sf.sessions.list(labels={"listrun": run, "i": "3"}))) == 1
        made[0].delete()
        running = {s.id for s in sf.sessions.list(labels={"listrun": run}, state="running", page_size=1)}
        assert running == {s.id for s in made[1:]}
        ended = [s.id for s in sf.sessions.list(labels={"listrun": run}, state=[SessionState.TERMINATED])]
        assert ended == [made[0].id]
        # A listed session has no token: its first data-plane call fetches one.
        first = next(iter(sf.sessions.list(labels={"listrun": run, "i": "1"})))
        assert first.exec("true").ok

        before = made[1].expires_at
        assert before is not None
        time.sleep(1.1)
        made[1].renew(ttl="2h")
        after = made[1].expires_at
        assert after is not None and (after - before).total_seconds() > 3600
        made[1].renew()
        assert made[1].expires_at is not None and made[1].expires_at < after
    finally:
        for s in made:
            s.delete()


def test_one_client_shared_by_threads(sf: Sandfleet) -> None:
    with small(sf) as s:
        results: list[str] = []
        errs: list[BaseException] = []

        def work(i: int) -> None:
            try:
                results.append(s.exec("echo", str(i)).stdout.strip())
            except BaseException as e:
                errs.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errs and sorted(results, key=int) == [str(i) for i in range(8)]


def test_every_call_takes_a_timeout(sf: Sandfleet) -> None:
    with small(sf) as s:
        # A deadline too short for a round trip: the transport's DEADLINE_EXCEEDED.
        with pytest.raises(errors.DeadlineExceeded):
            sf.sessions.get(s.id, timeout=0.000001)
        with pytest.raises(errors.DeadlineExceeded):
            s.files.list(timeout=0.000001)
        assert sf.sessions.get(s.id, timeout=5).id == s.id


def _create_pool(endpoint: str, name: str, buffer: int) -> None:
    """A warm pool, made with the PoolService stub (the Python SDK claims from pools; pools are made by operators)."""
    from sandfleet._proto import sandfleet_pb2 as pb

    with grpc.insecure_channel(endpoint) as ch:
        create = ch.unary_unary(
            "/sandfleet.v1.PoolService/CreatePool",
            request_serializer=pb.CreatePoolRequest.SerializeToString,
            response_deserializer=pb.CreatePoolResponse.FromString,
        )
        spec = pb.SessionSpec(memory_bytes=64 << 20, cpu_millis=100, env={"FROM_POOL": name})
        pool = pb.Pool(name=name, spec=spec, min=0, max=10, buffer_min=buffer, buffer_max=buffer)
        create(pb.CreatePoolRequest(pool=pool), timeout=10)


def test_a_claim_from_a_warm_pool_runs_at_once(sf: Sandfleet, dev: harness.Dev) -> None:
    _create_pool(dev.endpoint, "pypool", 2)
    deadline = time.monotonic() + 60
    while True:
        s = sf.sessions.create(pool="pypool", request_id=f"py-claim-{uuid.uuid4().hex}", wait=False)
        if s.claimed:
            break
        # The pool was still filling: this one started cold, and says so.
        assert "started cold" in s.message and not s.pool
        s.delete()
        assert time.monotonic() < deadline, "the pool never held an idle sandbox"
        time.sleep(0.2)
    with s:
        assert s.state is SessionState.RUNNING and s.pool == "pypool"
        assert s.exec("sh", "-c", "echo $FROM_POOL").stdout == "pypool\n"
    with pytest.raises(errors.InvalidArgument):
        sf.sessions.create(pool="pypool", memory="64Mi")
    with pytest.raises(errors.NotFound):
        sf.sessions.create(pool="no-such-pool")


def _create_template(endpoint: str, name: str) -> None:
    """A cluster template, made with the TemplateService stub (templates are made by operators)."""
    from sandfleet._proto import sandfleet_pb2 as pb

    with grpc.insecure_channel(endpoint) as ch:
        create = ch.unary_unary(
            "/sandfleet.v1.TemplateService/CreateTemplate",
            request_serializer=pb.CreateTemplateRequest.SerializeToString,
            response_deserializer=pb.CreateTemplateResponse.FromString,
        )
        spec = pb.SessionSpec(template="python", memory_bytes=64 << 20, cpu_millis=100, env={"MODE": name})
        template = pb.Template(name=name, spec=spec, allowed_overrides=["env"])
        create(pb.CreateTemplateRequest(template=template), timeout=10)


def test_a_session_of_a_cluster_template_gets_its_spec(sf: Sandfleet, dev: harness.Dev) -> None:
    _create_template(dev.endpoint, "pytpl")
    with sf.sessions.create(template="pytpl", env={"SEED": "7"}) as s:
        assert s.template == "pytpl" and s.memory == 64 << 20
        assert s.exec("sh", "-c", "echo $MODE:$SEED").stdout == "pytpl:7\n"
    # The template allows env only: a memory override is refused, naming the field.
    with pytest.raises(errors.InvalidArgument, match="memory_bytes"):
        sf.sessions.create(template="pytpl", memory="128Mi")
    with pytest.raises(errors.InvalidArgument, match="unknown template"):
        sf.sessions.create(template="no-such-template")
