"""A failing local variant leaves diagnostics that explain it, and never a private key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from securemetrics_e2e.catalog import MtlsMode, scenario
from securemetrics_e2e.checks import MTLS_SCRAPE, CheckFailed
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.local.faults import Fault
from tests.localmesh import requires_local_mesh

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow


@requires_local_mesh
def test_diagnostics_of_a_failing_variant(tmp_path: Path) -> None:
    backend = LocalBackend(fault=Fault.STATS_ROUTE_MISSING, artifacts_dir=tmp_path)
    try:
        with backend.deployed(scenario("native-sidecar"), MtlsMode.PERMISSIVE) as dep:
            # let Prometheus try the broken target, so its error is in the diagnostics
            backend.prometheus().wait_scraped("istio-secure-merged-metrics", timeout=20)
            try:
                MTLS_SCRAPE.run(backend, dep)
            except CheckFailed as exc:
                where = backend.capture_diagnostics(dep, str(exc))
            else:
                raise AssertionError("the seeded fault did not fail the mTLS scrape")
    finally:
        backend.close()
    assert where is not None
    assert where.is_relative_to(tmp_path)
    assert "SMC002 mtls-scrape" in (where / "failures.txt").read_text()
    (pod,) = [p for p in where.iterdir() if p.is_dir()]
    listeners = {lst["port"]: lst for lst in json.loads((pod / "listeners.json").read_text())}
    assert listeners[15091]["route_prefixes"] == []  # what explains the 404
    assert "configs" in json.loads((pod / "config_dump.json").read_text())
    targets = json.loads((where / "prometheus-targets.json").read_text())
    merged = [t for t in targets if t["job"] == "istio-secure-merged-metrics"]
    assert merged
    assert "404" in merged[0]["last_error"]
    # every failed scrape, not only the last, with its error (Prometheus at debug level)
    log = (where / "prometheus.log").read_text()
    assert 'msg="Scrape failed"' in log
    assert "404" in log
    for path in where.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY" not in path.read_text(errors="replace"), path
