"""The Python side of ``sandfleet-bench python``: the Python SDK's exec round trip and create -> RUNNING.

The bench (bench/src/python.rs) starts this driver once, with the cluster in
SANDFLEET_ENDPOINT (and SANDFLEET_TLS_* / SANDFLEET_API_KEY when it has them),
and then sends it one JSON command per line on stdin, interleaved with its own
Rust SDK measurements of the same kind so that drift of the machine hits both:

* ``{"op": "exec", "n": N}``: N round trips of ``true`` in the driver's warm
  session (``session.exec("true")``, which collects the output and the exit).
* ``{"op": "create", "n": N}``: N times ``sessions.create(..., wait=True)``
  (create -> RUNNING, the session then deleted outside the clock).
* ``{"op": "quit"}``: deletes the warm session and exits.

Each answer is one JSON line: ``{"ms": [...]}`` (one latency per operation), or
``{"error": "..."}``. The first line the driver prints is ``{"ready": SESSION_ID, "python": ...,
"grpcio": ..., "sdk": ...}``.
The interpreter and the SDK are warm before any clock starts: this measures the
SDK's calls, not Python's start-up.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    """Serves the bench's commands until it says quit."""
    # Imported here so that a missing SDK is reported to the bench as an answer.
    try:
        import grpc  # noqa: PLC0415

        import sandfleet  # noqa: PLC0415
        from sandfleet import Sandfleet  # noqa: PLC0415
    except ImportError as e:
        print(json.dumps({"error": f"cannot import the Python SDK ({e}); install it: pip install ./sdk/python"}))
        return 1
    spec = {"memory": "128Mi", "cpu": 0.25, "pids": 64, "ttl": "10m"}
    tag = f"bench-py-{os.getpid()}"
    with Sandfleet() as sf:
        warm = sf.sessions.create(**spec, request_id=f"{tag}-warm")  # type: ignore[arg-type]
        # One untimed call of each kind, so channels are connected before any clock starts.
        warm.exec("true")
        versions = {"python": sys.version.split()[0], "grpcio": grpc.__version__, "sdk": sandfleet.__version__}
        print(json.dumps({"ready": warm.id, **versions}), flush=True)
        count = 0
        for line in sys.stdin:
            cmd = json.loads(line)
            op = cmd.get("op")
            try:
                if op == "exec":
                    out = []
                    for _ in range(int(cmd["n"])):
                        t = time.perf_counter()
                        r = warm.exec("true")
                        out.append((time.perf_counter() - t) * 1000.0)
                        if r.exit_code != 0:
                            raise RuntimeError(f"exec true exited with {r.exit_code}")
                    print(json.dumps({"ms": out}), flush=True)
                elif op == "create":
                    out = []
                    for _ in range(int(cmd["n"])):
                        count += 1
                        t = time.perf_counter()
                        s = sf.sessions.create(**spec, request_id=f"{tag}-{count}")  # type: ignore[arg-type]
                        out.append((time.perf_counter() - t) * 1000.0)
                        s.delete()
                    print(json.dumps({"ms": out}), flush=True)
                elif op == "quit":
                    break
                else:
                    print(json.dumps({"error": f"unknown op {op!r}"}), flush=True)
            except Exception as e:  # reported to the bench, which stops
                print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
        warm.delete()
    return 0


if __name__ == "__main__":
    sys.exit(main())
