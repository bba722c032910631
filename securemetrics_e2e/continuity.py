"""Continuity: certificates rotate while Prometheus scrapes, and scraping never stops.

Users rarely meet "it never worked"; they meet "it stopped later": workload certificates
copied once for Prometheus that expired (istio#28050), upgrades that dropped targets
(istio#19874). :func:`run_rotation` rotates the workload's and the scraper's short-lived
certificates several times; after each rotation the suite's probe must see the NEW
workload certificate and Prometheus must scrape the workload UP again. Then
:func:`measure_continuity` reads the ``up`` samples of both jobs for the whole window
from Prometheus itself: the fraction of successful scrapes and the longest time without
one. Goal: 100% and no gap longer than two scrape intervals.

The ``up`` samples are read raw (a range selector), not with a stepped range query: a
stepped query repeats the last sample for up to five minutes, so a scrape that never
happened would look like one that succeeded.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from securemetrics_e2e.backend import Workload
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.prometheus import PrometheusAPI, Target
from securemetrics_e2e.results import AS_DOCUMENTED, ContinuityRecord, JobContinuity
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

STATS_PATH = "/stats/prometheus"
#: the longest time without a successful scrape, in scrape intervals, that still passes
MAX_GAP_INTERVALS = 2.0
#: the lifetime of certificates handed back after a rotation shortened them
LONG_LIVED = timedelta(hours=24)
#: a successful scrape vouches for the workload until the next one is due; Prometheus
#: starts scrapes a few milliseconds late, so it vouches for a tenth of an interval more
COVER_SLACK = 1.1
#: a failed scrape that lasted this share of the interval or more ran to its timeout
STARVED_FRACTION = 0.9
#: a scrape's recorded end may trail the moment its connection was cut by this much
CUT_SLACK_S = 0.05
#: coverage at or above this is the whole window (float rounding, not tolerance)
FULLY_COVERED = 1 - 1e-9


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class Continuity:
    """Scraping continuity of one workload, measured from Prometheus' ``up`` samples."""

    workload: str
    start: datetime
    end: datetime
    interval_s: float
    jobs: tuple[JobContinuity, ...]
    expired: tuple[str, ...] = ()  # certificates found expired at the end, described

    @property
    def max_gap_s(self) -> float:
        return MAX_GAP_INTERVALS * self.interval_s

    def job_problems(self, job: JobContinuity) -> list[str]:
        """Why ``job`` missed the goal ([] when it met it)."""
        why = []
        if job.scrapes == 0:
            why.append("no scrapes at all in the window")
        elif job.covered is not None:
            if job.covered < FULLY_COVERED:
                why.append(f"{1 - job.covered:.1%} of the window without a successful scrape")
        elif job.successes < job.scrapes:
            why.append(f"{job.scrapes - job.successes} failed scrape(s)")
        if job.longest_gap_s > self.max_gap_s:
            why.append(f"gap {job.longest_gap_s:.1f}s > {self.max_gap_s:g}s")
        return why

    def problems(self) -> list[str]:
        found = []
        for job in self.jobs:
            why = self.job_problems(job)
            if why:
                error = f"; last error: {job.last_error}" if job.last_error else ""
                found.append(f"{job.summary()} ({', '.join(why)}){error}")
        return found

    @property
    def ok(self) -> bool:
        return bool(self.jobs) and not self.problems()

    def verdict_line(self) -> str:
        """One line for the report and the verdict: PASS/FAIL and every job's numbers."""
        status = "PASS" if self.ok else "FAIL"
        window = (self.end - self.start).total_seconds()
        jobs = "; ".join(j.summary() for j in self.jobs) or "no jobs"
        return f"continuity {status} {self.workload} over {window:.1f}s: {jobs}"

    def records(
        self, scenario: str, mode: str, variant: str = AS_DOCUMENTED
    ) -> list[ContinuityRecord]:
        """One record per job of one run unit, for the run's result (report and verdict)."""
        return [
            ContinuityRecord(
                scenario, mode, job, passed=not self.job_problems(job), variant=variant
            )
            for job in self.jobs
        ]

    def failure_message(self) -> str:
        """What went wrong, naming certificate expiry when that is the cause ("" if ok)."""
        if self.ok:
            return ""
        parts = self.problems()
        if self.expired:
            parts.append("certificate expiry: " + "; ".join(self.expired))
        return f"scraping of {self.workload} was not continuous: " + "; ".join(parts)


