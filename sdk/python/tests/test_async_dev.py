"""The asyncio twin against ``sandfleet dev``: the same shape as the sync client."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import uuid

import harness
import pytest

from sandfleet import AsyncSandfleet, Exit, SessionState, Stdout, errors


async def test_async_shape_mirrors_the_sync_client(dev: harness.Dev) -> None:
    run = uuid.uuid4().hex[:8]
    async with AsyncSandfleet(dev.endpoint) as sf:
        # `async with` straight on create(): the session is deleted on exit.
        async with sf.sessions.create(template="python", memory="128Mi", cpu=0.5, ttl="10m", labels={"a": run}) as s:
            assert s.state is SessionState.RUNNING
            r = await s.exec("python3", "-c", "print(6*7)", timeout=30)
            assert r.exit_code == 0 and r.stdout == "42\n"
            assert (await s.run_code("console.log(6*7)", language="node")).stdout == "42\n"

            start = time.monotonic()
            first_at = None
            events = []
            async for ev in s.exec_stream("bash", "-c", "echo 1; sleep 1; echo 2; sleep 1; echo 3"):
                if first_at is None and isinstance(ev, Stdout):
                    first_at = time.monotonic() - start
                events.append(ev)
            total = time.monotonic() - start
            assert isinstance(events[-1], Exit) and events[-1].exit_code == 0
            assert b"".join(e.data for e in events if isinstance(e, Stdout)) == b"1\n2\n3\n"
            assert first_at is not None and first_at < total - 1.5

            await s.files.write("d/x.bin", b"\x00" * 3_000_001)
            await s.files.write("d/t.txt", io.StringIO("text"))

            async def chunks():  # type: ignore[no-untyped-def]
                for part in (b"as", b"ync"):
                    yield part

            await s.files.write("d/a.txt", chunks())
            assert await s.files.read("d/a.txt") == b"async"
            assert await s.files.read_text("d/t.txt") == "text"
            data = await s.files.read("d/x.bin")
            assert hashlib.sha256(data).digest() == hashlib.sha256(b"\x00" * 3_000_001).digest()
            assert [e.name for e in await s.files.list("d")] == ["a.txt", "t.txt", "x.bin"]
            assert b"".join([p async for p in s.files.iter_read("d/a.txt")]) == b"async"
            await s.files.remove("d/x.bin")
            synced = await s.sync()
            assert (synced.files, synced.bytes) == (2, 9) and synced.store
            await s.files.remove("d", recursive=True)
            assert not await s.files.exists("d")

            got = await sf.sessions.get(s.id)
            assert got.id == s.id and got.labels == {"a": run}
            listed = [x.id async for x in sf.sessions.list(labels={"a": run})]
            assert listed == [s.id]
            await s.renew(ttl="1h")
            sid = s.id
        assert (await sf.sessions.get(sid)).state is SessionState.TERMINATED

        # Awaited rather than entered, with an explicit request id: idempotent.
        rid = f"py-async-{run}"
        a = await sf.sessions.create(memory="64Mi", ttl="5m", request_id=rid, wait=False)
        b = await sf.sessions.create(memory="64Mi", ttl="5m", request_id=rid, wait=False)
        assert a.id == b.id and b.existing
        await a.wait(timeout=60)
        with pytest.raises(errors.NotFound):
            await a.files.read("missing")
        await a.delete()
        with pytest.raises(errors.NotFound):
            await sf.sessions.get("0190c8f2-0000-7000-8000-000000000001")


async def test_one_async_client_shared_by_tasks(dev: harness.Dev) -> None:
    async with AsyncSandfleet(dev.endpoint) as sf:
        sessions = await asyncio.gather(*(sf.sessions.create(memory="64Mi", ttl="5m") for _ in range(4)))
        try:
            outs = await asyncio.gather(*(s.exec("echo", str(i)) for i, s in enumerate(sessions) for _ in range(3)))
            assert sorted(o.stdout for o in outs) == sorted(f"{i}\n" for i in range(4) for _ in range(3))
        finally:
            await asyncio.gather(*(s.delete() for s in sessions))
