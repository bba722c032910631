"""Certificate rotation driven on demand (the local backend), measured as it runs.

:func:`run_rotation` issues short-lived workload and scraper certificates, rotates
each in turn, checks the new one is served at once, and measures the scrape history
Prometheus kept across the window (:func:`.continuity.measure_continuity`). A backend
that drives rotation offers :class:`RotatingBackend`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from securemetrics_e2e.backend import Workload
from securemetrics_e2e.continuity import (
    LONG_LIVED,
    MAX_GAP_INTERVALS,
    STATS_PATH,
    Continuity,
    Missing,
    measure_continuity,
    wait_scraped,
)
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.pki import WorkloadIdentity
from securemetrics_e2e.probe import ScrapeResult
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for


@runtime_checkable
class RotatingBackend(Protocol):
    """What a backend offers to drive certificate rotation (the local backend does)."""

    def prometheus(self) -> PrometheusAPI: ...

    def scrape(self, workload: Workload, port: int, path: str = ...) -> ScrapeResult: ...

    def issue_workload(
        self, workload: Workload, lifetime: timedelta, *, expires_in: timedelta | None = None
    ) -> WorkloadIdentity: ...

    def rotate_workload(self, workload: Workload) -> WorkloadIdentity: ...

    def issue_scraper(
        self, lifetime: timedelta, *, expires_in: timedelta | None = None
    ) -> WorkloadIdentity: ...

    def rotate_scraper(self) -> WorkloadIdentity: ...

    def scraper_identity(self) -> WorkloadIdentity: ...

    def identity_of(self, workload: Workload) -> WorkloadIdentity: ...

    def reset_scraper_connections(self, workload: Workload) -> None: ...


# --------------------------------------------------------------------------- the driver


@dataclass(frozen=True)
class RotationStep:
    """One rotation and what followed it."""

    index: int
    workload_serial: int
    scraper_serial: int
    probe_serial: int | None  # what the probe last saw the workload present
    problem: str = ""  # "" when the new certificate was served and every job scraped UP


@dataclass(frozen=True)
class RotationRun:
    steps: tuple[RotationStep, ...]
    continuity: Continuity

    @property
    def ok(self) -> bool:
        return self.continuity.ok and not any(s.problem for s in self.steps)

    def failure_message(self) -> str:
        parts = [f"rotation {s.index}: {s.problem}" for s in self.steps if s.problem]
        if not self.continuity.ok:
            parts.append(self.continuity.failure_message())
        return "; ".join(parts)


def _wait_new_certificate(
    backend: RotatingBackend, workload: Workload, port: int, serial: int, timeout: float
) -> tuple[int | None, str, datetime | None]:
    """Wait until the probe sees ``workload`` serve certificate ``serial`` on ``port``.

    Returns the serial last seen, "" or the problem, and when a probe first failed.
    """
    seen: list[ScrapeResult] = []
    failed: list[datetime] = []

    def served() -> None:
        result = backend.scrape(workload, port, STATS_PATH)
        seen[:] = [result]
        if not result.ok:
            failed.append(datetime.now(UTC))
            raise NotYet(f"{result.outcome.value}: {result.detail}")
        if result.peer_serial != serial:
            raise NotYet(f"peer serial {result.peer_serial}, expected {serial:x}")

    try:
        wait_for(f"{workload.name}:{port} to serve certificate {serial:x}", served, timeout=timeout)
    except WaitTimeout as exc:
        last = seen[0].peer_serial if seen else None
        return last, str(exc), min(failed, default=None)
    return serial, "", None


def run_rotation(
    backend: RotatingBackend,
    workload: Workload,
    *,
    rotations: int = 3,
    lifetime: timedelta = timedelta(seconds=4),
    interval_s: float = 1.0,
) -> RotationRun:
    """:func:`_rotate_and_measure`, then long-lived certificates handed back.

    The scraper's identity is shared with every other scenario: once measured, it gets a
    certificate that outlives the run, as the agent would keep renewing it; so does the
    workload. Bad input is refused before anything is issued.
    """
    if rotations < 1:
        raise UsageError(f"rotations must be at least 1, got {rotations}")
    if lifetime.total_seconds() < 4 * interval_s:
        raise UsageError(
            f"certificate lifetime {lifetime} is shorter than four scrape intervals "
            f"({4 * interval_s:g}s): a rotation could not be confirmed before expiry"
        )
    try:
        return _rotate_and_measure(
            backend, workload, rotations=rotations, lifetime=lifetime, interval_s=interval_s
        )
    finally:
        backend.issue_scraper(LONG_LIVED)
        backend.issue_workload(workload, LONG_LIVED)


def _rotate_and_measure(
    backend: RotatingBackend,
    workload: Workload,
    *,
    rotations: int,
    lifetime: timedelta,
    interval_s: float,
) -> RotationRun:
    """Rotate ``workload``'s and the scraper's certificates while Prometheus scrapes.

    Both get fresh certificates of ``lifetime``; then, at least ``rotations`` times and
    until the window has outlived the first certificates (so one that was not renewed
    must have expired inside it), both are re-issued and each rotation must be followed
    by the probe seeing the new workload certificate and by every job scraping UP over
    a fresh connection. The first rotation that fails ends the rotations; the window
    still runs on for a few scrape intervals, so that Prometheus records the failure.
    """
    jobs = list(workload.spec.jobs)
    ports = sorted(set(workload.spec.jobs.values()))
    api = backend.prometheus()
    # a step waits in scrapes, not seconds: on a loaded machine a scrape may come late,
    # and the happy path returns at the first good one whatever the bound
    step_timeout = 6 * interval_s + 1.0
    settle = wait_scraped(
        api,
        [workload],
        f"jobs {', '.join(jobs)} to scrape {workload.name} UP",
        since=datetime.now(UTC),
        timeout=step_timeout * 3,
    )
    if settle.problem:
        raise UsageError(f"{workload.name} was not scraped UP before rotation: {settle.problem}")

    start = datetime.now(UTC)
    # Renewals keep the lifetime of what they renew, as istio-agent's do. The first
    # certificates get a lifetime longer than a rotation step can last by its own bounds
    # (each port's probe wait, the quiet moment, the UP wait) but are issued already
    # aged, so they expire ``lifetime`` from now: a scraper that never re-reads its files
    # meets an expired certificate inside the window (the negative control), while a
    # renewed certificate cannot expire during the step installing it, however slowly a
    # loaded machine runs that step.
    renewed = lifetime + timedelta(seconds=(len(ports) + 2) * step_timeout)
    first = backend.issue_workload(workload, renewed, expires_in=lifetime)
    backend.issue_scraper(renewed, expires_in=lifetime)
    outlive = first.not_after + timedelta(seconds=MAX_GAP_INTERVALS * interval_s)
    steps: list[RotationStep] = []
    # when the suite cut the scraper's connections: a scrape in flight then was cut by the
    # suite, not by the workload (continuity.judged_points leaves it out)
    resets: list[tuple[datetime, datetime]] = []
    failed_at: datetime | None = None
    while len(steps) < rotations or datetime.now(UTC) < outlive:
        identity = backend.rotate_workload(workload)
        scraper = backend.rotate_scraper()
        problems = []
        failures: list[datetime] = []
        seen: int | None = None
        for port in ports:
            seen, problem, when = _wait_new_certificate(
                backend, workload, port, identity.serial, step_timeout
            )
            if problem:
                problems.append(problem)
                failures += [when] if when else []
                break
        # Envoy judges a client certificate only in the handshake, and Prometheus keeps
        # connections alive: without a fresh connection an expired scraper certificate
        # would go unnoticed.
        _wait_quiet(api, workload, jobs, interval_s)
        reset_at = datetime.now(UTC)
        backend.reset_scraper_connections(workload)
        resets.append((reset_at, datetime.now(UTC)))
        scraped = wait_scraped(
            api,
            [workload],
            f"jobs {', '.join(jobs)} to scrape {workload.name} UP",
            since=reset_at,
            timeout=step_timeout,
        )
        if scraped.problem:
            problems.append(scraped.problem)
            failures += [scraped.first_failure] if scraped.first_failure else []
        steps.append(
            RotationStep(
                index=len(steps) + 1,
                workload_serial=identity.serial,
                scraper_serial=scraper.serial,
                probe_serial=seen,
                problem="; ".join(problems),
            )
        )
        if problems:
            # Certificates are judged when the first failure was seen: the workload's,
            # renewed until then, must not be blamed for expiring after rotation stopped.
            failed_at = min(failures, default=datetime.now(UTC))
            # A job that reconnected just before a certificate expired keeps that
            # connection: make every job handshake again with what the files hold now.
            _wait_quiet(api, workload, jobs, interval_s)
            cut = datetime.now(UTC)
            backend.reset_scraper_connections(workload)
            resets.append((cut, datetime.now(UTC)))
            _wait_failed_scrapes(api, workload, jobs, interval_s)
            break
    end = datetime.now(UTC)
    continuity = measure_continuity(
        api,
        workload,
        jobs,
        start,
        end,
        interval_s=interval_s,
        expiry_checked_at=failed_at,
        cut=tuple(resets),
        certificates={
            "scraper client certificate (OUTPUT_CERTS cert-chain.pem)": (
                backend.scraper_identity().cert
            ),
            f"{workload.name} workload certificate": backend.identity_of(workload).cert,
        },
    )
    return RotationRun(tuple(steps), continuity)


def _wait_quiet(
    api: PrometheusAPI, workload: Workload, jobs: Sequence[str], interval_s: float
) -> None:
    """Wait for a moment when no job is scraping ``workload``.

    Dropping a connection in the middle of a scrape fails that scrape ("connection
    abort"), which would be the harness' fault, not the mesh's. Prometheus reports a
    scrape (``lastScrape``, its start) once it has ended, and starts the next one an
    interval after the last: a target is quiet from that report until a quarter of an
    interval before its next scrape (the time dropping connections takes on a loaded
    machine). A scrape still running (on a loaded machine they last long) has not been
    reported yet, so its target is not quiet.
    """
    budget = interval_s / 4

    def quiet() -> None:
        now = datetime.now(UTC)
        for job in jobs:
            for t in workload.targets_in(api.active_targets(job)):
                if t.last_scrape is None:
                    continue
                since = (now - t.last_scrape).total_seconds()
                if since > interval_s - budget:
                    raise NotYet(f"job {job} scrapes {t.scrape_url} about now")

    try:
        wait_for(
            f"a moment when no job scrapes {workload.name}",
            quiet,
            timeout=3 * interval_s,
            interval=interval_s / 20,
            max_interval=interval_s / 20,
        )
    except WaitTimeout:
        return  # two jobs in phase: reset anyway; a failed scrape then shows as a finding


def _wait_failed_scrapes(
    api: PrometheusAPI, workload: Workload, jobs: Sequence[str], interval_s: float
) -> None:
    """Let Prometheus record a few failed scrapes, so the window shows the outage.

    Not seeing them is fine: the measurement then reports whatever was recorded.
    """
    want = math.ceil(MAX_GAP_INTERVALS) + 1
    wait_scraped(
        api,
        [workload],
        "Prometheus to record the outage",
        jobs=jobs,
        since=datetime.now(UTC) + timedelta(seconds=want * interval_s),
        up=False,
        missing=Missing.SKIP,
        timeout=(want + 2) * interval_s,
    )
