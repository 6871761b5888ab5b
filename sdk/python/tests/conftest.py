"""Fixtures: a ``sandfleet dev`` cluster for the whole run, and helpers to skip (or, in CI, fail) loudly."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence

# The harness forks processes (preexec_fn) while gRPC threads run; gRPC's fork
# handlers are not needed for that, and would log a line per fork.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import harness
import pytest

from sandfleet import Sandfleet

_SKIPPED_FOR_FACILITIES: list[str] = []


def need_facilities(binaries: Sequence[str] = ("sandfleet",)) -> None:
    """Skips the test with a loud banner when the machine cannot run sandboxes; fails instead in CI."""
    missing = harness.missing_facilities(binaries)
    if not missing:
        return
    text = harness.banner("; ".join(missing))
    if harness.require_facilities():
        pytest.fail(text, pytrace=False)
    # Straight to the terminal: pytest captures sys.stderr.
    sys.__stderr__.write(text)
    _SKIPPED_FOR_FACILITIES.append(text)
    pytest.skip(text)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Repeats the SKIPPED banner at the end, where nobody can miss it."""
    if _SKIPPED_FOR_FACILITIES:
        terminalreporter.write_line(_SKIPPED_FOR_FACILITIES[0], red=True, bold=True)


@pytest.fixture(scope="session")
def dev(request: pytest.FixtureRequest) -> Iterator[harness.Dev]:
    """One ``sandfleet dev`` (a coordinator and an agent) on free ports, for the whole test run."""
    need_facilities(("sandfleet",))
    d = harness.Dev()
    yield d
    if request.session.testsfailed:
        sys.__stderr__.write(f"\n===== sandfleet dev log (tail) =====\n{d.proc.tail(80)}\n")
    d.close()


@pytest.fixture(scope="session")
def sf(dev: harness.Dev) -> Iterator[Sandfleet]:
    """A client of the dev cluster, shared by every test (as an application shares one)."""
    with Sandfleet(dev.endpoint) as client:
        yield client


@pytest.fixture
def dev_env(dev: harness.Dev) -> dict[str, str]:
    """The environment a program needs to reach the dev cluster (SANDFLEET_ENDPOINT)."""
    env = dict(os.environ)
    for k in ("SANDFLEET_API_KEY", "SANDFLEET_TLS_CA", "SANDFLEET_TLS_CERT", "SANDFLEET_TLS_KEY"):
        env.pop(k, None)
    env["SANDFLEET_ENDPOINT"] = dev.endpoint
    return env
