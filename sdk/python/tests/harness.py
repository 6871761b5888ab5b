"""Starts the real Sandfleet binaries for the Python SDK's tests (the Rust testkit's job, in Python).

* :func:`bin_dir`: ``$SANDFLEET_BIN_DIR``, else ``$CARGO_TARGET_DIR/debug``, else
  ``~/.cache/sandfleet-target/debug``.
* :func:`missing_facilities`: what the process runtime needs (root, a working
  bubblewrap, /usr/bin/python3, writable cgroups, loop devices and mkfs.ext4).
* :class:`Proc`: one process, started with its own data dir, a free port and
  ``PR_SET_PDEATHSIG`` (so a killed test run leaves nothing behind), its
  stderr in a log file, its ready line parsed.
* :class:`Dev` (``sandfleet dev``) and :class:`Cluster` (coordinators and
  agents as separate processes, plaintext on loopback).

Every node id is unique (``py-<random>``), every agent gets its own uid range,
and teardown removes the nodes' cgroups, unmounts the sessions' filesystems
and deletes the temporary directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REQUIRE_ENV = "SANDFLEET_REQUIRE_FACILITIES"
CGROUP_ROOTS = (
    "/sys/fs/cgroup/memory/sandfleet",
    "/sys/fs/cgroup/pids/sandfleet",
    "/sys/fs/cgroup/cpu/sandfleet",
    "/sys/fs/cgroup/cpu,cpuacct/sandfleet",
    "/sys/fs/cgroup/freezer/sandfleet",
    "/sys/fs/cgroup/sandfleet",
    "/sys/fs/cgroup/unified/sandfleet",
)
DEV_READY_PREFIX = "sandfleet dev ready: endpoint "


def require_facilities() -> bool:
    """True when missing facilities must fail the tests (CI), not skip them."""
    return os.environ.get(REQUIRE_ENV) == "1" or bool(os.environ.get("CI"))


def bin_dir() -> Path:
    """Where the debug binaries are."""
    explicit = os.environ.get("SANDFLEET_BIN_DIR")
    if explicit:
        return Path(explicit)
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/sandfleet-target")
    return Path(target) / "debug"


def binary(name: str) -> Path:
    """The path of a Sandfleet binary."""
    return bin_dir() / name


def _probe_cgroups() -> str | None:
    name = f"sandfleet-py-probe-{os.getpid()}-{random.randrange(1 << 30)}"
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        roots = ["/sys/fs/cgroup"]
    elif Path("/sys/fs/cgroup/memory").is_dir():
        roots = ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/cpu"]
    else:
        return "no cgroup v2 root and no v1 memory hierarchy under /sys/fs/cgroup"
    for root in roots:
        d = Path(root) / name
        try:
            d.mkdir()
            d.rmdir()
        except OSError as e:
            return f"cannot create a cgroup under {root}: {e}"
    return None


def missing_facilities(binaries: Sequence[str] = ("sandfleet",)) -> list[str]:
    """What this machine lacks to run real sandboxes with these binaries; empty when nothing."""
    missing = []
    for b in binaries:
        p = binary(b)
        if not os.access(p, os.X_OK):
            missing.append(f"the {b} binary ({p}; build with cargo build --bins, or set CARGO_TARGET_DIR)")
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()})")
    if not os.access("/usr/bin/bwrap", os.X_OK):
        missing.append("bubblewrap (/usr/bin/bwrap; apt-get install bubblewrap)")
    else:
        args = ["/usr/bin/bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr"]
        args += ["--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"]
        args += ["--proc", "/proc", "--dev", "/dev", "true"]
        r = subprocess.run(args, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            missing.append(f"working bubblewrap namespaces ({r.stderr.strip()})")
    if not os.access("/usr/bin/python3", os.X_OK):
        missing.append("python3 (/usr/bin/python3)")
    why = _probe_cgroups()
    if why:
        missing.append(f"writable cgroups ({why})")
    if not Path("/dev/loop-control").exists():
        missing.append("loop devices for disk quotas (/dev/loop-control)")
    if not any(os.access(p, os.X_OK) for p in ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4")):
        missing.append("mkfs.ext4 for disk quotas (apt-get install e2fsprogs)")
    return missing


def banner(what: str) -> str:
    """The loud SKIPPED (or, in CI, FAILED) text."""
    line = "=" * 78
    verdict = f"FAILED ({REQUIRE_ENV}=1 or CI is set)" if require_facilities() else "SKIPPED"
    return (
        f"\n{line}\n{verdict} (facility missing): {what}\n"
        "The Python SDK tests need the Sandfleet binaries, root, /usr/bin/bwrap with working namespaces,\n"
        f"/usr/bin/python3, writable cgroups, loop devices and mkfs.ext4. Run scripts/setup as root.\n"
        f"Set {REQUIRE_ENV}=1 (or CI) to make this a failure.\n{line}\n"
    )


def free_port() -> int:
    """A free loopback port (for addresses that must be known before a process starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_suffix(n: int = 6) -> str:
    """Random ``[a-z0-9]`` characters, for node ids."""
    return "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(n))


def _pdeathsig() -> None:
    # PR_SET_PDEATHSIG = 1: the child gets SIGKILL when the thread that forked it dies.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class Proc:
    """One Sandfleet process: started, its ready line read, signalled, restarted, its log kept."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, ready: str, env: dict[str, str] | None = None):
        """``ready`` is ``"dev"``, ``"coordinator"`` or ``"agent"``: which ready line to wait for."""
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        self.ready_kind = ready
        self.env = env
        self.popen: subprocess.Popen[str] | None = None
        self.addr = ""
        self.ready_line: dict[str, object] = {}
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        """The process id of the current start."""
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        """True while the process runs."""
        return self.popen is not None and self.popen.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Starts the process and waits for its ready line (its address)."""
        log = open(self.log_path, "a")  # noqa: SIM115  (kept open by the child)
        log.write(f"\n===== start: {' '.join(self.argv)}\n")
        log.flush()
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info,openraft=warn")
        env.pop("SANDFLEET_ENDPOINT", None)
        if self.env:
            env.update(self.env)
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
            preexec_fn=_pdeathsig,  # noqa: PLW1509  (the children must die with the test run)
        )
        log.close()
        found = threading.Event()
        popen = self.popen

        def read() -> None:
            assert popen.stdout is not None
            with open(self.log_path, "a") as out:
                for raw in popen.stdout:
                    line = raw.strip()
                    if not found.is_set() and self._parse_ready(line):
                        found.set()
                        continue
                    out.write(f"[stdout] {line}\n")
                    out.flush()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.05):
            if popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {popen.returncode} before it was ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} was not ready within {timeout}s:\n{self.tail()}")

    def _parse_ready(self, line: str) -> bool:
        if self.ready_kind == "dev":
            if line.startswith(DEV_READY_PREFIX):
                self.addr = line[len(DEV_READY_PREFIX) :].removeprefix("http://")
                return True
            return False
        try:
            obj = json.loads(line)
        except ValueError:
            return False
        if isinstance(obj, dict) and obj.get("ready") == self.ready_kind:
            self.ready_line = obj
            self.addr = str(obj["addr"])
            return True
        return False

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 60) -> str:
        """The end of the log."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(f"  {self.name}| {t}" for t in text[-lines:])


def _unmount_under(root: Path) -> None:
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split(" ")[4] for line in f]
    except OSError:
        return
    prefix = str(root)
    mine = sorted(
        {p.encode().decode("unicode_escape") for p in points if p.startswith(prefix)},
        key=lambda p: -p.count("/"),
    )
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    for p in mine:
        libc.umount2(p.encode(), 2)  # MNT_DETACH


def _remove_cgroup_tree(d: Path) -> None:
    for child in list(d.iterdir()) if d.is_dir() else []:
        if child.is_dir():
            _remove_cgroup_tree(child)
    deadline = time.monotonic() + 5
    while d.exists():
        with contextlib.suppress(OSError):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            d.rmdir()
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)


def remove_node_cgroups(node_id: str) -> None:
    """Removes the cgroup trees of a node (agents keep them across restarts by design)."""
    assert node_id and "/" not in node_id
    for root in CGROUP_ROOTS:
        _remove_cgroup_tree(Path(root) / node_id)


class _Base:
    def __init__(self, prefix: str) -> None:
        base = os.environ.get("SANDFLEET_TEST_TMPDIR") or tempfile.gettempdir()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        # Sandboxes resolve their workspace as an unprivileged uid: every
        # ancestor of the data dirs must be traversable.
        os.chmod(self.dir, 0o711)
        self.procs: list[Proc] = []
        self.node_ids: list[str] = []

    def logs(self, lines: int = 60) -> str:
        """The tails of every process's log."""
        return "\n".join(p.tail(lines) for p in self.procs)

    def close(self, keep: bool = False) -> None:
        """Stops every process, removes the nodes' cgroups and mounts, then the directory."""
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stop()
        for n in self.node_ids:
            with contextlib.suppress(Exception):
                remove_node_cgroups(n)
        _unmount_under(self.dir)
        if keep or os.environ.get("SANDFLEET_KEEP_TMP") == "1":
            sys.stderr.write(f"sandfleet test directory kept in {self.dir}\n")
            return
        shutil.rmtree(self.dir, ignore_errors=True)


