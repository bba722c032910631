"""Negative controls: each seeded misconfiguration makes the suite say FAIL, naming the check.

A conformance suite that cannot fail proves nothing. Every fault below breaks the local
mesh the way real deployments break; the scenario's checks must then fail, and exactly
the checks that are about that breakage. The clean mesh passing every check is proven
by the scenario suite itself (scenarios/).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

import pytest

from securemetrics_e2e.backend import Deployment
from securemetrics_e2e.catalog import Feature, MtlsMode, RunUnit, VariantId, scenario
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.local.faults import SCRAPER_FAULTS, Fault
from securemetrics_e2e.results import CheckOutcome, RunResult, Status
from securemetrics_e2e.runner import run_checks
from tests.golden.messages import load as golden_messages
from tests.golden.messages import normalise
from tests.localmesh import requires_local_mesh

#: real meshes: the full tier's, not the quick one's (nox -s quick)
pytestmark = [requires_local_mesh, pytest.mark.slow]

TARGETS = {"targets-up-merged", "targets-up-envoy"}
EXPECTED: dict[Fault, tuple[str, set[str]]] = {
    Fault.PLAINTEXT_SECURE_PORT: (
        "native-sidecar",
        {"listeners-tls-only", "mtls-scrape", "envoy-port-stats-only", "plaintext-refused"}
        | TARGETS,
    ),
    Fault.CLIENT_CERT_OPTIONAL: (
        "native-sidecar",
        {"listeners-tls-only", "no-client-cert-refused"},
    ),
    Fault.FOREIGN_ROOT_TRUSTED: ("native-sidecar", {"foreign-ca-refused"}),
    Fault.SCRAPE_JOB_PLAINTEXT: ("native-sidecar", TARGETS),
    Fault.HARDENED_FLAG_MISSING: (
        "hardened",
        {"hardened-envoy-stats-localhost", "hardened-agent-forbidden"},
    ),
    Fault.EXPIRED_WORKLOAD_CERT: ("native-sidecar", {"mtls-scrape", "envoy-port-stats-only"}),
    # SMC002's identity clause: Prometheus (insecure_skip_verify) still scrapes it UP
    Fault.WRONG_IDENTITY: ("native-sidecar", {"mtls-scrape"}),
    Fault.STATS_ROUTE_MISSING: ("native-sidecar", {"listeners-tls-only", "mtls-scrape"} | TARGETS),
    # SMC002's "200 but no metric families" clause: Prometheus scrapes an empty page UP
    Fault.STATS_ROUTE_EMPTY: ("native-sidecar", {"mtls-scrape"}),
    # SMC003's clause itself: /metrics on the Envoy-only port is served, not 404
    Fault.ENVOY_PORT_ROUTES_ALL: (
        "native-sidecar",
        {"listeners-tls-only", "envoy-port-stats-only"},
    ),
    Fault.SECURE_PORT_ANNOTATION_MISSING: (
        "native-sidecar",
        TARGETS | {"injector-secure-port-annotation"},
    ),
    # the injector model leaves secure-port unset: SMC014 says so, and the merged job,
    # which keys on that annotation, finds no target
    Fault.INJECTOR_NO_SECURE_PORT: (
        "native-sidecar",
        {"injector-secure-port-annotation", "targets-up-merged"},
    ),
    Fault.UPGRADE_DROPS_TARGETS: ("upgrade", {"upgrade-continuity"}),
    # the fix of a known gap, broken: every check the gap predicts fails, as a FAIL
    Fault.PROXYCONFIG_SELECTS_NOTHING: (
        "gateway-api",
        {"listeners-tls-only", "mtls-scrape", "envoy-port-stats-only"} | TARGETS,
    ),
    # the inbound path (local/capture.py, local/virtualinbound.py): without the rules the
    # legacy port has no listener at all, while its config_dump still looks right
    Fault.CAPTURE_MISSING: ("legacy-sidecar", {"mtls-scrape", "targets-up-merged"}),
    Fault.STRICT_CHAIN_ACCEPTS_PLAINTEXT: (
        "legacy-sidecar",
        {"listeners-tls-only", "plaintext-refused"},
    ),
    # the plain TLS Prometheus sends is terminated, so the static listener gets plaintext
    Fault.PASSTHROUGH_TERMINATES_TLS: (
        "native-sidecar",
        {"mtls-scrape", "envoy-port-stats-only"} | TARGETS,
    ),
}
#: faults that break a variant other than the scenario's first (as-documented) one
VARIANT = {Fault.PROXYCONFIG_SELECTS_NOTHING: VariantId.PROXYCONFIG}


def _unit(fault: Fault) -> RunUnit:
    sc = scenario(EXPECTED[fault][0])
    variant = sc.variant(VARIANT[fault]) if fault in VARIANT else sc.variants[0]
    return RunUnit(sc, _mode(fault), variant)


#: faults of a STRICT unit (the others break a PERMISSIVE one)
STRICT_FAULTS = frozenset({Fault.CAPTURE_MISSING, Fault.STRICT_CHAIN_ACCEPTS_PLAINTEXT})
#: faults of the inbound path: controllable only where sidecars are captured
INBOUND_FAULTS = STRICT_FAULTS | {Fault.PASSTHROUGH_TERMINATES_TLS}


def _mode(fault: Fault) -> MtlsMode:
    return MtlsMode.STRICT if fault in STRICT_FAULTS else MtlsMode.PERMISSIVE


@dataclass(frozen=True)
class Control:
    """One negative control, deployed: the fault and where it runs."""

    fault: Fault
    backend: LocalBackend
    deployment: Deployment


def deploy_scraper_fault_controls(stack: ExitStack) -> list[Control]:
    """Faults of the scraper need a mesh (and a Prometheus) of their own; ``stack`` tears
    them down."""
    controls = []
    for fault in (f for f in EXPECTED if f in SCRAPER_FAULTS):
        backend = LocalBackend(fault=fault)
        stack.callback(backend.close)
        dep = stack.enter_context(
            backend.deployed(scenario(EXPECTED[fault][0]), MtlsMode.PERMISSIVE)
        )
        controls.append(Control(fault, backend, dep))
    return controls


#: faults whose control runs an upgrade window (15 s): in a mesh of their own, in parallel
UPGRADE_FAULTS = frozenset({Fault.UPGRADE_DROPS_TARGETS})


def deploy_data_plane_fault_controls(
    stack: ExitStack, faults: frozenset[Fault] | None = None, backend: LocalBackend | None = None
) -> list[Control]:
    """Data-plane faults side by side in one mesh, as broken namespaces of one cluster
    would be: one Prometheus discovers them all in one discovery cycle (up to 5 s).
    ``backend``: a mesh of the caller's (which closes it); default: a new one ``stack``
    closes."""
    if backend is None:
        backend = LocalBackend()
        stack.callback(backend.close)
    chosen = sorted(faults or frozenset(EXPECTED) - SCRAPER_FAULTS - UPGRADE_FAULTS)
    if Feature.INBOUND_CAPTURE not in backend.features:
        chosen = [f for f in chosen if f not in INBOUND_FAULTS]
    deployments = backend.deploy_with_faults([(_unit(f), f) for f in chosen])
    return [Control(f, backend, d) for f, d in zip(chosen, deployments, strict=True)]


def _checked(deploy: Callable[[ExitStack], list[Control]]) -> dict[Fault, list[CheckOutcome]]:
    """Every check of every control ``deploy`` brings up, its meshes closed after."""
    with ExitStack() as stack:
        return {c.fault: run_checks(c.backend, c.deployment) for c in deploy(stack)}


def deployed_control_results() -> dict[Fault, list[CheckOutcome]]:
    """Every control deployed (three meshes side by side) and checked, then torn down."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        scraper = pool.submit(_checked, deploy_scraper_fault_controls)
        data_plane = pool.submit(_checked, deploy_data_plane_fault_controls)
        upgrade = pool.submit(
            _checked, partial(deploy_data_plane_fault_controls, faults=UPGRADE_FAULTS)
        )
        return {**data_plane.result(), **scraper.result(), **upgrade.result()}


