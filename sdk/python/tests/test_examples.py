"""The examples in sdk/python/examples and the README's Python example, each run as a program
against ``sandfleet dev`` (SANDFLEET_ENDPOINT set as a user would)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
README = HERE.parents[2] / "README.md"


def run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=HERE
    )
    print(r.stdout[-3000:])
    print(r.stderr[-3000:], file=sys.stderr)
    return r


def test_agent_code_tool(dev_env: dict[str, str]) -> None:
    r = run([str(EXAMPLES / "agent_code_tool.py")], dev_env, 180)
    assert r.returncode == 0 and "all checks passed" in r.stdout


def test_code_judge_100_submissions(dev_env: dict[str, str]) -> None:
    r = run([str(EXAMPLES / "code_judge.py")], dev_env, 300)
    assert r.returncode == 0 and "every verdict as expected" in r.stdout
    rows = [line for line in r.stdout.splitlines() if re.match(r"\s*\d+\s+\w+\s+(AC|WA|RE|TLE|MLE)\s", line)]
    assert len(rows) == 100
    assert {line.split()[2] for line in rows} == {"AC", "WA", "RE", "TLE", "MLE"}


def test_notebook_kernel(dev_env: dict[str, str]) -> None:
    r = run([str(EXAMPLES / "notebook_kernel.py")], dev_env, 180)
    assert r.returncode == 0 and "all checks passed" in r.stdout


def test_the_readme_python_example_prints_42(dev_env: dict[str, str]) -> None:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    if not blocks:
        pytest.fail("README.md has no ```python block")
    code = blocks[0]
    assert len(code.strip().splitlines()) <= 5, "the README's example is five lines"
    r = run(["-c", code], dev_env, 120)
    assert r.returncode == 0 and r.stdout == "42\n"
