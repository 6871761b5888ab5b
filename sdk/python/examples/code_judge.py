"""A code judge: 100 submissions against test cases, with time and memory limits, results in a table.

The problem: read two integers from stdin, print their sum. The judge keeps a
small pool of sandboxes (Sandfleet sessions), each with the memory limit of
the problem, and runs every submission in one of them: its source is uploaded,
each test case runs with the time limit, and the verdict is

* ``AC`` accepted, ``WA`` wrong answer, ``RE`` runtime error,
* ``TLE`` the time limit killed it (``timed_out``),
* ``MLE`` the memory limit killed it (``oom_killed``: the session's cgroup).

Between submissions the workspace is wiped, so no submission sees another's
files. A judge that also distrusts what a submission leaves running would use a
fresh session per submission (``POOL=0``): slower, same verdicts.

Run against ``sandfleet dev`` (SANDFLEET_ENDPOINT, default 127.0.0.1:7070)::

    python3 examples/code_judge.py            # 100 generated submissions
    SUBMISSIONS=20 python3 examples/code_judge.py
"""

from __future__ import annotations

import os
import queue
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sandfleet import Sandfleet, Session

TIME_LIMIT = 2.0  # seconds per test case
MEMORY_LIMIT = "64Mi"
TESTS = [("1 2\n", "3"), ("-5 5\n", "0"), ("123456789 987654321\n", "1111111110")]

# Solutions of every kind, with the verdict each must get.
KINDS = {
    "AC": "a, b = map(int, input().split())\nprint(a + b)\n",
    "AC2": "import sys\nprint(sum(map(int, sys.stdin.read().split())))\n",
    "WA": "a, b = map(int, input().split())\nprint(a - b)\n",
    "RE": "a, b = map(int, input().split())\nprint(a / 0)\n",
    "TLE": "while True:\n    pass\n",
    "MLE": "x = bytearray(1024 * 1024 * 1024)\nprint(len(x))\n",
}
EXPECTED = {"AC": "AC", "AC2": "AC", "WA": "WA", "RE": "RE", "TLE": "TLE", "MLE": "MLE"}


@dataclass
class Verdict:
    """The judge's result for one submission."""

    submission: int
    verdict: str
    passed: int
    max_time_ms: int
    detail: str = ""


def judge(session: Session, sid: int, source: str) -> Verdict:
    """Runs one submission against every test case in ``session``."""
    session.files.write(f"sub{sid}/main.py", source)
    passed, max_ms = 0, 0
    try:
        for stdin, want in TESTS:
            r = session.exec("python3", "main.py", stdin=stdin, timeout=TIME_LIMIT, workdir=f"sub{sid}")
            max_ms = max(max_ms, int(r.duration * 1000))
            if r.timed_out:
                return Verdict(sid, "TLE", passed, max_ms)
            if r.oom_killed:
                return Verdict(sid, "MLE", passed, max_ms)
            if r.exit_code != 0:
                return Verdict(sid, "RE", passed, max_ms, r.stderr.strip().splitlines()[-1][:40] if r.stderr else "")
            if r.stdout.strip() != want:
                return Verdict(sid, "WA", passed, max_ms, f"got {r.stdout.strip()[:20]!r}")
            passed += 1
        return Verdict(sid, "AC", passed, max_ms)
    finally:
        session.files.remove(f"sub{sid}", recursive=True)


def main() -> int:
    """Judges the submissions and prints the results table; exit 1 if a verdict is not the expected one."""
    n = int(os.environ.get("SUBMISSIONS", "100"))
    pool_size = int(os.environ.get("POOL", "4"))
    rng = random.Random(7)
    # Mostly correct, as on a real judge; a few of each failure.
    weights = {"AC": 50, "AC2": 20, "WA": 12, "RE": 10, "TLE": 4, "MLE": 4}
    kinds = rng.choices(list(weights), weights=list(weights.values()), k=n)
    for i, k in enumerate(("TLE", "MLE", "WA", "RE")):  # every verdict at least once
        kinds[i * 7 % n] = k
    started = time.monotonic()
    with Sandfleet() as sf:
        if pool_size > 0:
            sessions = [
                sf.sessions.create(template="python", memory=MEMORY_LIMIT, cpu=1, ttl="30m", labels={"app": "judge"})
                for _ in range(pool_size)
            ]
            free: queue.Queue[Session] = queue.Queue()
            for s in sessions:
                free.put(s)

            def run(i: int) -> Verdict:
                s = free.get()
                try:
                    return judge(s, i, KINDS[kinds[i]])
                finally:
                    free.put(s)

            try:
                with ThreadPoolExecutor(pool_size) as ex:
                    verdicts = list(ex.map(run, range(n)))
            finally:
                for s in sessions:
                    s.delete()
        else:

            def fresh(i: int) -> Verdict:
                with sf.sessions.create(template="python", memory=MEMORY_LIMIT, ttl="5m") as s:
                    return judge(s, i, KINDS[kinds[i]])

            with ThreadPoolExecutor(4) as ex:
                verdicts = list(ex.map(fresh, range(n)))
    took = time.monotonic() - started

    print(f"{'#':>4}  {'kind':<5} {'verdict':<7} {'tests':>5} {'max ms':>7}  detail")
    for v, k in zip(verdicts, kinds):
        print(f"{v.submission:>4}  {k:<5} {v.verdict:<7} {v.passed:>2}/{len(TESTS)}  {v.max_time_ms:>7}  {v.detail}")
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    print("summary: " + ", ".join(f"{k} {c}" for k, c in sorted(counts.items())) + f"; {n} submissions in {took:.1f}s")
    wrong = [
        (v.submission, kinds[v.submission], v.verdict) for v in verdicts if v.verdict != EXPECTED[kinds[v.submission]]
    ]
    if wrong:
        print(f"unexpected verdicts: {wrong}")
        return 1
    print("code judge: every verdict as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