def _expired(certificates: Mapping[str, x509.Certificate], now: datetime) -> tuple[str, ...]:
    return tuple(
        f"the {what} (serial {cert.serial_number:x}) expired at "
        f"{cert.not_valid_after_utc.isoformat()} and was not renewed (cf. istio#28050)"
        for what, cert in certificates.items()
        if cert.not_valid_after_utc < now
    )


def _measure_job(
    api: PrometheusAPI,
    job: str,
    series: str,
    mine: Callable[[list[Target]], list[Target]],
    start: datetime,
    since: datetime | None,
    end: datetime,
    *,
    interval_s: float,
    cover: bool,
    cut: Sequence[tuple[datetime, datetime]] = (),
) -> JobContinuity:
    """One job's continuity from the raw ``up`` samples of ``series`` (PromQL).

    The window is ``[since, end]``, or from the job's first sample after ``start`` when
    ``since`` is None. ``cover``: judge by coverage (any pod of the workload counts),
    not by every scrape succeeding.
    """
    points, unjudged = _series_points(api, series, start, interval_s, cut)
    hi = end.timestamp()
    if since is None:
        first = [ts for ts, _, _ in points if ts >= start.timestamp()]
        lo = min(first) if first else hi
    else:
        lo = since.timestamp()
    inside = [(ts, up, pod) for ts, up, pod in points if lo <= ts <= hi]
    good = [ts for ts, up, _ in inside if up]
    covered = None
    if cover:
        covered = _covered(points, lo, hi, interval_s) if hi > lo else 0.0
    targets = mine(api.active_targets(job))
    return JobContinuity(
        job=job,
        scrapes=len(inside),
        successes=len(good),
        longest_gap_s=max(b - a for a, b in itertools.pairwise([lo, *good, hi]))
        if hi > lo
        else 0.0,
        last_error=next((t.last_error for t in targets if t.last_error), ""),
        covered=covered,
        pods=len({pod for _, _, pod in inside}),
        unjudged=unjudged,
    )


def measure_continuity(
    api: PrometheusAPI,
    workload: Workload,
    jobs: Sequence[str],
    start: datetime,
    end: datetime,
    *,
    interval_s: float,
    certificates: Mapping[str, x509.Certificate] | None = None,
    expiry_checked_at: datetime | None = None,
    cut: Sequence[tuple[datetime, datetime]] = (),
) -> Continuity:
    """Continuity of ``workload``'s scrapes by ``jobs`` over ``[start, end]``.

    ``certificates`` (described by name, e.g. "scraper client certificate") are checked
    for expiry at ``expiry_checked_at`` (default: now), so that a failure caused by one
    names it. ``cut``: when the suite itself dropped the scraper's connections (from, to).
    """
    if end <= start:
        raise UsageError(f"continuity window ends ({end}) before it starts ({start})")
    if not jobs:
        raise UsageError(f"no scrape jobs given for workload {workload.name}")
    measured = tuple(
        _measure_job(
            api,
            job,
            workload.up_series(job),
            workload.targets_in,
            start,
            start,
            end,
            interval_s=interval_s,
            cover=False,
            cut=cut,
        )
        for job in jobs
    )
    return Continuity(
        workload=workload.name,
        start=start,
        end=end,
        interval_s=interval_s,
        jobs=measured,
        expired=_expired(certificates or {}, expiry_checked_at or datetime.now(UTC)),
    )


