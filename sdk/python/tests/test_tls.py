"""A mutual-TLS cluster (one coordinator, one agent, certificates from ``sandfleet pki``): the SDK
configured from SANDFLEET_TLS_* and SANDFLEET_API_KEY, exec over TLS to the agent, and the
credential errors (Unauthenticated, PermissionDenied) from the real servers."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import harness
import pytest
from conftest import need_facilities

from sandfleet import Sandfleet, SessionState, errors


@pytest.fixture(scope="module")
def tls_cluster(request: pytest.FixtureRequest) -> Iterator[harness.Cluster]:
    need_facilities(("sandfleet", "sandfleet-coordinator", "sandfleet-agent"))
    c = harness.Cluster(coordinators=1, agents=1, tls=True, agent_args=["--slots", "8"])
    yield c
    if request.session.testsfailed:
        sys.__stderr__.write(f"\n===== cluster logs (tails) =====\n{c.logs(60)}\n")
    c.close()


def test_mutual_tls_from_the_environment(tls_cluster: harness.Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = tls_cluster.pki
    monkeypatch.setenv("SANDFLEET_ENDPOINT", tls_cluster.endpoint)
    monkeypatch.setenv("SANDFLEET_TLS_CA", str(pki / "ca.crt"))
    monkeypatch.setenv("SANDFLEET_TLS_CERT", str(pki / "py-client.crt"))
    monkeypatch.setenv("SANDFLEET_TLS_KEY", str(pki / "py-client.key"))
    monkeypatch.delenv("SANDFLEET_API_KEY", raising=False)
    with Sandfleet() as sf, sf.sessions.create(memory="64Mi", ttl="5m") as s:
        assert s.state is SessionState.RUNNING
        # The data plane is TLS too (the agent's certificate, checked against the CA).
        assert s.exec("echo", "over tls").stdout == "over tls\n"
        s.files.write("t.txt", b"tls")
        assert s.files.read("t.txt") == b"tls"


def test_api_key_with_the_ca_only(tls_cluster: harness.Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tls_cluster.admin_key.startswith("sfk_")
    monkeypatch.setenv("SANDFLEET_API_KEY", tls_cluster.admin_key)
    monkeypatch.delenv("SANDFLEET_TLS_CERT", raising=False)
    monkeypatch.delenv("SANDFLEET_TLS_KEY", raising=False)
    with Sandfleet(tls_cluster.endpoint, tls_ca=str(tls_cluster.pki / "ca.crt")) as sf:
        s = sf.sessions.create(memory="64Mi", ttl="5m", labels={"via": "key"})
        try:
            assert s.run_code("print(1+1)").stdout == "2\n"
            assert [x.id for x in sf.sessions.list(labels={"via": "key"})] == [s.id]
        finally:
            s.delete()


def test_credential_errors_from_the_servers(tls_cluster: harness.Cluster) -> None:
    ca = str(tls_cluster.pki / "ca.crt")
    # No credential at all on a TLS cluster.
    with Sandfleet(tls_cluster.endpoint, tls_ca=ca, api_key="") as anonymous:
        with pytest.raises(errors.Unauthenticated) as e:
            anonymous.sessions.create(wait=False)
        assert e.value.from_server and e.value.message
    # A certificate of another kind (an agent's) may not call the public API.
    cert, key = tls_cluster.issue("agent", "not-a-client")
    with Sandfleet(tls_cluster.endpoint, tls_ca=ca, tls_cert=str(cert), tls_key=str(key)) as agent:
        with pytest.raises(errors.PermissionDenied) as denied:
            agent.sessions.create(wait=False)
        assert denied.value.from_server and "certificate" in denied.value.message
