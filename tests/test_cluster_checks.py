"""The target checks on the cluster backend, on the FAKE Kubernetes API (tests/fakekube.py).

A cluster has two Prometheus servers a check may be judged on: the suite's scraper, and,
for the servicemonitor scenario, the Operator's (``ClusterBackend.prometheus_for``). The
fake's API-server service proxy is a loopback HTTP server answering ``/api/v1/targets``
as Prometheus 2.42 does, with each server's own scrape pools, so a check judged on the
wrong server finds no target. And SMC002's own identity clause, which on a cluster judges
the in-pod curl when nothing else could read the server's identity.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.backend import Deployment, Workload
from securemetrics_e2e.catalog import MERGED_JOB, MtlsMode, scenario
from securemetrics_e2e.checks import MERGED_UP, MTLS_SCRAPE, SERVICE_MONITOR_UP, CheckFailed
from securemetrics_e2e.cluster.backend import OPERATOR_SERVICE
from securemetrics_e2e.cluster.kube import ExecResult
from securemetrics_e2e.cluster.layout import SCRAPER_SELECTOR
from securemetrics_e2e.pki import MeshCA, WorkloadIdentity
from securemetrics_e2e.spiffe import SpiffeId
from tests.fakekube import FakeKube, PrometheusProxy, pod, serving
from tests.test_cluster_backend import _backend

NS = "sm-native-sidecar-permissive-x"
SM_NS = "sm-servicemonitor-permissive-x"
URL = "https://10.244.0.9:15092/stats/prometheus"


def _pool(job: str, namespace: str) -> dict[str, Any]:
    return {
        "scrapePool": job,
        "scrapeUrl": URL,
        "health": "up",
        "lastError": "",
        "lastScrape": datetime.now(UTC).isoformat(),
        "labels": {"pod": "httpbin-1", "namespace": namespace},
    }


class _TwoPrometheus(PrometheusProxy):
    """The service proxy: the Operator's Prometheus has the ServiceMonitor pool, the
    scraper the annotation-driven job."""

    def data(self, path: str) -> Any:
        if f"/services/{OPERATOR_SERVICE}:" in path:
            active = [_pool(f"serviceMonitor/{SM_NS}/httpbin/0", SM_NS)]
        else:
            active = [_pool(MERGED_JOB, NS)]
        return {"activeTargets": active, "droppedTargets": []}


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with serving(_TwoPrometheus) as base:
        yield FakeKube(proxy_base=base)


def _deployment(name: str, namespace: str) -> Deployment:
    spec = scenario(name).workloads[0]
    sid = SpiffeId.parse(f"spiffe://cluster.local/ns/{namespace}/sa/{spec.service_account}")
    workload = Workload(spec, namespace, "httpbin-1", "10.244.0.9", sid)
    return Deployment(scenario(name), MtlsMode.PERMISSIVE, namespace, (workload,))


def test_targets_up_is_judged_on_the_scraper(fake: FakeKube, tmp_path: Path) -> None:
    backend = _backend(fake, tmp_path)
    backend.timeouts = backend.timeouts.with_overrides({"target-up": 3.0})
    MERGED_UP.run(backend, _deployment("native-sidecar", NS))
    backend.close()


def test_servicemonitor_targets_are_judged_on_the_operators_prometheus(
    fake: FakeKube, tmp_path: Path
) -> None:
    backend = _backend(fake, tmp_path)
    backend.timeouts = backend.timeouts.with_overrides({"target-up": 3.0})
    SERVICE_MONITOR_UP.run(backend, _deployment("servicemonitor", SM_NS))
    backend.close()


#: ``kubectl port-forward``'s stand-in: it reports a forwarded port whose far end closes
#: every connection, as a port that only the sidecar's inbound capture serves answers
#: nothing on the pod's loopback: the prober then has no second opinion
#: (cluster/probing.py ``_forward``, ``_corroborate``)
NO_LOOPBACK = textwrap.dedent(
    """
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(f"Forwarding from 127.0.0.1:{listener.getsockname()[1]} -> 15091", flush=True)
    while True:
        listener.accept()[0].close()
    """
)


class _ScraperPod(FakeKube):
    """The scraper's istio-proxy: its OUTPUT_CERTS files, and a curl that gets 200 with
    metrics but prints no server chain (its ``%{certs}`` empty: curl before 7.88)."""

    def __init__(self, scraper: WorkloadIdentity) -> None:
        super().__init__()
        self.files = {
            "root-cert.pem": scraper.root_pem(),
            "cert-chain.pem": scraper.cert_chain_pem(),
            "key.pem": scraper.key_pem(),
        }

    def exec(
        self, namespace: str, pod: str, container: str, command: Sequence[str], *, timeout: float
    ) -> ExecResult:
        self.calls.append(("exec", pod, container, " ".join(command)))
        if command[0] == "cat":
            return ExecResult(self.files[command[1].rsplit("/", 1)[-1]].decode(), "", 0)
        if command[0] == "curl":
            marker = command[command.index("-w") + 1].split("%", 1)[0].lstrip("\n")
            return ExecResult(f"# TYPE envoy_up gauge\nenvoy_up 1\n\n{marker}200\n", "", 0)
        return ExecResult("", f"fake: no answer for {command[0]}", 126)


def test_a_200_whose_server_identity_nobody_read_fails_smc002(tmp_path: Path) -> None:
    ca = MeshCA.create()
    fake = _ScraperPod(ca.issue("sm-scraper", "prometheus"))
    backend = _backend(fake, tmp_path)
    scraper = pod("prometheus-1", backend.scraper.namespace, "prometheus", phase="Running")
    key, value = SCRAPER_SELECTOR.split("=")
    scraper["metadata"]["labels"] = {key: value}
    fake.add(scraper)
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"#!{sys.executable}\n{NO_LOOPBACK}")
    kubectl.chmod(0o755)
    backend.prober.kubectl = str(kubectl)
    try:
        with pytest.raises(CheckFailed) as failed:
            MTLS_SCRAPE.run(backend, _deployment("native-sidecar", NS))
    finally:
        backend.close()
    assert failed.value.observed == ("scrape:peer-identity",)
    want = f"spiffe://cluster.local/ns/{NS}/sa/httpbin"
    assert failed.value.message.startswith(
        f"httpbin secure Envoy-only port 15091: peer identity None, expected {want}; "
    )