def _covered(
    points: Sequence[tuple[float, bool, str]], lo: float, hi: float, interval_s: float
) -> float:
    """The fraction of ``[lo, hi]`` for which a successful scrape vouches.

    Counted in scrapes, not seconds, so that a late scraper is not taken for a late
    workload: a success vouches until the same pod's next scrape, whatever that found, up
    to the longest allowed gap (longer gaps fail :attr:`Continuity.max_gap_s` anyway); a
    pod's last success (it was retired, or the window ends) vouches for one interval and
    the slack Prometheus starts scrapes late by. A success just before ``lo`` vouches for
    the window's first moments.
    """
    by_pod: dict[str, list[tuple[float, bool]]] = {}
    for ts, up, pod in sorted(points):
        by_pod.setdefault(pod, []).append((ts, up))
    spans = []
    for samples in by_pod.values():
        for (ts, up), following in itertools.zip_longest(samples, samples[1:]):
            if not up:
                continue
            if following is None:
                spans.append((ts, ts + COVER_SLACK * interval_s))
            else:
                spans.append((ts, min(following[0], ts + MAX_GAP_INTERVALS * interval_s)))
    covered, reach = 0.0, lo
    for begin, finish in sorted(spans):
        start, stop = max(begin, reach), min(finish, hi)
        if stop > start:
            covered += stop - start
            reach = stop
    return covered / (hi - lo)


def measure_namespace_continuity(
    api: PrometheusAPI,
    namespace: str,
    workload: str,
    jobs: Mapping[str, datetime | None],
    end: datetime,
    *,
    interval_s: float,
) -> Continuity:
    """Continuity of a workload whose pods are replaced inside the window (an upgrade).

    Every pod named ``<workload>-...`` in ``namespace`` counts: the workload is scraped
    while any of its pods is. ``jobs`` maps each job to when its window starts, or to
    None for a job that only scrapes the new pods (e.g. the Envoy-only port a switch to
    the native ports opens): its window starts at its first sample. A job is continuous
    when successful scrapes cover the whole window and no gap exceeds two intervals;
    failed scrapes of a pod being replaced are counted but do not fail it by themselves.
    """
    starts = [s for s in jobs.values() if s is not None]
    if not jobs or not starts:
        raise UsageError(f"no scrape job with a window start given for {namespace}/{workload}")
    start = min(starts)
    if end <= start:
        raise UsageError(f"continuity window ends ({end}) before it starts ({start})")
    labels = f'namespace="{namespace}",pod=~"{workload}-.+"'

    def mine(targets: list[Target]) -> list[Target]:
        return [
            t
            for t in targets
            if t.labels.get("namespace") == namespace
            and t.labels.get("pod", "").startswith(f"{workload}-")
        ]

    measured = [
        _measure_job(
            api,
            job,
            f'up{{job="{job}",{labels}}}',
            mine,
            start,
            since,
            end,
            interval_s=interval_s,
            cover=True,
        )
        for job, since in jobs.items()
    ]
    return Continuity(
        workload=f"{namespace}/{workload}",
        start=start,
        end=end,
        interval_s=interval_s,
        jobs=tuple(measured),
    )


def _series_points(
    api: PrometheusAPI,
    selector: str,
    start: datetime,
    interval_s: float,
    cut: Sequence[tuple[datetime, datetime]] = (),
) -> tuple[list[tuple[float, bool, str]], int]:
    """Raw ``up`` samples since a little before ``start``: (time, up, pod), by time; and
    how many failed scrapes were left out (:func:`judged_points`)."""
    seconds = math.ceil((datetime.now(UTC) - start).total_seconds() + 2 * interval_s) + 2
    metric = selector.split("{", 1)[0]

    def raw(name: str) -> list[tuple[float, str, str]]:
        series = api.query(f"{name}{selector.removeprefix(metric)}[{seconds}s]")
        return [
            (float(ts), value, str((s.get("metric") or {}).get("pod", "")))
            for s in series
            for ts, value in s.get("values", [])
        ]

    ups = [(ts, value == "1", pod) for ts, value, pod in raw(metric)]
    durations = {(ts, pod): float(value) for ts, value, pod in raw("scrape_duration_seconds")}
    cuts = [(a.timestamp(), b.timestamp()) for a, b in cut]
    return judged_points(ups, durations, interval_s, cuts)


