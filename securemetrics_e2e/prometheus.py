"""A small client for the Prometheus HTTP API: readiness, scrape targets, queries.

Only the endpoints the suite needs: ``/-/ready``, ``/api/v1/targets``,
``/api/v1/query``, ``/api/v1/query_range`` and ``/api/v1/status/config``. Every HTTP
call goes through a *runner*, so a caller can execute it somewhere else: the local
backend runs each call inside a network namespace thread, where the scraper lives.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import requests
import yaml

from securemetrics_e2e.errors import SecureMetricsError
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

T = TypeVar("T")

# Prometheus reports a target that was never scraped with Go's zero time.
_NEVER = datetime.fromisoformat("0001-01-01T00:00:00+00:00")


class PrometheusUnavailable(SecureMetricsError):
    """The Prometheus HTTP API could not be reached or did not answer as Prometheus does."""


class PrometheusQueryError(SecureMetricsError):
    """Prometheus rejected a request (a bad PromQL expression, a bad time range)."""


class TargetsNotUp(SecureMetricsError):
    """A scrape job's targets did not all become UP in time.

    The message lists every target with its health and last scrape error; when the job
    has no target at all it says so, and whether relabeling dropped what service
    discovery found (the silent failure of istio#19874).
    """

    def __init__(
        self,
        message: str,
        *,
        job: str,
        targets: list[Target],
        dropped: list[dict[str, Any]],
    ) -> None:
        super().__init__(message)
        self.job = job
        self.targets = targets
        self.dropped = dropped


class Runner(Protocol):
    """Executes one HTTP call and returns its result (possibly from another thread)."""

    def __call__(self, call: Callable[[], T], /) -> T: ...


def run_inline(call: Callable[[], T], /) -> T:
    return call()


@dataclass(frozen=True)
class Target:
    """One active scrape target, as ``/api/v1/targets`` reports it."""

    job: str  # the scrape pool, which is the job name
    scrape_url: str
    health: str  # "up" | "down" | "unknown"
    last_error: str
    last_scrape: datetime | None  # None until the first scrape
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    discovered_labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def from_api(cls, entry: Mapping[str, Any]) -> Target:
        """Build a target from one element of ``data.activeTargets``."""
        raw_time = entry.get("lastScrape") or ""
        last: datetime | None = None
        if raw_time:
            # Python 3.11 accepts RFC 3339 with nanoseconds (truncated to microseconds).
            parsed = datetime.fromisoformat(raw_time)
            last = None if parsed <= _NEVER else parsed
        return cls(
            job=str(entry.get("scrapePool", "")),
            scrape_url=str(entry.get("scrapeUrl", "")),
            health=str(entry.get("health", "unknown")),
            last_error=str(entry.get("lastError", "")),
            last_scrape=last,
            labels=dict(entry.get("labels") or {}),
            discovered_labels=dict(entry.get("discoveredLabels") or {}),
        )

    def describe(self) -> str:
        text = f"{self.scrape_url}: {self.health}"
        if self.last_error:
            text += f", last error: {self.last_error}"
        elif self.last_scrape is None:
            text += ", never scraped yet"
        return text


def up_problem(
    targets: Collection[Target],
    *,
    urls: Collection[str] | None = None,
    expected: int | None = None,
) -> str | None:
    """Why ``targets`` are not UP, or None: the one "targets UP" rule of the suite.

    Without ``urls``, every target must be UP, and there must be at least one. With
    ``urls``, each of those scrape URLs must be a target and UP; other targets are not
    judged. ``expected`` also requires exactly that many targets.
    """
    if not targets:
        return "no targets"
    if expected is not None and len(targets) != expected:
        return f"{len(targets)} targets, expected {expected}"
    by_url = {t.scrape_url: t for t in targets}
    judged = list(targets)
    if urls is not None:
        missing = sorted(set(urls) - by_url.keys())
        if missing:
            return f"no target for {', '.join(missing)}"
        judged = [by_url[u] for u in sorted(urls)]
    not_up = [t for t in judged if t.health != "up"]
    if not_up:
        return "; ".join(t.describe() for t in not_up)
    return None


class PrometheusAPI:
    """Client for one Prometheus server's HTTP API at ``base_url``."""

    def __init__(
        self,
        base_url: str,
        *,
        runner: Runner | None = None,
        session: requests.Session | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._runner: Runner = runner if runner is not None else run_inline
        if session is None:
            session = requests.Session()
            # Prometheus is on loopback or inside a network namespace: never via a proxy.
            session.trust_env = False
        self._session = session

    def __repr__(self) -> str:
        return f"PrometheusAPI({self.base_url!r})"

    # -- readiness -----------------------------------------------------------------

    def ready(self) -> bool:
        """True when ``/-/ready`` answers 200; False when unreachable or still starting."""
        url = f"{self.base_url}/-/ready"
        try:
            response = self._runner(lambda: self._session.get(url, timeout=self.timeout))
        except requests.RequestException:
            return False
        return response.status_code == 200

    def wait_ready(self, timeout: float) -> None:
        """Wait until ``/-/ready`` answers 200; raise :class:`PrometheusUnavailable`."""
        url = f"{self.base_url}/-/ready"

        def probe() -> None:
            try:
                response = self._runner(lambda: self._session.get(url, timeout=self.timeout))
            except requests.RequestException as exc:
                raise NotYet(f"{url} unreachable: {exc}") from exc
            if response.status_code != 200:
                raise NotYet(f"{url} answered {response.status_code}: {response.text[:200]}")

        try:
            wait_for(f"Prometheus at {self.base_url} to be ready", probe, timeout=timeout)
        except WaitTimeout as exc:
            raise PrometheusUnavailable(
                f"Prometheus at {self.base_url} did not become ready within {timeout:g}s "
                f"(last seen: {exc.last}); check that it is running and its log for errors"
            ) from exc

    # -- targets -------------------------------------------------------------------

    def active_targets(self, job: str | None = None) -> list[Target]:
        """Active targets, all of them or those of scrape job ``job``."""
        data = self._get("/api/v1/targets", {"state": "active"})
        targets = [Target.from_api(entry) for entry in data.get("activeTargets") or []]
        return [t for t in targets if job is None or t.job == job]

    def dropped_targets(self, job: str) -> list[dict[str, Any]]:
        """Targets that service discovery found for ``job`` and relabeling dropped.

        Each is the ``discoveredLabels`` mapping (it includes ``job``, which is how
        they are matched to a job).
        """
        data = self._get("/api/v1/targets", {"state": "dropped"})
        found: list[dict[str, Any]] = []
        for entry in data.get("droppedTargets") or []:
            labels = dict(entry.get("discoveredLabels") or {})
            if labels.get("job") == job:
                found.append(labels)
        return found

    def wait_targets_up(
        self,
        job: str,
        *,
        expected: int | None = None,
        urls: Collection[str] | None = None,
        timeout: float,
    ) -> list[Target]:
        """Wait until ``job``'s targets are UP and return them.

        Without ``urls``, every target of the job must be UP, and there must be at least
        one. With ``urls``, each of those scrape URLs must be a target and UP; other
        targets of the job are not judged. ``expected`` also requires exactly that
        many targets. On timeout raise :class:`TargetsNotUp`.
        """
        wanted = frozenset(urls) if urls is not None else None
        return self._wait_targets(
            job,
            lambda targets: up_problem(targets, urls=wanted, expected=expected),
            what="UP",
            expected=expected,
            urls=wanted,
            timeout=timeout,
        )

    def wait_scraped(
        self, job: str, *, expected: int | None = None, timeout: float
    ) -> list[Target]:
        """Wait until every target of ``job`` has been scraped once (health not "unknown").

        Lets a caller judge a target that should be DOWN as soon as Prometheus has tried
        it, instead of waiting for :meth:`wait_targets_up` to time out.
        """

        def problem(targets: list[Target]) -> str | None:
            if not targets:
                return "no targets"
            if expected is not None and len(targets) != expected:
                return f"{len(targets)} targets, expected {expected}"
            waiting = [t for t in targets if t.health == "unknown"]
            if waiting:
                return "not scraped yet: " + ", ".join(t.scrape_url for t in waiting)
            return None

        return self._wait_targets(
            job, problem, what="scraped", expected=expected, urls=None, timeout=timeout
        )

    def _wait_targets(
        self,
        job: str,
        problem: Callable[[list[Target]], str | None],
        *,
        what: str,
        expected: int | None,
        urls: frozenset[str] | None,
        timeout: float,
    ) -> list[Target]:
        last: list[list[Target]] = [[]]

        def probe() -> list[Target]:
            targets = self.active_targets(job)
            last[0] = targets
            reason = problem(targets)
            if reason is not None:
                raise NotYet(reason)
            return targets

        try:
            return wait_for(f"Prometheus job {job!r} targets {what}", probe, timeout=timeout)
        except WaitTimeout:
            targets = last[0]
            dropped = self.dropped_targets(job) if not targets else []
            message = self._not_up_message(
                job, targets, dropped, what=what, expected=expected, urls=urls, timeout=timeout
            )
            raise TargetsNotUp(message, job=job, targets=targets, dropped=dropped) from None

    def _not_up_message(
        self,
        job: str,
        targets: list[Target],
        dropped: list[dict[str, Any]],
        *,
        what: str,
        expected: int | None,
        urls: frozenset[str] | None,
        timeout: float,
    ) -> str:
        if not targets:
            return self._zero_targets_message(job, dropped, timeout)
        wanted = []
        if expected is not None:
            wanted.append(f"{expected} target(s)")
        if urls is not None:
            wanted.append("targets " + ", ".join(sorted(urls)))
        lines = [
            f"Prometheus job {job!r}: targets not {what} after {timeout:g}s"
            + (f" (expected {' and '.join(wanted)})" if wanted else "")
            + f"; {len(targets)} target(s):"
        ]
        lines += [f"  - {t.describe()}" for t in sorted(targets, key=lambda t: t.scrape_url)]
        if urls is not None:
            lines += [
                f"  - {u}: not a target of this job"
                for u in sorted(urls - {t.scrape_url for t in targets})
            ]
        return "\n".join(lines)

    def _zero_targets_message(self, job: str, dropped: list[dict[str, Any]], timeout: float) -> str:
        head = f"Prometheus job {job!r} found ZERO targets after {timeout:g}s (see istio#19874)"
        if dropped:
            sample = ", ".join(
                f"{{{', '.join(f'{k}={v!r}' for k, v in sorted(labels.items()))}}}"
                for labels in dropped[:3]
            )
            return (
                f"{head}: service discovery found {len(dropped)} target(s) but relabeling "
                f"dropped them all; check the job's keep rules against the pods' annotations "
                f"(e.g. prometheus.istio.io/secure-port). Dropped, first "
                f"{min(3, len(dropped))}: {sample}"
            )
        jobs = self._configured_jobs()
        if jobs is not None and job not in jobs:
            return (
                f"{head}: no job of that name is configured; configured jobs: "
                f"{', '.join(sorted(jobs)) or '(none)'}"
            )
        return (
            f"{head}: service discovery found nothing for it (no active and no dropped "
            "targets); check its service discovery settings (namespaces, role, files) and "
            "that the workloads exist"
        )

    def _configured_jobs(self) -> set[str] | None:
        try:
            config = yaml.safe_load(self.config_yaml())
        except (SecureMetricsError, yaml.YAMLError):
            return None
        if not isinstance(config, dict):
            return None
        return {
            str(sc.get("job_name"))
            for sc in config.get("scrape_configs") or []
            if isinstance(sc, dict)
        }

    # -- queries and config --------------------------------------------------------

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Evaluate ``promql`` now; the ``result`` list (vector samples, or one scalar)."""
        data = self._get("/api/v1/query", {"query": promql})
        return _result_list(data)

    def query_range(
        self,
        promql: str,
        start: datetime | float,
        end: datetime | float,
        step: timedelta | float,
    ) -> list[dict[str, Any]]:
        """Evaluate ``promql`` over ``[start, end]`` every ``step``; the matrix series."""
        params = {
            "query": promql,
            "start": _timestamp(start),
            "end": _timestamp(end),
            "step": str(step.total_seconds() if isinstance(step, timedelta) else step),
        }
        return _result_list(self._get("/api/v1/query_range", params))

    def config_yaml(self) -> str:
        """The configuration Prometheus loaded, as YAML text."""
        return str(self._get("/api/v1/status/config").get("yaml", ""))

    # -- plumbing ------------------------------------------------------------------

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        url = f"{self.base_url}{path}"

        def call() -> requests.Response:
            return self._session.get(url, params=params, timeout=self.timeout)

        try:
            response = self._runner(call)
        except requests.RequestException as exc:
            raise PrometheusUnavailable(
                f"Prometheus API {url} is unreachable: {exc}; check that Prometheus is "
                "running and listening at that address"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            raise PrometheusUnavailable(
                f"{url} answered HTTP {response.status_code} that is not Prometheus API JSON "
                f"({response.text[:200]!r}); is {self.base_url} really a Prometheus server?"
            ) from None
        if not isinstance(body, dict) or "status" not in body:
            raise PrometheusUnavailable(f"{url} answered unexpected JSON: {str(body)[:200]}")
        if body["status"] != "success":
            raise PrometheusQueryError(
                f"Prometheus rejected {path} with {dict(params or {})}: "
                f"{body.get('errorType', 'error')}: {body.get('error', '(no message)')}"
            )
        data = body.get("data")
        return data if isinstance(data, dict) else {}


def _result_list(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    result = data.get("result")
    if data.get("resultType") in ("scalar", "string"):
        return [{"metric": {}, "value": result}]
    return list(result or [])


def _timestamp(value: datetime | float) -> str:
    return str(value.timestamp() if isinstance(value, datetime) else value)
