"""Exec streaming (order and timing) and file transfer (bytes, text, file objects, 100 MiB each way)."""

from __future__ import annotations

import hashlib
import io
import os
import time

import pytest

from sandfleet import Exit, Sandfleet, Stderr, Stdout, errors


def test_stream_events_arrive_in_order_and_as_produced(sf: Sandfleet) -> None:
    with sf.sessions.create(memory="64Mi", ttl="10m") as s:
        start = time.monotonic()
        seen: list[tuple[float, object]] = []
        stream = s.exec_stream("bash", "-c", "for i in 1 2 3; do echo $i; sleep 1; done; echo done >&2; exit 4")
        for ev in stream:
            seen.append((time.monotonic() - start, ev))
        total = time.monotonic() - start
        stdout = [(t, ev.data) for t, ev in seen if isinstance(ev, Stdout)]
        assert b"".join(d for _, d in stdout) == b"1\n2\n3\n"
        assert [ev for _, ev in seen if isinstance(ev, Stderr)] == [Stderr(b"done\n")]
        assert isinstance(seen[-1][1], Exit) and seen[-1][1].exit_code == 4
        assert sum(isinstance(ev, Exit) for _, ev in seen) == 1, "Exit comes once, last"
        # The first line arrives long before the command ends (about 2 s later).
        assert total >= 2.0
        assert stdout[0][0] < total - 1.5, f"first line at {stdout[0][0]:.2f}s of {total:.2f}s"
        # Lines arrive about a second apart, as the command wrote them.
        times = [t for t, _ in stdout]
        if len(times) == 3:
            assert times[1] - times[0] > 0.5 and times[2] - times[1] > 0.5
        assert stream.result is not None
        assert (stream.result.exit_code, stream.result.stdout, stream.result.stderr) == (4, "1\n2\n3\n", "done\n")


def test_stderr_and_stdout_interleave_in_order(sf: Sandfleet) -> None:
    with sf.sessions.create(memory="64Mi", ttl="10m") as s:
        script = "import sys,time\nfor i in range(4):\n  (sys.stdout if i%2==0 else sys.stderr).write(f'{i}\\n')\n"
        script += "  (sys.stdout if i%2==0 else sys.stderr).flush(); time.sleep(0.2)\n"
        events = [ev for ev in s.run_code_stream(script) if not isinstance(ev, Exit)]
        order = [(type(ev).__name__, ev.data) for ev in events]  # type: ignore[union-attr]
        assert order == [("Stdout", b"0\n"), ("Stderr", b"1\n"), ("Stdout", b"2\n"), ("Stderr", b"3\n")]


def test_leaving_a_stream_early_kills_the_command(sf: Sandfleet) -> None:
    with sf.sessions.create(memory="64Mi", ttl="10m") as s:
        script = "echo started; for i in $(seq 30); do echo tick; sleep 0.1; done; echo late > late.txt"
        with s.exec_stream("bash", "-c", script) as stream:
            first = next(iter(stream))
            assert isinstance(first, Stdout) and first.data == b"started\n"
        # The call was cancelled: the agent killed the command (at its next output) before it wrote the file.
        time.sleep(4.5)
        assert not s.files.exists("late.txt")


def test_files_bytes_text_file_objects_list_remove(sf: Sandfleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with sf.sessions.create(memory="128Mi", ttl="10m") as s:
        w = s.files.write("data/in.csv", b"a,b\n1,2\n")
        assert w.size == 8 and w.sha256 == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
        assert s.files.read("data/in.csv") == b"a,b\n1,2\n"
        s.files.write("data/note.txt", "héllo\n")
        assert s.files.read_text("data/note.txt") == "héllo\n"
        s.files.write("data/from_text_io.txt", io.StringIO("text object\n"))
        assert s.files.read("data/from_text_io.txt") == b"text object\n"
        s.files.write("data/chunks.bin", iter([b"ab", b"cd", b"e"]))
        assert s.files.read("data/chunks.bin") == b"abcde"
        s.files.write("data/empty", b"")
        assert s.files.read("data/empty") == b""
        s.files.write("run.sh", "echo run\n", mode=0o755)

        entries = {e.name: e for e in s.files.list("data")}
        assert sorted(entries) == ["chunks.bin", "empty", "from_text_io.txt", "in.csv", "note.txt"]
        assert entries["in.csv"].is_file and entries["in.csv"].size == 8 and entries["in.csv"].modified_at
        root = {e.name: e for e in s.files.list()}
        assert root["data"].is_dir and root["run.sh"].mode & 0o777 == 0o755
        # Files written through the SDK are what commands see, and the other way round.
        assert s.exec("cat", "data/in.csv").stdout == "a,b\n1,2\n"
        assert s.exec("./run.sh").stdout == "run\n"
        s.exec("bash", "-c", "echo made-by-exec > out.txt")
        assert s.files.read("out.txt") == b"made-by-exec\n"

        s.files.remove("data/in.csv")
        assert not s.files.exists("data/in.csv") and s.files.exists("data/note.txt")
        with pytest.raises(errors.NotFound):
            s.files.read("data/in.csv")
        with pytest.raises(errors.FailedPrecondition):
            s.files.remove("data")  # not empty, not recursive
        s.files.remove("data", recursive=True)
        assert not s.files.exists("data")

        local = tmp_path / "local.bin"
        local.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
        with open(local, "rb") as f:
            s.files.write("from_file.bin", f)
        dest = tmp_path / "back.bin"
        n = s.files.download("from_file.bin", str(dest))
        assert n == local.stat().st_size and dest.read_bytes() == local.read_bytes()
        assert b"".join(s.files.iter_read("from_file.bin")) == local.read_bytes()


def test_100_mib_up_and_down(sf: Sandfleet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    size = 100 * 1024 * 1024
    src = tmp_path / "big.bin"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        block = os.urandom(1024 * 1024)
        for i in range(100):
            piece = block[i:] + block[:i]
            h.update(piece)
            f.write(piece)
    digest = h.hexdigest()
    with sf.sessions.create(memory="256Mi", disk="512Mi", ttl="10m") as s:
        t0 = time.monotonic()
        with open(src, "rb") as f:  # streamed from the file, 1 MiB at a time
            w = s.files.write("big.bin", f)
        up = time.monotonic() - t0
        assert (w.size, w.sha256) == (size, digest)
        assert s.exec("sha256sum", "big.bin").stdout.split()[0] == digest
        t0 = time.monotonic()
        data = s.files.read("big.bin")
        down = time.monotonic() - t0
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest
        del data
        print(f"100 MiB: up {size / up / 2**20:.0f} MiB/s, down {size / down / 2**20:.0f} MiB/s")


def test_sync_and_download_url(sf: Sandfleet) -> None:
    with sf.sessions.create(memory="64Mi", ttl="10m") as s:
        s.files.write("out/report.txt", b"report")
        r = s.sync()
        assert r.files >= 1 and r.bytes >= 6 and r.manifest_version >= 1 and r.store
        # The dev cluster keeps workspaces in a local directory, which cannot presign URLs.
        with pytest.raises(errors.FailedPrecondition) as e:
            s.download_url("out/report.txt")
        assert (e.value.from_server and "presign" in e.value.message.lower()) or "url" in e.value.message.lower()
        u = s.disk_usage()
        assert u.limit_bytes > 0 and u.used_bytes > 0