def judged_points(
    ups: Sequence[tuple[float, bool, str]],
    durations: Mapping[tuple[float, str], float],
    interval_s: float,
    cuts: Sequence[tuple[float, float]] = (),
) -> tuple[list[tuple[float, bool, str]], int]:
    """The scrapes that say something about the workload, by time, and how many did not.

    A failed scrape that ran to the scrape timeout (Prometheus records its
    ``scrape_duration_seconds`` beside ``up``; the suite's jobs time out at the interval)
    says the scraper or the machine was starved, not that the workload's TLS failed: a
    certificate problem ends a scrape at once with a TLS alert, a closed port with a
    reset. Such a scrape is left out, neither a success nor a failure; the successes on
    either side of it must still lie within the longest allowed gap, so an outage made of
    timeouts still fails. Counted in scrapes, as a loaded machine needs.

    So is a failed scrape that was in flight while the suite itself dropped the
    scraper's connections (``cuts``: from, to; the rotation makes the scraper handshake
    again): the suite cut it, not the workload. A scrape that starts after the cut and
    fails (an expired certificate) is judged.
    """
    kept, left_out = [], 0
    for ts, up, pod in ups:
        took = durations.get((ts, pod), 0.0)
        starved = took >= STARVED_FRACTION * interval_s
        was_cut = any(ts <= done and begun <= ts + took + CUT_SLACK_S for begun, done in cuts)
        if not up and (starved or was_cut):
            left_out += 1
            continue
        kept.append((ts, up, pod))
    return sorted(kept), left_out


# --------------------------------------------------------------------------- waiting


class Missing(enum.Enum):
    """What a workload without a target in a job means to :func:`wait_scraped`."""

    WAIT = "wait"  # not discovered yet: keep waiting
    SKIP = "skip"  # nothing to wait for
    SKIP_DROPPED = "skip-dropped"  # keep waiting, unless relabeling dropped it (final)


@dataclass(frozen=True)
class ScrapeWait:
    timed_out: WaitTimeout | None  # None when every job scraped as required in time
    first_failure: datetime | None  # when Prometheus first recorded a failed scrape

    @property
    def problem(self) -> str:
        return str(self.timed_out) if self.timed_out is not None else ""


def wait_scraped(
    api: PrometheusAPI,
    workloads: Sequence[Workload],
    what: str,
    *,
    timeout: float,
    jobs: Sequence[str] | None = None,
    since: datetime | None = None,
    up: bool = True,
    missing: Missing = Missing.WAIT,
    interval: float | None = None,
) -> ScrapeWait:
    """Wait until each job (default: the workload's own) has scraped each workload after
    ``since`` and, with ``up``, successfully. One targets request per poll."""
    failed: list[datetime] = []

    def judged() -> None:
        by_job: dict[str, list[Target]] = {}
        for t in api.active_targets():
            by_job.setdefault(t.job, []).append(t)
        for w in workloads:
            for job in jobs if jobs is not None else list(w.spec.jobs):
                mine = w.targets_in(by_job.get(job, []))
                if not mine:
                    if missing is Missing.SKIP or (
                        missing is Missing.SKIP_DROPPED and w.dropped_in(api.dropped_targets(job))
                    ):
                        continue
                    raise NotYet(f"job {job}: no target for pod {w.pod_name}")
                for t in mine:
                    if since is not None and (t.last_scrape is None or t.last_scrape <= since):
                        raise NotYet(f"job {job}: {t.scrape_url} last scraped {t.last_scrape}")
                    if up and t.health != "up":
                        if t.last_scrape is not None:
                            failed.append(t.last_scrape)
                        raise NotYet(f"job {job}: {t.describe()}")

    pace = {"interval": interval, "max_interval": interval} if interval else {}
    try:
        wait_for(what, judged, timeout=timeout, **pace)
    except WaitTimeout as exc:
        return ScrapeWait(exc, min(failed, default=None))
    return ScrapeWait(None, None)
