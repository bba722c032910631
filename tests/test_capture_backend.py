"""The local backend captures its sidecar pods, and the rules leave with the pods."""

from __future__ import annotations

import pytest

from securemetrics_e2e.catalog import Feature, MtlsMode, RunUnit, scenario
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.local.capture import installed_rules, unavailable_reason
from securemetrics_e2e.local.faults import Fault
from securemetrics_e2e.probe import MtlsOutcome
from securemetrics_e2e.results import Status
from securemetrics_e2e.runner import run_checks
from securemetrics_e2e.versions import DEFAULT_VERSION
from tests.localmesh import netns_names, requires_local_mesh

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow


def test_loopback_network_has_no_capture_and_says_why() -> None:
    backend = LocalBackend(network="loopback")
    assert Feature.INBOUND_CAPTURE not in backend.features
    assert "loopback" in (backend.capture_unavailable_reason() or "")


@requires_local_mesh
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")
def test_a_captured_sidecar_end_to_end() -> None:
    backend = LocalBackend()
    assert Feature.INBOUND_CAPTURE in backend.features
    try:
        dep = backend.deploy(scenario("legacy-sidecar"), MtlsMode.STRICT)
        (workload,) = dep.workloads
        pod = backend.runtime_of(workload).pod
        assert "-A PREROUTING -p tcp -j ISTIO_INBOUND" in installed_rules(pod)
        assert installed_rules(backend.scraper_pod) == []  # only sidecar pods are captured
        assert backend.scrape(workload, 15091).outcome is MtlsOutcome.OK
        path = backend.inbound_path(workload, 15091)
        assert "virtualInbound chain '0.0.0.0_15091': the sidecar terminated TLS" in path
        assert "spiffe://cluster.local/ns/istio-system/sa/prometheus" in path
        # the Sidecar ingress is a virtualInbound chain group, not a listener of its own
        listeners = {lst.name for lst in backend.listeners(workload)}
        assert "virtualInbound|15091" in listeners
        assert "0.0.0.0_15091" not in listeners
        run_id = backend.run_id
    finally:
        backend.close()
    assert not {n for n in netns_names() if n.startswith(f"smx-{run_id}-")}


@requires_local_mesh
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"{unavailable_reason()}")
def test_without_capture_the_strict_gap_shows_as_fixed() -> None:
    """Capture missing: the STRICT known gap does not appear, and the suite says so (FIXED,
    naming the gap) instead of passing silently; with capture it is the known gap."""
    backend = LocalBackend()
    try:
        unit = RunUnit(scenario("native-sidecar"), MtlsMode.STRICT)
        (broken,) = backend.deploy_with_faults([(unit, Fault.CAPTURE_MISSING)])
        captured = backend.deploy(unit.scenario, unit.mtls_mode)
        version = str(DEFAULT_VERSION)
        gap_checks = {"mtls-scrape", "targets-up-merged", "targets-up-envoy"}
        without = {
            o.check: o for o in run_checks(backend, broken, version) if o.check in gap_checks
        }
        assert {o.status for o in without.values()} == {Status.FIXED}, without
        assert {o.gap for o in without.values()} == {"strict-captures-secure-ports"}
        with_capture = {
            o.check: o for o in run_checks(backend, captured, version) if o.check in gap_checks
        }
        assert with_capture["targets-up-merged"].status is Status.KNOWN_GAP
    finally:
        backend.close()
