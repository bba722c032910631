"""Continuity under certificate rotation, on the local mesh with real Envoy and Prometheus.

Short-lived workload and scraper certificates are re-issued several times while
Prometheus scrapes every second. After every rotation the probe must see the workload
present its NEW certificate and Prometheus must scrape it UP over a fresh connection;
Prometheus' own ``up`` samples must then show 100% success and no gap longer than two
scrape intervals. The negative control (the scraper's files are never refreshed) must
fail, naming certificate expiry.
"""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from securemetrics_e2e.backend import Workload
from securemetrics_e2e.catalog import ENVOY_JOB, MERGED_JOB, MtlsMode, scenario
from securemetrics_e2e.continuity import Continuity, measure_continuity
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.local.faults import Fault
from securemetrics_e2e.results import JobContinuity
from securemetrics_e2e.rotation import RotationRun, run_rotation
from tests.localmesh import requires_local_mesh

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow

LIFETIME = timedelta(seconds=4)


@dataclass(frozen=True)
class Observed:
    run: RotationRun
    scraper_files: dict[str, int]  # name -> mode, after the run
    first_scraper_serial: int  # what the scraper held before the run
    left_lifetime: timedelta  # how long the scraper's certificate lives after the run
    #: Prometheus' own words for each scrape it failed (its debug log), for the message
    scrape_failures: tuple[str, ...] = ()

    def why(self) -> str:
        """The run's failure message with Prometheus' "Scrape failed" lines: a failed
        scrape that was not timed out leaves no lastError once the next one succeeds."""
        return "\n".join((self.run.failure_message(), *self.scrape_failures))


def _rotate(fault: Fault | None) -> Observed:
    backend = LocalBackend(fault=fault)
    try:
        with backend.deployed(scenario("native-sidecar"), MtlsMode.PERMISSIVE) as dep:
            before = backend.scraper_identity().serial
            run = run_rotation(backend, dep.workloads[0], rotations=3, lifetime=LIFETIME)
            directory = backend.scraper_certs.directory
            files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
            left = backend.scraper_identity().not_after - datetime.now(UTC)
            log = backend.prometheus_server.process.log_path.read_text(errors="replace")
            failed = tuple(line for line in log.splitlines() if "Scrape failed" in line)
            return Observed(run, files, before, left, failed)
    finally:
        backend.close()


@pytest.fixture(scope="module")
def runs() -> dict[Fault | None, Observed]:
    # Two independent meshes side by side: the clean run and the negative control.
    cases: list[Fault | None] = [None, Fault.SCRAPER_CERTS_NOT_REFRESHED]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        futures = {case: pool.submit(_rotate, case) for case in cases}
        return {case: future.result() for case, future in futures.items()}


@requires_local_mesh
def test_rotation_keeps_every_scrape_successful(runs: dict[Fault | None, Observed]) -> None:
    run = runs[None].run
    assert run.ok, runs[None].why()
    continuity = run.continuity
    assert {j.job for j in continuity.jobs} == {MERGED_JOB, ENVOY_JOB}
    for job in continuity.jobs:
        # a 1 s interval over a window of several seconds: several real samples each
        assert job.scrapes >= 4, job
        assert job.successes == job.scrapes, job
        assert job.longest_gap_s <= 2 * continuity.interval_s, job
    assert "continuity PASS" in continuity.verdict_line()


@requires_local_mesh
def test_every_rotation_is_served_with_the_new_certificate(
    runs: dict[Fault | None, Observed],
) -> None:
    run = runs[None].run
    assert len(run.steps) >= 3
    workload_serials = [s.workload_serial for s in run.steps]
    assert len(set(workload_serials)) == len(workload_serials)
    for step in run.steps:
        assert step.probe_serial == step.workload_serial, step
        assert not step.problem, step


@requires_local_mesh
def test_scraper_files_are_renewed_atomically_and_outlive_the_first_lifetime(
    runs: dict[Fault | None, Observed],
) -> None:
    observed = runs[None]
    serials = [s.scraper_serial for s in observed.run.steps]
    assert observed.first_scraper_serial not in serials
    assert len(set(serials)) == len(serials)
    # atomic renames leave no temporary files behind; the key stays private
    assert observed.scraper_files == {
        "root-cert.pem": 0o644,
        "cert-chain.pem": 0o644,
        "key.pem": 0o600,
    }
    # the window outlived the first certificates: without renewal they would have expired
    window = observed.run.continuity.end - observed.run.continuity.start
    assert window > LIFETIME