@pytest.fixture(scope="module")
def control_results() -> dict[Fault, list[CheckOutcome]]:
    return deployed_control_results()


def test_a_fault_given_to_one_deployment_leaves_its_neighbour_healthy() -> None:
    backend = LocalBackend()
    try:
        broken = backend.deploy(
            scenario("native-sidecar"), MtlsMode.PERMISSIVE, fault=Fault.FOREIGN_ROOT_TRUSTED
        )
        healthy = backend.deploy(scenario("native-sidecar"), MtlsMode.PERMISSIVE)
        assert broken.namespace != healthy.namespace
        from securemetrics_e2e.checks import FOREIGN

        with pytest.raises(AssertionError, match="foreign-ca"):
            FOREIGN.run(backend, broken)
        FOREIGN.run(backend, healthy)
    finally:
        backend.close()


def test_scraper_faults_cannot_be_given_to_one_deployment() -> None:
    backend = LocalBackend()
    with pytest.raises(UsageError, match="breaks the scraper"):
        backend.deploy(
            scenario("native-sidecar"), MtlsMode.PERMISSIVE, fault=Fault.SCRAPE_JOB_PLAINTEXT
        )
    backend.close()


# Faults that break continuity, not a snapshot: their controls run a rotation scenario.
CONTROLLED_ELSEWHERE = {Fault.SCRAPER_CERTS_NOT_REFRESHED: "tests/test_rotation.py"}


