"""Three coordinators and two agents as separate processes (loopback, plaintext): 200 concurrent
asyncio sessions from one event loop, the leader SIGKILLed during 50 concurrent creates, and an
agent SIGKILLed (or drained) under a session whose Session object keeps working.

The coordinators run with ``--agent-heartbeat 500ms --node-ttl 3s`` (as the Rust end-to-end tests
do) so a dead agent's sessions move within seconds; the agents offer 256 slots without per-session
disk filesystems so 200 small sessions fit on 2 cores.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import harness
import pytest
from conftest import need_facilities

from sandfleet import AsyncSandfleet, Sandfleet, SessionState, errors
from sandfleet._proto import sandfleet_pb2 as pb
from sandfleet._proto import sandfleet_pb2_grpc

TINY = {"memory": "32Mi", "cpu": "100m", "cpu_request": "10m", "pids": 32, "ttl": "15m"}


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[harness.Cluster]:
    need_facilities(("sandfleet-coordinator", "sandfleet-agent"))
    c = harness.Cluster(
        coordinators=3,
        agents=2,
        coordinator_args=["--agent-heartbeat", "500ms", "--node-ttl", "3s"],
        agent_args=["--slots", "256", "--cpu", "64", "--memory", "64Gi", "--disk-quota", "off"],
    )
    yield c
    if request.session.testsfailed:
        sys.__stderr__.write(f"\n===== cluster logs (tails) =====\n{c.logs(60)}\n")
    c.close()


def delete_labelled(sf: Sandfleet, labels: dict[str, str]) -> None:
    ids = [s.id for s in sf.sessions.list(labels=labels)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: sf.sessions.delete(i), ids))


async def test_asyncio_200_concurrent_sessions_from_one_event_loop(cluster: harness.Cluster) -> None:
    n = 200
    run = uuid.uuid4().hex[:10]
    t0 = time.monotonic()
    async with AsyncSandfleet(cluster.endpoint) as sf:
        sessions = await asyncio.gather(
            *(sf.sessions.create(**TINY, labels={"async200": run}, wait_timeout=240) for _ in range(n))  # type: ignore[arg-type]
        )
        created = time.monotonic() - t0
        assert len({s.id for s in sessions}) == n
        assert all(s.state is SessionState.RUNNING for s in sessions)
        # All 200 live at once.
        running = [s async for s in sf.sessions.list(labels={"async200": run}, state="running", page_size=64)]
        assert len(running) == n
        print("sessions per node:", collections.Counter(s.node_id for s in sessions))

        results = await asyncio.gather(*(s.exec("echo", str(i)) for i, s in enumerate(sessions)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(n)]
        streamed = await asyncio.gather(*(collect(s, i) for i, s in enumerate(sessions[:50])))
        assert streamed == [f"s{i}\n".encode() for i in range(50)]
        await asyncio.gather(*(s.delete() for s in sessions))
        assert all(s.state is SessionState.TERMINATED for s in sessions)
    print(f"200 sessions RUNNING {created:.1f}s after the first create; all done in {time.monotonic() - t0:.1f}s")


async def collect(s, i: int) -> bytes:  # type: ignore[no-untyped-def]
    out = b""
    async for ev in s.exec_stream("bash", "-c", f"echo s{i}"):
        if hasattr(ev, "data"):
            out += ev.data
    return out


def test_leader_sigkill_during_50_concurrent_creates_loses_and_doubles_nothing(cluster: harness.Cluster) -> None:
    leader = cluster.leader_index()
    before = cluster.status().sessions_created
    run = uuid.uuid4().hex[:10]
    # The leader first: creates in flight when it dies were sent to it.
    addrs = [p.addr for p in cluster.coordinators]
    endpoints = [addrs[leader]] + [a for i, a in enumerate(addrs) if i != leader]
    workers, rounds = 50, 3
    acked: dict[str, tuple[str, float, bool]] = {}
    failures: list[tuple[str, BaseException]] = []
    lock = threading.Lock()
    start = threading.Barrier(workers + 1)
    killed = threading.Event()

    with Sandfleet(endpoints) as sf:

        def worker(w: int) -> None:
            start.wait()
            for k in range(rounds):
                if k == rounds - 1:
                    killed.wait(60)  # the last round runs against the new leader's election
                rid = f"lk-{run}-{w}-{k}"
                t0 = time.monotonic()
                try:
                    s = sf.sessions.create(**TINY, labels={"lk": run}, request_id=rid, wait=False, timeout=60)  # type: ignore[arg-type]
                except BaseException as e:
                    with lock:
                        failures.append((rid, e))
                    continue
                with lock:
                    acked[rid] = (s.id, time.monotonic() - t0, killed.is_set())

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
        for t in threads:
            t.start()
        start.wait()
        deadline = time.monotonic() + 60
        while len(acked) < workers + 10 and time.monotonic() < deadline:
            time.sleep(0.002)
        in_flight = workers * (rounds - 1) - len(acked)
        cluster.coordinators[leader].kill()
        killed.set()
        for t in threads:
            t.join(120)
        slow = sorted(sec for _, sec, _ in acked.values())[-5:]
        print(f"leader {leader + 1} SIGKILLed with about {in_flight} creates in flight; slowest creates {slow}")

        assert not failures, f"creates failed: {failures[:3]}"
        assert len(acked) == workers * rounds
        # None lost, none doubled: every request id has exactly the session it was acknowledged with.
        listed = list(sf.sessions.list(labels={"lk": run}, page_size=1000))
        by_rid: dict[str, list[str]] = collections.defaultdict(list)
        for s in listed:
            by_rid[s.request_id].append(s.id)
        doubled = {r: ids for r, ids in by_rid.items() if len(ids) > 1}
        assert not doubled, f"request ids with two sessions: {doubled}"
        assert set(by_rid) == set(acked), "every acknowledged create is there, and nothing else"
        for rid, (sid, _, _) in acked.items():
            assert by_rid[rid] == [sid], rid
        # The replicated create counter saw each create once.
        after = cluster.status().sessions_created
        assert after - before == workers * rounds
        assert cluster.leader_index() != leader

        cluster.restart(cluster.coordinators[leader])
        cluster.wait_formed(60)
        delete_labelled(sf, {"lk": run})


def test_a_hung_coordinator_costs_one_attempt_and_doubles_nothing(cluster: harness.Cluster) -> None:
    # A coordinator frozen with SIGSTOP accepts connections but never answers: the
    # create's attempt runs into its deadline, and the retry goes to the next
    # coordinator with the same request id. When the frozen one wakes up and
    # handles the request it had, the create is de-duplicated on that id.
    leader = cluster.leader_index()
    frozen = (leader + 1) % len(cluster.coordinators)
    addrs = [p.addr for p in cluster.coordinators]
    endpoints = [addrs[frozen]] + [a for i, a in enumerate(addrs) if i != frozen]
    run = uuid.uuid4().hex[:10]
    with Sandfleet(endpoints, attempt_timeout=1.0) as sf:
        # Connected before the freeze, as a long-lived client is.
        with pytest.raises(errors.NotFound):
            sf.sessions.get("0190c8f2-0000-7000-8000-000000000001")
        os.kill(cluster.coordinators[frozen].pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            s = sf.sessions.create(**TINY, labels={"hung": run}, request_id=f"hung-{run}", wait=False)  # type: ignore[arg-type]
            took = time.monotonic() - t0
        finally:
            os.kill(cluster.coordinators[frozen].pid, signal.SIGCONT)
        assert 1.0 <= took < 10, took
        # The thawed coordinator catches up; still exactly one session for the request id.
        time.sleep(2)
        again = sf.sessions.create(**TINY, labels={"hung": run}, request_id=f"hung-{run}", wait=False)  # type: ignore[arg-type]
        assert again.id == s.id and again.existing
        assert [x.id for x in sf.sessions.list(labels={"hung": run})] == [s.id]
        print(f"create through a frozen coordinator took {took:.2f}s")
        s.delete()


def test_agent_sigkill_moves_the_session_and_the_same_object_follows_it(cluster: harness.Cluster) -> None:
    with Sandfleet(cluster.endpoint) as sf:
        s = sf.sessions.create(**TINY, labels={"move": "kill"})  # type: ignore[arg-type]
        try:
            s.files.write("keep.txt", b"kept across the move")
            s.sync()  # durable in the shared store before the node dies
            assert s.exec("true").ok
            old_node, old_gen = s.node_id, s.generation
            victim = cluster.agents[cluster.node_ids.index(old_node)]
            # An exec running when its agent dies may have done anything: it is
            # never sent again, its caller gets UNAVAILABLE.
            outcome: list[object] = []

            def long_exec() -> None:
                try:
                    outcome.append(s.exec("sleep", "30", timeout=60))
                except errors.SandfleetError as e:
                    outcome.append(e)

            runner = threading.Thread(target=long_exec)
            runner.start()
            time.sleep(1.0)
            victim.kill()
            killed = time.monotonic()
            runner.join(30)
            assert len(outcome) == 1 and isinstance(outcome[0], errors.Unavailable), outcome
            # The next call through the same Session object follows the session to its new node.
            r = s.exec("cat", "keep.txt", timeout=30)
            took = time.monotonic() - killed
            assert r.ok and r.stdout == "kept across the move", r
            assert s.node_id != old_node and s.node_id in cluster.node_ids
            assert s.generation > old_gen and s.state is SessionState.RUNNING
            print(f"exec through the same Session object answered from {s.node_id} {took:.1f}s after SIGKILL")
            print(f"the exec in flight at the kill raised: {outcome[0]}")
            assert s.files.read("keep.txt") == b"kept across the move"
            cluster.restart(victim)
            cluster.wait_nodes_ready(60)
        finally:
            s.delete()


def test_a_drained_node_hands_the_session_over_and_calls_follow(cluster: harness.Cluster) -> None:
    with Sandfleet(cluster.endpoint) as sf:
        s = sf.sessions.create(**TINY, labels={"move": "drain"})  # type: ignore[arg-type]
        channel = cluster.channel(cluster.coordinators[0].addr)
        nodes = sandfleet_pb2_grpc.NodeServiceStub(channel)
        old_node, old_gen = s.node_id, s.generation
        try:
            s.files.write("d.txt", b"drained")
            s.sync()
            nodes.DrainNode(pb.DrainNodeRequest(node_id=old_node, deadline_seconds=1, max_parallel=1), timeout=10)
            # The old agent is alive: it now refuses the old placement's token or no longer has the session.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if sf.sessions.get(s.id).generation > old_gen:
                    break
                time.sleep(0.2)
            assert s.exec("cat", "d.txt").stdout == "drained"
            assert s.node_id != old_node and s.generation > old_gen
        finally:
            nodes.CordonNode(pb.CordonNodeRequest(node_id=old_node, cordoned=False), timeout=10)
            channel.close()
            s.delete()