@requires_local_mesh
def test_scraper_certificate_never_refreshed_fails_naming_expiry(
    runs: dict[Fault | None, Observed],
) -> None:
    run = runs[Fault.SCRAPER_CERTS_NOT_REFRESHED].run
    continuity = run.continuity
    assert not run.ok
    assert not continuity.ok
    assert "continuity FAIL" in continuity.verdict_line()
    for job in continuity.jobs:
        assert job.successes < job.scrapes, job
        assert job.longest_gap_s > 2 * continuity.interval_s, job
        # What Prometheus itself reported. With TLS 1.3 Envoy's certificate_expired
        # alert arrives after Go's side of the handshake: Go reports the alert or, when
        # it was already writing the request, the broken connection, or (reading the
        # answer of a connection Envoy closed) EOF. The cause is then named from the
        # certificate's not_after (below).
        assert any(
            e in job.last_error for e in ("expired certificate", "broken pipe", "reset", "EOF")
        ), job
    message = run.failure_message()
    assert "certificate expiry" in message
    assert len(continuity.expired) == 1, continuity.expired
    assert continuity.expired[0].startswith("the scraper client certificate")
    # the workload's certificate was renewed until the failure: it is not blamed
    assert "workload certificate" not in " ".join(continuity.expired)


# --------------------------------------------------------------------------- no processes


def _continuity(*jobs: JobContinuity) -> Continuity:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    return Continuity("httpbin", start, start + timedelta(seconds=10), 1.0, jobs)


def test_continuity_judges_failures_and_gaps() -> None:
    assert _continuity(JobContinuity("a", 10, 10, 2.0)).ok
    assert not _continuity(JobContinuity("a", 10, 9, 1.0)).ok
    assert not _continuity(JobContinuity("a", 10, 10, 2.5)).ok  # a missed scrape
    assert not _continuity(JobContinuity("a", 0, 0, 10.0)).ok
    assert not _continuity().ok
    failing = _continuity(JobContinuity("a", 10, 10, 1.0), JobContinuity("b", 4, 2, 3.0, "boom"))
    assert "b: 50.0% up (2/4 scrapes), longest gap 3.0s" in failing.failure_message()
    assert "last error: boom" in failing.failure_message()
    assert "a:" not in failing.failure_message()


class _Unused:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"bad input must be refused before the backend is used ({name})")


def _workload() -> Workload:
    dep_scenario = scenario("native-sidecar")
    from securemetrics_e2e.spiffe import SpiffeId

    return Workload(
        dep_scenario.workloads[0], "ns", "pod", "10.0.0.1", SpiffeId.for_workload("td", "ns", "sa")
    )


def test_bad_rotation_inputs_are_refused_naming_them() -> None:
    with pytest.raises(UsageError, match="rotations must be at least 1"):
        run_rotation(_Unused(), _workload(), rotations=0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="shorter than four scrape intervals"):
        run_rotation(_Unused(), _workload(), lifetime=timedelta(seconds=2))  # type: ignore[arg-type]
    now = datetime.now(UTC)
    with pytest.raises(UsageError, match=r"ends .* before it starts"):
        measure_continuity(_Unused(), _workload(), [MERGED_JOB], now, now, interval_s=1.0)  # type: ignore[arg-type]


def test_scraper_operations_need_a_deployed_backend() -> None:
    backend = LocalBackend()
    with pytest.raises(UsageError, match="before the first deploy"):
        backend.scraper_identity()
    with pytest.raises(UsageError, match="before the first deploy"):
        backend.issue_scraper(LIFETIME)


@requires_local_mesh
def test_rotation_hands_the_shared_scraper_a_long_lived_certificate_back(
    runs: dict[Fault | None, Observed],
) -> None:
    # other scenarios share the scraper: a 4 s certificate left behind would fail them
    for observed in runs.values():
        assert observed.left_lifetime > timedelta(hours=1)