class Dev(_Base):
    """``sandfleet dev`` on free ports, with its own node id and data dir."""

    def __init__(self) -> None:
        """Starts it and waits until it is ready."""
        super().__init__("sandfleet-py-dev-")
        self.node_id = f"py-{random_suffix()}"
        self.node_ids.append(self.node_id)
        argv = [
            str(binary("sandfleet")),
            "dev",
            "--data-dir",
            str(self.dir / "data"),
            "--listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--node-id",
            self.node_id,
        ]
        self.proc = Proc("dev", argv, self.dir, "dev")
        self.procs.append(self.proc)
        try:
            self.proc.start(timeout=90)
        except BaseException:
            self.close(keep=True)
            raise

    @property
    def endpoint(self) -> str:
        """The coordinator's ``host:port``."""
        return self.proc.addr


class Cluster(_Base):
    """Coordinators (self-forming, ``--initial-members``) and agents as separate processes, on loopback."""

    def __init__(
        self,
        coordinators: int = 3,
        agents: int = 2,
        coordinator_args: Sequence[str] = (),
        agent_args: Sequence[str] = (),
        tls: bool = False,
    ) -> None:
        """Starts every process and waits until the cluster has formed and every agent is ready.

        With ``tls`` every process gets a certificate of a CA made for the cluster
        (``sandfleet pki``), the test its own ``client`` certificate
        (``self.pki / "py-client.crt"``), and the bootstrap member writes the
        first admin API key (``self.admin_key``).
        """
        super().__init__("sandfleet-py-cluster-")
        self.coordinators: list[Proc] = []
        self.agents: list[Proc] = []
        self.tls = tls
        self.pki = self.dir / "pki"
        self.admin_key = ""
        ports = [free_port() for _ in range(coordinators)]
        suffix = random_suffix(5)
        if tls:
            self._pki(["init", "--dir", str(self.pki)])
            self.issue("client", "py-client")
        members = ",".join(f"{i + 1}=127.0.0.1:{p}" for i, p in enumerate(ports))
        try:
            for i, port in enumerate(ports):
                argv = [
                    str(binary("sandfleet-coordinator")),
                    "--id",
                    str(i + 1),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--data-dir",
                    str(self.dir / f"coordinator-{i + 1}"),
                    *self._tls_args("coordinator", f"c{i + 1}"),
                ]
                if coordinators > 1:
                    argv += ["--initial-members", members]
                else:
                    argv += ["--bootstrap"]
                if tls and i == 0:
                    argv += ["--admin-key-file", str(self.dir / "admin.key")]
                argv += list(coordinator_args)
                p = Proc(f"coordinator-{i + 1}", argv, self.dir, "coordinator")
                self.coordinators.append(p)
                self.procs.append(p)
            for p in self.coordinators:
                p.start()
            self.wait_formed(90)
            if tls:
                self.admin_key = (self.dir / "admin.key").read_text().strip()
            uid_block = random.randrange(4000)
            for i in range(agents):
                node = f"py-{suffix}-{i + 1}"
                self.node_ids.append(node)
                argv = [
                    str(binary("sandfleet-agent")),
                    "--node-id",
                    node,
                    "--listen",
                    "127.0.0.1:0",
                    "--data-dir",
                    str(self.dir / f"agent-{node}"),
                    "--coordinators",
                    self.endpoint,
                    *self._tls_args("agent", node),
                    "--runtime",
                    "process",
                    "--uid-base",
                    str(70_000_000 + uid_block * 65536 + i * 4096),
                    # A shared local store, like a shared mount: a session placed
                    # again on another node finds its files.
                    "--workspace-store-dir",
                    str(self.dir / "workspace-store"),
                    *agent_args,
                ]
                p = Proc(f"agent-{node}", argv, self.dir, "agent")
                self.agents.append(p)
                self.procs.append(p)
                p.start()
                # A restart keeps the address (sessions and clients remember it).
                i_listen = argv.index("--listen") + 1
                p.argv[i_listen] = p.addr
            self.wait_nodes_ready(60)
        except BaseException:
            sys.stderr.write(self.logs())
            self.close(keep=True)
            raise

    def _pki(self, args: list[str]) -> None:
        r = subprocess.run([str(binary("sandfleet")), "pki", *args], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"sandfleet pki {' '.join(args)} failed: {r.stderr}")

    def issue(self, kind: str, name: str) -> tuple[Path, Path]:
        """Issues a certificate of ``kind`` for ``name`` (SAN 127.0.0.1); returns (cert, key)."""
        args = ["issue", "--dir", str(self.pki), "--kind", kind, "--name", name, "--san", "127.0.0.1"]
        self._pki(args + ["--san", "localhost"])
        return self.pki / f"{name}.crt", self.pki / f"{name}.key"

    def _tls_args(self, kind: str, name: str) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        cert, key = self.issue(kind, name)
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(self.pki / "ca.crt")]

    def channel(self, addr: str):  # type: ignore[no-untyped-def]
        """A raw channel to ``addr`` (as the test's client certificate on a TLS cluster)."""
        import grpc

        if not self.tls:
            return grpc.insecure_channel(addr)
        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.pki / "ca.crt").read_bytes(),
            private_key=(self.pki / "py-client.key").read_bytes(),
            certificate_chain=(self.pki / "py-client.crt").read_bytes(),
        )
        return grpc.secure_channel(addr, creds)

    @property
    def endpoint(self) -> str:
        """Every coordinator, comma-separated."""
        return ",".join(p.addr or p.argv[p.argv.index("--listen") + 1] for p in self.coordinators)

    def status(self, idx: int | None = None, timeout: float = 5.0):  # type: ignore[no-untyped-def]
        """ClusterService.Status from coordinator ``idx`` (or the first running one that answers)."""
        from sandfleet._proto import sandfleet_pb2 as pb
        from sandfleet._proto import sandfleet_pb2_grpc

        order = [idx] if idx is not None else [i for i, p in enumerate(self.coordinators) if p.running()]
        last: Exception | None = None
        for i in order:
            p = self.coordinators[i]
            try:
                with self.channel(p.argv[p.argv.index("--listen") + 1]) as ch:
                    stub = sandfleet_pb2_grpc.ClusterServiceStub(ch)
                    return stub.Status(pb.ClusterStatusRequest(), timeout=timeout)
            except Exception as e:
                last = e
        raise RuntimeError(f"no coordinator answered Status: {last}")

    def wait_formed(self, timeout: float) -> None:
        """Until a leader is known and every coordinator is a voter."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                s = self.status()
                voters = sum(1 for m in s.members if m.voter)
                if s.leader_id and voters == len(self.coordinators):
                    return
                last = str(s)
            except Exception as e:
                last = str(e)
            time.sleep(0.2)
        raise RuntimeError(f"the coordinators did not form a cluster: {last}\n{self.logs()}")

    def leader_index(self) -> int:
        """The index of the current leader (waits for one)."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                s = self.status()
                if s.leader_id:
                    return int(s.leader_id) - 1
            time.sleep(0.1)
        raise RuntimeError("no leader")

    def wait_nodes_ready(self, timeout: float) -> None:
        """Until ListNodes shows every running agent ready."""
        from sandfleet._proto import sandfleet_pb2 as pb
        from sandfleet._proto import sandfleet_pb2_grpc

        want = {n for n, p in zip(self.node_ids, self.agents) if p.running()}
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for c in self.coordinators:
                if not c.running():
                    continue
                try:
                    with self.channel(c.addr) as ch:
                        nodes = sandfleet_pb2_grpc.NodeServiceStub(ch).ListNodes(pb.ListNodesRequest(), timeout=5).nodes
                    ready = {n.id for n in nodes if n.state == "ready"}
                    if want <= ready:
                        return
                    last = str({n.id: n.state for n in nodes})
                except Exception as e:
                    last = str(e)
                break
            time.sleep(0.2)
        raise RuntimeError(f"agents not ready: {last}\n{self.logs()}")

    def restart(self, p: Proc) -> None:
        """Starts a stopped (or killed) process again with the same arguments, data and address."""
        p.stop()
        for attempt in range(3):
            try:
                p.start()
                return
            except RuntimeError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
