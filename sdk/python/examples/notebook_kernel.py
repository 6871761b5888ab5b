"""A notebook-style kernel: a long-lived session, cells run one after another, files carried between them.

Each cell is Python code. The kernel keeps one Sandfleet session for the whole
notebook; every cell runs as a fresh ``python3`` process in it, so a crashing
or runaway cell never takes the kernel down. What carries over from cell to
cell is the workspace: files a cell writes are there for the next, and the
kernel saves the cell's picklable variables to ``.kernel/state.pkl`` after each
cell and loads them before the next, so ``x = 1`` in one cell is ``x`` in the
next. Output streams back while the cell runs (``exec_stream``), as a notebook
front end shows it.

Run against ``sandfleet dev`` (SANDFLEET_ENDPOINT, default 127.0.0.1:7070)::

    python3 examples/notebook_kernel.py
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from sandfleet import Exit, Sandfleet, Session, Stderr, Stdout

# Runs a cell: restore the variables, run the cell's code, save what pickles.
RUNNER = r"""
import pickle, sys, types
ns = {"__name__": "__main__"}
try:
    with open(".kernel/state.pkl", "rb") as f:
        ns.update(pickle.load(f))
except FileNotFoundError:
    pass
code = open(sys.argv[1]).read()
try:
    exec(compile(code, f"<cell {sys.argv[2]}>", "exec"), ns)
finally:
    keep = {}
    for k, v in ns.items():
        if k.startswith("__") or isinstance(v, types.ModuleType):
            continue
        try:
            pickle.dumps(v)
        except Exception:
            continue
        keep[k] = v
    with open(".kernel/state.pkl", "wb") as f:
        pickle.dump(keep, f)
"""


@dataclass
class CellResult:
    """What one cell produced."""

    number: int
    ok: bool
    stdout: str
    stderr: str
    seconds: float
    chunks: list[tuple[float, str]] = field(default_factory=list)


class Kernel:
    """A notebook kernel on one long-lived Sandfleet session."""

    def __init__(self, sf: Sandfleet, memory: str = "512Mi") -> None:
        """Starts the kernel's session."""
        self.session: Session = sf.sessions.create(template="python", memory=memory, ttl="2h", labels={"app": "kernel"})
        self.session.files.write(".kernel/runner.py", RUNNER)
        self.count = 0

    def run_cell(self, code: str, timeout: float = 60, echo: bool = True) -> CellResult:
        """Runs one cell, streaming its output as it comes."""
        self.count += 1
        n = self.count
        self.session.files.write(f".kernel/cell{n}.py", code)
        start = time.monotonic()
        out, err, chunks = [], [], []
        ok = False
        stream = self.session.exec_stream(
            "python3", ".kernel/runner.py", f".kernel/cell{n}.py", str(n), timeout=timeout
        )
        for ev in stream:
            if isinstance(ev, Stdout):
                out.append(ev.text)
                chunks.append((time.monotonic() - start, ev.text))
                if echo:
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
            elif isinstance(ev, Stderr):
                err.append(ev.text)
                if echo:
                    sys.stdout.write(ev.text)
            elif isinstance(ev, Exit):
                ok = ev.exit_code == 0 and not ev.timed_out
                if ev.timed_out:
                    err.append(f"[cell {n} stopped after {timeout:g}s]\n")
        return CellResult(n, ok, "".join(out), "".join(err), time.monotonic() - start, chunks)

    def upload(self, path: str, data: bytes) -> None:
        """Puts a local file into the notebook's workspace."""
        self.session.files.write(path, data)

    def download(self, path: str) -> bytes:
        """Fetches a file the notebook made."""
        return self.session.files.read(path)

    def shutdown(self) -> None:
        """Ends the kernel and its session."""
        self.session.delete()


def main() -> int:
    """Runs a small notebook and checks what carried over between its cells."""
    with Sandfleet() as sf:
        k = Kernel(sf)
        try:
            k.upload("data/temps.json", json.dumps({"mon": 21.5, "tue": 23.0, "wed": 19.5}).encode())
            cells = [
                "import json\ntemps = json.load(open('data/temps.json'))\nprint('days:', len(temps))",
                "mean = sum(temps.values()) / len(temps)\nprint(f'mean {mean:.2f}')",
                "import time\nfor d, t in sorted(temps.items()):\n    print(d, t, flush=True)\n    time.sleep(0.5)",
                "with open('out/report.txt', 'w') as f:\n    f.write(f'mean={mean:.2f}\\n')\nprint('saved')",
                "import os\nos.makedirs('out', exist_ok=True)\n"
                "open('out/report.txt', 'w').write(f'mean={mean:.2f}\\n')",
                "1 / 0",
                "print('still alive, mean is', round(mean, 2))",
            ]
            results = []
            for code in cells:
                print(f"--- In [{k.count + 1}]: {code.splitlines()[0]}")
                results.append(k.run_cell(code))
            report = k.download("out/report.txt")
        finally:
            k.shutdown()
    streamed = results[2].chunks
    checks = [
        results[0].ok and results[0].stdout == "days: 3\n",
        results[1].ok and results[1].stdout == "mean 21.33\n",  # `temps` came from cell 1
        results[2].ok and len(streamed) >= 2 and streamed[0][0] < results[2].seconds - 0.7,  # streamed live
        not results[3].ok and "FileNotFoundError" in results[3].stderr,  # no out/ yet
        results[4].ok,
        not results[5].ok and "ZeroDivisionError" in results[5].stderr,
        results[6].ok and results[6].stdout == "still alive, mean is 21.33\n",  # a failing cell kept the state
        report == b"mean=21.33\n",
    ]
    print("notebook kernel: " + ("all checks passed" if all(checks) else f"FAILED checks: {checks}"))
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
