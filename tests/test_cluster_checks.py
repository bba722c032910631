"""The target checks on the cluster backend, on the FAKE Kubernetes API (tests/fakekube.py).

A cluster has two Prometheus servers a check may be judged on: the suite's scraper, and,
for the servicemonitor scenario, the Operator's (``ClusterBackend.prometheus_for``). The
fake's API-server service proxy is a loopback HTTP server answering ``/api/v1/targets``
as Prometheus 2.42 does, with each server's own scrape pools, so a check judged on the
wrong server finds no target.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.backend import Deployment, Workload
from securemetrics_e2e.catalog import MERGED_JOB, MtlsMode, scenario
from securemetrics_e2e.checks import MERGED_UP, SERVICE_MONITOR_UP
from securemetrics_e2e.cluster.backend import OPERATOR_SERVICE
from securemetrics_e2e.spiffe import SpiffeId
from tests.fakekube import FakeKube
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


class _TwoPrometheus(BaseHTTPRequestHandler):
    """The service proxy: the Operator's Prometheus has the ServiceMonitor pool, the
    scraper the annotation-driven job."""

    def do_GET(self) -> None:
        if f"/services/{OPERATOR_SERVICE}:" in self.path:
            active = [_pool(f"serviceMonitor/{SM_NS}/httpbin/0", SM_NS)]
        else:
            active = [_pool(MERGED_JOB, NS)]
        body = json.dumps(
            {"status": "success", "data": {"activeTargets": active, "droppedTargets": []}}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TwoPrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FakeKube(proxy_base=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


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
