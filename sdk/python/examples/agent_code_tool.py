"""An AI agent's code tool: run model-written code with limits, return its output, keep files between calls.

An LLM agent gets one tool, ``run_code(code, language)``. Every call runs in the
same sandbox (a Sandfleet session), so files the model wrote in one call are
there in the next; each call has a wall-clock limit, the session a memory and
CPU limit, and the output handed back to the model is capped so a runaway print
cannot flood its context. The tool never raises for the model's mistakes: a
crash, a timeout or an out-of-memory kill comes back as a result the model can
read and react to.

Run against ``sandfleet dev`` (SANDFLEET_ENDPOINT, default 127.0.0.1:7070)::

    python3 examples/agent_code_tool.py

The ``main()`` below replays what a model might send; a real agent would put
``CodeTool.schema`` in its tool list and pass the model's tool calls to ``CodeTool.call``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from sandfleet import Sandfleet, Session, errors

#: Most characters of stdout and of stderr returned to the model per call.
OUTPUT_LIMIT = 4000


class CodeTool:
    """One sandbox for one agent conversation; ``call()`` runs a tool call in it."""

    #: The tool's description, in the JSON-schema form LLM APIs take.
    schema: dict[str, Any] = {
        "name": "run_code",
        "description": (
            "Run code in a sandbox with no network. Files you write stay for later calls. "
            "Each call may take at most `timeout` seconds; memory is limited."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string"},
                "language": {"type": "string", "enum": ["python", "bash", "node"]},
                "timeout": {"type": "number", "default": 10},
            },
            "required": ["code"],
        },
    }

    def __init__(self, client: Sandfleet, memory: str = "256Mi", cpu: float = 1.0) -> None:
        """Creates the conversation's sandbox (deleted by ``close()``)."""
        self.session: Session = client.sessions.create(
            template="python", memory=memory, cpu=cpu, ttl="30m", idle_timeout="10m", labels={"app": "agent-tool"}
        )

    def call(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Runs one tool call and returns what the model sees (never raises for the model's code)."""
        code = str(arguments.get("code", ""))
        language = str(arguments.get("language", "python"))
        timeout = min(float(arguments.get("timeout", 10)), 60.0)
        try:
            r = self.session.run_code(code, language=language, timeout=timeout)
        except errors.InvalidArgument as e:
            return {"error": f"the sandbox refused the call: {e.message}"}
        result: dict[str, Any] = {
            "exit_code": r.exit_code,
            "stdout": _cap(r.stdout),
            "stderr": _cap(r.stderr),
            "duration_s": round(r.duration, 3),
        }
        if r.timed_out:
            result["note"] = f"killed after the {timeout:g}s time limit"
        elif r.oom_killed:
            result["note"] = "killed: out of memory"
        elif r.output_truncated:
            result["note"] = "killed: too much output"
        result["files"] = sorted(e.name for e in self.session.files.list())
        return result

    def close(self) -> None:
        """Deletes the sandbox."""
        self.session.delete()


def _cap(text: str) -> str:
    if len(text) <= OUTPUT_LIMIT:
        return text
    return (
        text[: OUTPUT_LIMIT // 2]
        + f"\n... [{len(text) - OUTPUT_LIMIT} characters cut] ...\n"
        + text[-OUTPUT_LIMIT // 2 :]
    )


#: What a model might send over one conversation.
SCRIPTED_CALLS: list[dict[str, Any]] = [
    {
        "code": "import csv\nrows=[(i, i*i) for i in range(10)]\n"
        "csv.writer(open('squares.csv','w')).writerows(rows)\nprint('wrote', len(rows))"
    },
    {"code": "import csv\nprint(sum(int(b) for a, b in csv.reader(open('squares.csv'))))"},
    {"code": "wc -l squares.csv && ls", "language": "bash"},
    {"code": "while True: pass", "timeout": 2},
    {"code": "x = bytearray(2 * 1024**3)"},
    {"code": "print('x' * 100000)"},
    {"code": "raise ValueError('model bug')"},
]


def main() -> int:
    """Replays ``SCRIPTED_CALLS`` and checks what the model would have seen."""
    with Sandfleet() as sf:
        tool = CodeTool(sf)
        try:
            results = [tool.call(c) for c in SCRIPTED_CALLS]
        finally:
            tool.close()
    for call, res in zip(SCRIPTED_CALLS, results):
        print(json.dumps({"call": call["code"][:40], "result": {**res, "stdout": res.get("stdout", "")[:80]}}))
    checks = [
        results[0]["stdout"] == "wrote 10\n",
        results[1]["stdout"] == "285\n",  # the file written by the first call is still there
        results[2]["stdout"].startswith("10 squares.csv"),
        "time limit" in results[3].get("note", ""),
        "out of memory" in results[4].get("note", ""),
        "characters cut" in results[5]["stdout"] and len(results[5]["stdout"]) < OUTPUT_LIMIT + 100,
        results[6]["exit_code"] != 0 and "ValueError: model bug" in results[6]["stderr"],
    ]
    print("agent code tool: " + ("all checks passed" if all(checks) else f"FAILED checks: {checks}"))
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