def test_every_fault_has_a_control() -> None:
    assert set(EXPECTED) | set(CONTROLLED_ELSEWHERE) == set(Fault)
    assert not set(EXPECTED) & set(CONTROLLED_ELSEWHERE)


def _outcomes(fault: Fault, results: dict[Fault, list[CheckOutcome]]) -> list[CheckOutcome]:
    """The control's outcomes; a skip naming why when its inbound fault could not deploy."""
    if fault in INBOUND_FAULTS and fault not in results:
        pytest.skip(f"no inbound capture here: {LocalBackend().capture_unavailable_reason()}")
    return results[fault]


@pytest.mark.parametrize("fault", list(EXPECTED), ids=str)
def test_fault_makes_the_verdict_fail_naming_its_checks(
    fault: Fault, control_results: dict[Fault, list[CheckOutcome]]
) -> None:
    outcomes = _outcomes(fault, control_results)
    result = RunResult(outcomes=outcomes)
    failed = {o.check for o in outcomes if o.status is Status.FAIL}
    assert not result.conformant
    assert failed == EXPECTED[fault][1], {o.check: o.message for o in outcomes}
    for o in outcomes:
        if o.status is Status.FAIL:
            assert o.code.startswith("SMC")
            assert o.message


@pytest.mark.parametrize("fault", list(EXPECTED), ids=str)
def test_fault_messages_match_the_golden(
    fault: Fault, control_results: dict[Fault, list[CheckOutcome]]
) -> None:
    # the wording a vendor reads is behaviour: a change rewrites tests/golden (messages.py)
    outcomes = _outcomes(fault, control_results)
    got = {o.check: normalise(o.message) for o in outcomes if o.status is Status.FAIL}
    assert got == golden_messages()[str(fault)]


def test_a_broken_fix_variant_is_a_fail_not_a_known_gap(
    control_results: dict[Fault, list[CheckOutcome]],
) -> None:
    outcomes = control_results[Fault.PROXYCONFIG_SELECTS_NOTHING]
    assert {o.variant for o in outcomes} == {"proxyconfig"}
    assert not [o for o in outcomes if o.status in (Status.KNOWN_GAP, Status.FIXED)]
    assert all(o.fix_of == ("gateway-api-infrastructure-annotations",) for o in outcomes)
    assert RunResult(outcomes=outcomes).unfixed()


def test_missing_annotation_is_reported_as_zero_targets(
    control_results: dict[Fault, list[CheckOutcome]],
) -> None:
    messages = [o.message for o in control_results[Fault.SECURE_PORT_ANNOTATION_MISSING]]
    assert any("ZERO targets" in m and "dropped by relabeling" in m for m in messages)


def test_expired_certificate_is_named(control_results: dict[Fault, list[CheckOutcome]]) -> None:
    scrape = next(
        o for o in control_results[Fault.EXPIRED_WORKLOAD_CERT] if o.check == "mtls-scrape"
    )
    assert "expired" in scrape.message


def test_wrong_identity_is_named(control_results: dict[Fault, list[CheckOutcome]]) -> None:
    scrape = next(o for o in control_results[Fault.WRONG_IDENTITY] if o.check == "mtls-scrape")
    assert "httpbin-impostor" in scrape.message


def test_targets_dropped_by_an_upgrade_are_named(
    control_results: dict[Fault, list[CheckOutcome]],
) -> None:
    (upgrade,) = control_results[Fault.UPGRADE_DROPS_TARGETS]
    # verified on the older version first: the fault is the upgrade's, not the deploy's
    assert "before the upgrade" not in upgrade.message
    assert "after the upgrade to Istio" in upgrade.message
    assert "ZERO targets" in upgrade.message
    assert "of the window without a successful scrape" in upgrade.message
