"""The upgrade scenario on the local mesh, and how continuity is judged when pods change.

The local backend replaces the workload's pod by one with the new version's
configuration while the same Prometheus scrapes; continuity is measured for the
namespace (any pod of the workload counts), so the pod being replaced may fail while its
successor serves, but no moment may go without a successful scrape. Its negative
control (the restarted pods lose their annotations) is in test_negative_controls.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemetrics_e2e.applicability import unit_skip_reason
from securemetrics_e2e.catalog import (
    ENVOY_JOB,
    MERGED_JOB,
    MetricsMode,
    MtlsMode,
    scenario,
    upgraded_spec,
)
from securemetrics_e2e.checks import verify
from securemetrics_e2e.continuity import (
    COVER_SLACK,
    MAX_GAP_INTERVALS,
    Continuity,
    _covered,
    judged_points,
)
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.results import JobContinuity
from securemetrics_e2e.upgrade_window import UpgradeRun, run_upgrade_window
from securemetrics_e2e.versions import resolve
from tests.localmesh import requires_local_mesh

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow

INTERVAL = 1.0


def _cov(times: list[float], pod: str = "a") -> float:
    """Coverage of [0, 10] by successful scrapes of one pod at ``times``."""
    return _covered([(t, True, pod) for t in times], 0.0, 10.0, INTERVAL)


# -- coverage: what "never without a successful scrape" means -----------------------------


def test_regular_scrapes_cover_the_window() -> None:
    assert _cov([0.3 + i for i in range(10)]) == pytest.approx(
        1.0 - 0.3 / 10
    )  # nothing vouches for the moment before the first scrape
    assert _cov([-0.7 + i for i in range(12)]) == 1.0


def test_a_late_scrape_of_the_same_pod_is_the_scrapers_delay_not_a_hole() -> None:
    # counted in scrapes: the pod was UP at 4 and again at its next scrape, 5.9 (a loaded
    # scraper started it late); nothing says it was not UP in between
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 5.9, 6.9, 7.9, 8.9, 9.9]
    assert _cov(times) == 1.0
    # but a scrape in between that failed ends what the success before it vouched for
    failed = [(t, True, "a") for t in times] + [(5.0, False, "a")]
    assert _covered(failed, 0.0, 10.0, INTERVAL) == pytest.approx(1 - (5.9 - 5.0) / 10)


def test_a_missing_scrape_beyond_the_longest_gap_leaves_a_hole() -> None:
    times = [0.0, 1.0, 2.0, 3.0, 4.0, 7.0, 8.0, 9.0, 10.0]  # 3 intervals without a scrape
    assert _cov(times) == pytest.approx(1 - (7.0 - 4.0 - MAX_GAP_INTERVALS * INTERVAL) / 10)


def test_a_successor_covers_for_the_pod_it_replaces() -> None:
    old = [(t, True, "old") for t in (0.0, 1.0, 2.0, 3.0)]  # then it stops
    new = [(t, True, "new") for t in (3.6, 4.6, 5.6, 6.6, 7.6, 8.6, 9.6)]
    assert _covered(old + new, 0.0, 10.0, INTERVAL) == 1.0
    # discovered a scrape late: the retired pod's last success vouches for one interval
    # only (no later scrape of it says more), so the successor leaves a hole
    late = [(t, True, "new") for t in (5.0, 6.0, 7.0, 8.0, 9.0)]
    assert _covered(old + late, 0.0, 10.0, INTERVAL) == pytest.approx(
        1 - (5.0 - 3.0 - COVER_SLACK * INTERVAL) / 10
    )


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(min_value=-2, max_value=12, allow_nan=False), max_size=30),
    st.floats(min_value=-2, max_value=12, allow_nan=False),
)
def test_coverage_is_a_fraction_that_more_scrapes_never_lower(
    times: list[float], extra: float
) -> None:
    before = _cov(times)
    assert 0.0 <= before <= 1.0 + 1e-9
    assert _cov([*times, extra]) >= before - 1e-9


def _continuity(job: JobContinuity) -> Continuity:
    now = datetime.now(UTC)
    return Continuity("ns/httpbin", now - timedelta(seconds=10), now, INTERVAL, (job,))


def test_namespace_scope_forgives_failed_scrapes_of_a_replaced_pod_only_when_covered() -> None:
    covered = JobContinuity(MERGED_JOB, 12, 9, 1.0, covered=1.0, pods=2)
    assert _continuity(covered).ok
    hole = JobContinuity(MERGED_JOB, 12, 9, 1.9, covered=0.93, pods=2)
    assert not _continuity(hole).ok
    assert "7.0% of the window without a successful scrape" in _continuity(hole).problems()[0]
    # pod scope: every failed scrape counts
    assert not _continuity(JobContinuity(MERGED_JOB, 12, 11, 1.0)).ok


def test_upgraded_spec_switches_legacy_to_native_only_when_the_version_has_it() -> None:
    (legacy,) = scenario("upgrade").workloads
    assert legacy.mode is MetricsMode.LEGACY
    assert upgraded_spec(legacy, native_secure_ports=True).mode is MetricsMode.NATIVE
    assert upgraded_spec(legacy, native_secure_ports=False) == legacy
    (native,) = scenario("native-sidecar").workloads
    assert upgraded_spec(native, native_secure_ports=True) == native


# -- versions and bad input (nothing starts) --------------------------------------------


def test_upgrade_versions_default_to_the_previous_minor() -> None:
    backend = LocalBackend(istio_version="1.31")
    old, new = backend.upgrade_versions()
    assert (old.minor, new.minor) == (30, 31)
    assert LocalBackend(istio_version="1.31", upgrade_from="1.30.0").upgrade_versions()[0] == (
        resolve("1.30.0")
    )


@pytest.mark.parametrize(
    ("upgrade_from", "message"),
    [
        ("1.29", "one minor at a time: 1.29.8 -> 1.30 -> 1.31"),
        ("1.31.0", "from an older minor to a newer one"),
        ("2.0", "names minor 2.0, which is unknown"),
    ],
)
def test_bad_upgrade_from_is_refused_by_the_backend(upgrade_from: str, message: str) -> None:
    # the CLI refuses it before anything starts too (tests/test_cli.py)
    with pytest.raises(UsageError, match=message):
        LocalBackend(istio_version="1.31.1", upgrade_from=upgrade_from)


def test_the_oldest_supported_minor_has_no_upgrade_to_it() -> None:
    backend = LocalBackend(istio_version="1.28")
    (upgrade,) = scenario("upgrade").run_units()
    reason = unit_skip_reason(upgrade, backend, "1.28.10")
    assert reason is not None
    assert "no supported Istio minor precedes 1.28" in reason
    ok = LocalBackend(istio_version="1.29")
    assert unit_skip_reason(upgrade, ok, "1.29") is None


# -- the local upgrade, for real ------------------------------------------------------------


@pytest.fixture(scope="module")
def upgraded() -> Iterator[tuple[LocalBackend, UpgradeRun, str, str]]:
    backend = LocalBackend(istio_version="1.31")
    try:
        dep = backend.deploy(scenario("upgrade"), MtlsMode.PERMISSIVE)
        before_pod = dep.workloads[0].pod_name
        run = run_upgrade_window(backend, dep, partial(verify, backend))
        yield backend, run, before_pod, dep.namespace
    finally:
        backend.close()


@requires_local_mesh
def test_the_workload_moves_to_a_new_pod_with_the_native_ports(
    upgraded: tuple[LocalBackend, UpgradeRun, str, str],
) -> None:
    backend, run, before_pod, namespace = upgraded
    assert run.ok, run.failure_message()
    assert run.switched == "legacy -> native"
    (now,) = backend._active[namespace].deployment.workloads
    assert now.pod_name != before_pod
    assert now.spec.mode is MetricsMode.NATIVE
    assert before_pod not in backend.network.pods  # retired and removed
    assert not backend._active[namespace].retiring


@requires_local_mesh
def test_continuity_spans_both_pods_and_the_new_job(
    upgraded: tuple[LocalBackend, UpgradeRun, str, str],
) -> None:
    _, run, _, _ = upgraded
    assert run.continuity is not None
    jobs = {j.job: j for j in run.continuity.jobs}
    assert set(jobs) == {MERGED_JOB, ENVOY_JOB}
    merged, envoy = jobs[MERGED_JOB], jobs[ENVOY_JOB]
    assert merged.pods == 2  # the legacy pod, then its successor
    assert merged.covered == 1.0
    assert envoy.pods == 1  # only the native configuration has the Envoy-only port
    assert envoy.successes >= 3  # measured over more than its first scrape
    assert merged.longest_gap_s <= 2 * INTERVAL


@requires_local_mesh
def test_upgrading_what_is_not_deployed_is_refused(
    upgraded: tuple[LocalBackend, UpgradeRun, str, str],
) -> None:
    backend, _, _, namespace = upgraded
    dep = backend._active[namespace].deployment
    gone = type(dep)(dep.scenario, dep.mtls_mode, "smx-nowhere", dep.workloads)
    with pytest.raises(UsageError, match="smx-nowhere is not deployed"):
        backend.upgrade(gone)


def test_a_scrape_that_ran_to_its_timeout_is_left_out_and_counted() -> None:
    ups = [(1.0, True, "a"), (2.0, False, "a"), (3.0, False, "a"), (4.0, True, "a")]
    # 2.0 ran to the 1 s timeout (a starved scraper); 3.0 ended at once (a TLS alert)
    durations = {(1.0, "a"): 0.05, (2.0, "a"): 1.0, (3.0, "a"): 0.01, (4.0, "a"): 0.05}
    kept, starved = judged_points(ups, durations, INTERVAL)
    assert kept == [(1.0, True, "a"), (3.0, False, "a"), (4.0, True, "a")]
    assert starved == 1
    # left out, the timed-out scrape no longer ends what the success before it vouched
    # for; the failure that ended at once still does
    assert _covered(kept, 1.0, 4.0, INTERVAL) == pytest.approx(2 / 3)
    assert _covered(ups, 1.0, 4.0, INTERVAL) == pytest.approx(1 / 3)


def test_an_outage_of_timeouts_still_fails_the_gap_rule() -> None:
    ups = [(0.0, True, "a"), *((float(t), False, "a") for t in range(1, 5)), (5.0, True, "a")]
    durations = {(float(t), "a"): 1.0 for t in range(1, 5)}
    kept, starved = judged_points(ups, durations, INTERVAL)
    assert starved == 4
    # no success for 5 intervals: the coverage has a hole beyond the longest allowed gap
    assert _covered(kept, 0.0, 5.0, INTERVAL) == pytest.approx(MAX_GAP_INTERVALS / 5)


def test_a_scrape_in_flight_when_the_suite_cut_its_connection_is_left_out() -> None:
    # the rotation drops the scraper's connections at 2.5-2.52: the scrape begun at 2.4
    # was cut by the suite; the one begun at 3.0, after the cut, failed on its own (an
    # expired certificate) and is judged
    ups = [(1.0, True, "a"), (2.4, False, "a"), (3.0, False, "a"), (4.0, True, "a")]
    durations = {(2.4, "a"): 0.11, (3.0, "a"): 0.01}
    kept, left_out = judged_points(ups, durations, INTERVAL, [(2.5, 2.52)])
    assert kept == [(1.0, True, "a"), (3.0, False, "a"), (4.0, True, "a")]
    assert left_out == 1
    # without the cut recorded, both failures are judged
    assert judged_points(ups, durations, INTERVAL)[1] == 0
