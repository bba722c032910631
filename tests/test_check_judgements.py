"""The check bodies' judgement of what Prometheus and the proxies answer, without a mesh.

A live control cannot choose when Prometheus scrapes: by the time one is judged its
targets are scraped, so how a target seen before (or during) its first scrapes is judged
never shows there. Here the answers are Prometheus 2.42's own JSON (``/api/v1/targets``
entries turned into :class:`~securemetrics_e2e.prometheus.Target` by ``Target.from_api``,
as both backends' :class:`~securemetrics_e2e.prometheus.PrometheusAPI` does), handed out
one poll at a time by a stand-in at the backend seam: the bodies run unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from prometheus_client.parser import text_string_to_metric_families

from securemetrics_e2e.backend import Backend, Deployment, Listener, Origin, Workload
from securemetrics_e2e.catalog import (
    ENVOY_JOB,
    MERGED_JOB,
    MetricsMode,
    MtlsMode,
    WorkloadKind,
    WorkloadSpec,
    scenario,
)
from securemetrics_e2e.checkbodies import _target_problem
from securemetrics_e2e.checks import (
    ENVOY_STATS_ONLY,
    ENVOY_UP,
    HARDENED_STATS,
    INJECTOR_ANNOTATION,
    LISTENERS,
    MTLS_SCRAPE,
    ROTATION_CONTINUITY,
    UPGRADE_CONTINUITY,
    CheckFailed,
)
from securemetrics_e2e.pki import SpiffeId
from securemetrics_e2e.probe import (
    MtlsOutcome,
    PlaintextOutcome,
    PlaintextResult,
    ScrapeResult,
    plaintext_result,
)
from securemetrics_e2e.prometheus import PrometheusAPI, Target
from securemetrics_e2e.timeouts import Timeouts
from securemetrics_e2e.versions import IstioVersion, resolve

NS = "ns1"
NATIVE = WorkloadSpec("httpbin", WorkloadKind.SIDECAR, MetricsMode.NATIVE, "httpbin")
#: no secure Envoy-only port, no envoy job, no injector annotation (ISTIO-FACTS.md)
LEGACY = WorkloadSpec("legacy", WorkloadKind.SIDECAR, MetricsMode.LEGACY, "legacy")
NEVER = "0001-01-01T00:00:00Z"  # Prometheus' lastScrape of a target not scraped yet
SCRAPED = "2026-11-26T05:00:00.123456789Z"
HINT = " \u2014 hint: "  # between a check's message and its hint (checkbase.Check.fail)


def _workload(spec: WorkloadSpec, ip: str = "10.244.0.3") -> Workload:
    sid = SpiffeId.parse(f"spiffe://cluster.local/ns/{NS}/sa/{spec.service_account}")
    return Workload(spec, NS, f"{spec.name}-1", ip, sid)


W = _workload(NATIVE)
WANT = W.url(15092, "/stats/prometheus")


@dataclass
class Poll:
    """What Prometheus answers at one poll: active targets (API entries), dropped targets'
    discovered labels, and the two queries of ``_failed_every_scrape`` (None: no series)."""

    active: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    count: float | None = None
    best: float | None = None


def entry(
    url: str, health: str, job: str = MERGED_JOB, w: Workload = W, error: str = ""
) -> dict[str, Any]:
    """One ``activeTargets`` element as Prometheus 2.42 writes it."""
    return {
        "scrapePool": job,
        "scrapeUrl": url,
        "health": health,
        "lastError": error,
        "lastScrape": NEVER if health == "unknown" else SCRAPED,
        "labels": {"job": job, "namespace": w.namespace, "pod": w.pod_name},
        "discoveredLabels": {"__meta_kubernetes_pod_name": w.pod_name, "job": job},
    }


class Recorded:
    """The three Prometheus calls the target checks make, answered poll by poll: each
    ``active_targets`` moves to the next :class:`Poll` (the last one stays)."""

    def __init__(self, *polls: Poll) -> None:
        self._polls: Iterator[Poll] = iter(polls)
        self._now = polls[0]
        self._last = polls[-1]

    def active_targets(self, job: str | None = None) -> list[Target]:
        self._now = next(self._polls, self._last)
        found = [Target.from_api(e) for e in self._now.active]
        return [t for t in found if job is None or t.job == job]

    def dropped_targets(self, job: str) -> list[dict[str, Any]]:
        return [d for d in self._now.dropped if d.get("job") == job]

    def query(self, promql: str) -> list[dict[str, Any]]:
        value = self._now.count if promql.startswith("count_over_time") else self._now.best
        return [] if value is None else [{"metric": {}, "value": [0, str(value)]}]


def _problem(api: Recorded, timeout: float = 3.0) -> tuple[str, str]:
    return _target_problem(cast(PrometheusAPI, api), MERGED_JOB, W, WANT, timeout)


# --------------------------------------------------------------- targets not scraped yet


def test_a_target_not_scraped_yet_is_waited_for_then_judged() -> None:
    # the first poll sees it "unknown" (Prometheus has not scraped it): not a verdict yet
    got = _problem(
        Recorded(Poll([entry(WANT, "unknown")]), Poll([entry(WANT, "down")], count=3, best=0))
    )
    assert got[0] == "target:down"


def test_a_down_target_in_its_first_scrapes_is_waited_for() -> None:
    # one failed scrape may be a warm-up (DOWN_SCRAPES): it comes UP on the next poll
    warm_up = Poll([entry(WANT, "down", error="EOF")], count=1, best=0)
    assert _problem(Recorded(warm_up, Poll([entry(WANT, "up")]))) == ("", "")


def test_a_down_target_without_an_up_series_yet_is_waited_for() -> None:
    # the target's health is reported before its `up` sample is queryable
    no_series = Poll([entry(WANT, "down", error="EOF")])
    assert _problem(Recorded(no_series, Poll([entry(WANT, "up")]))) == ("", "")


def test_an_up_series_appearing_between_the_two_queries_is_no_verdict() -> None:
    # count_over_time answered before the first sample, max_over_time after it: two
    # queries, two instants
    racing = Poll([entry(WANT, "down", error="EOF")], count=None, best=0)
    assert _problem(Recorded(racing, Poll([entry(WANT, "up")]))) == ("", "")


def test_three_failed_scrapes_and_never_up_fail_without_waiting() -> None:
    failed = Poll([entry(WANT, "down", error="EOF")], count=3, best=0)
    # the next poll would be UP: it is never asked for
    got = _problem(Recorded(failed, Poll([entry(WANT, "up")])))
    assert got == ("target:down", f"httpbin: job {MERGED_JOB}: {WANT}: down, last error: EOF")


def test_a_target_that_was_up_once_is_waited_for() -> None:
    flapping = Poll([entry(WANT, "down", error="EOF")], count=5, best=1)
    assert _problem(Recorded(flapping, Poll([entry(WANT, "up")]))) == ("", "")


def test_two_targets_of_the_pod_at_the_url_the_first_judged() -> None:
    # kubernetes_sd's pod role gives one target per container port; a job that rewrites
    # the address to the annotated port gives them all the same URL: the first decides
    both = Poll([entry(WANT, "up"), entry(WANT, "down", error="EOF")], count=3, best=1)
    assert _problem(Recorded(both)) == ("", "")


def test_every_target_of_the_pod_at_another_url_is_listed() -> None:
    # a job that keeps several ports of the pod, none the secure one: each is named
    other = [W.url(15090, "/stats/prometheus", "http"), W.url(15020, "/stats/prometheus", "http")]
    got = _problem(Recorded(Poll([entry(other[0], "up"), entry(other[1], "down")])))
    assert got == (
        "target:wrong-url",
        f"httpbin: job {MERGED_JOB} scrapes {other[0]} (up), {other[1]} (down), expected {WANT}",
    )


# --------------------------------------------------------------- timeouts


def test_a_pod_never_discovered_times_out_naming_the_job() -> None:
    got = _problem(Recorded(Poll()), timeout=0.3)
    assert got == (
        "target:timeout",
        f"httpbin: timed out after 0.3s waiting for job {MERGED_JOB} to scrape {WANT} "
        f"successfully; last seen: NotYet: pod httpbin-1 not discovered by job {MERGED_JOB} yet",
    )


def test_a_target_never_scraped_times_out_saying_so() -> None:
    got = _problem(Recorded(Poll([entry(WANT, "unknown")])), timeout=0.3)
    assert got == (
        "target:timeout",
        f"httpbin: timed out after 0.3s waiting for job {MERGED_JOB} to scrape {WANT} "
        f"successfully; last seen: NotYet: {WANT}: unknown, never scraped yet",
    )


# --------------------------------------------------------------- every workload judged


class Seam:
    """A backend at the seam answering, per workload name, what the bodies ask."""

    name = "stand-in"
    timeouts = Timeouts(target_up=3.0)

    def __init__(
        self,
        api: Recorded | None = None,
        listeners: Mapping[str, list[Listener]] | None = None,
        scrapes: Mapping[str, ScrapeResult] | None = None,
        annotations: Mapping[str, str] | None = None,
        inside: PlaintextOutcome = PlaintextOutcome.SERVED,
    ) -> None:
        self._api, self._listeners, self._scrapes = api, listeners or {}, scrapes or {}
        self._annotations, self._inside = dict(annotations or {}), inside

    def prometheus_for(self, deployment: Deployment) -> Recorded | None:
        return self._api

    def listeners(self, w: Workload) -> list[Listener]:
        return self._listeners[w.name]

    def scrape(self, w: Workload, port: int, path: str, **_: object) -> ScrapeResult:
        return self._scrapes[w.name]

    def inbound_path(self, w: Workload, port: int) -> str:
        return ""

    def pod_annotations(self, w: Workload) -> dict[str, str]:
        return self._annotations

    def plaintext(self, w: Workload, port: int, origin: Origin) -> PlaintextResult:
        """Hardened: refused from another pod, ``inside`` from inside the pod."""
        outcome = self._inside if origin is Origin.INSIDE_POD else PlaintextOutcome.REFUSED
        return plaintext_result(w.pod_ip, port, "/stats/prometheus", 0.01, (outcome, "said so"))


def _failed(check: Any, seam: Seam, *specs: WorkloadSpec) -> CheckFailed:
    workloads = tuple(_workload(s, f"10.244.0.{i}") for i, s in enumerate(specs, 3))
    dep = Deployment(scenario("native-sidecar"), MtlsMode.PERMISSIVE, NS, workloads)
    with pytest.raises(CheckFailed) as failed:
        check.run(cast(Backend, seam), dep)
    return failed.value


def test_listeners_a_missing_one_does_not_hide_the_next_port() -> None:
    any_address = "0.0.0.0"  # noqa: S104 - the listener's name and address, not a bind
    plaintext = Listener(f"{any_address}_15092", any_address, 15092, False, True, ("/metrics",))
    failed = _failed(LISTENERS, Seam(listeners={"httpbin": [plaintext]}), NATIVE)
    assert "listener:missing" in failed.observed
    assert "listener:not-tls-only" in failed.observed


def _served(url: str, status: int, spiffe: str = "") -> ScrapeResult:
    peer = SpiffeId.parse(spiffe) if spiffe else None
    return ScrapeResult(url, MtlsOutcome.HTTP_ERROR, "", 0.01, status, peer_spiffe_id=peer)


def test_envoy_port_stats_only_judges_the_workload_after_one_without_the_port() -> None:
    seam = Seam(scrapes={"httpbin": _served("https://10.244.0.4:15091/metrics", 200)})
    failed = _failed(ENVOY_STATS_ONLY, seam, LEGACY, NATIVE)
    assert failed.observed == ("stats-only:http-error",)


def test_targets_up_judges_the_workload_after_one_without_the_job() -> None:
    native = _workload(NATIVE, "10.244.0.4")
    url = native.url(15091, "/stats/prometheus")
    down = Poll([entry(url, "down", ENVOY_JOB, native, "EOF")], count=3, best=0)
    failed = _failed(ENVOY_UP, Seam(api=Recorded(down)), LEGACY, NATIVE)
    assert failed.observed == ("target:down",)


def test_injector_annotation_judges_the_sidecar_after_a_legacy_one() -> None:
    failed = _failed(INJECTOR_ANNOTATION, Seam(), LEGACY, NATIVE)
    assert "httpbin: pod httpbin-1 has prometheus.istio.io/secure-port absent" in failed.message


def test_injector_annotation_naming_another_port_is_quoted() -> None:
    seam = Seam(annotations={"prometheus.istio.io/secure-port": "15091"})
    failed = _failed(INJECTOR_ANNOTATION, seam, NATIVE)
    assert failed.message.startswith(
        "httpbin: pod httpbin-1 has prometheus.istio.io/secure-port '15091', expected '15092' "
    )


def test_hardened_port_closed_from_inside_the_pod_says_where() -> None:
    hardened = WorkloadSpec("httpbin", WorkloadKind.SIDECAR, MetricsMode.HARDENED, "httpbin")
    failed = _failed(HARDENED_STATS, Seam(inside=PlaintextOutcome.REFUSED), hardened)
    assert failed.message.startswith(
        "httpbin: plain HTTP to port 15090 from inside the pod refused (connection refused) "
        "(said so); it must be served (metrics returned)"
    )
    assert failed.observed == ("inside-pod:refused",)


def test_mtls_scrape_an_answer_from_another_identity_fails() -> None:
    # a scrape that does not verify the peer's identity itself (the cluster's in-pod curl)
    # hands the body a 200 from whichever identity answered
    impostor = "spiffe://cluster.local/ns/ns1/sa/httpbin-impostor"
    families = list(text_string_to_metric_families("# TYPE envoy_up gauge\nenvoy_up 1\n"))
    url = "https://10.244.0.3:15091/stats/prometheus"
    ok = ScrapeResult(url, MtlsOutcome.OK, "", 0.01, 200, families, SpiffeId.parse(impostor))
    failed = _failed(MTLS_SCRAPE, Seam(scrapes={"httpbin": ok}), NATIVE)
    assert failed.observed == ("scrape:peer-identity",)
    assert failed.message.startswith(
        f"httpbin secure Envoy-only port 15091: peer identity {impostor}, expected "
        "spiffe://cluster.local/ns/ns1/sa/httpbin; "
    )


# --------------------------------------------------------------- windows


def test_a_backend_that_can_neither_issue_nor_await_renewals_is_named() -> None:
    failed = _failed(ROTATION_CONTINUITY, Seam(), NATIVE)
    hint = ROTATION_CONTINUITY.hint
    assert failed.message == f"backend stand-in cannot drive certificate rotation{HINT}{hint}"


def test_a_backend_that_cannot_upgrade_is_named() -> None:
    failed = _failed(UPGRADE_CONTINUITY, Seam(), LEGACY)
    hint = UPGRADE_CONTINUITY.hint
    assert failed.message == f"backend stand-in cannot upgrade a deployment{HINT}{hint}"


class Upgrading(Seam):
    """An upgrading backend whose older version already fails (the window never opens)."""

    scrape_interval_s = 1.0

    def upgrade_versions(self) -> tuple[IstioVersion, IstioVersion]:
        return resolve("1.30.3"), resolve("1.31.1")

    def upgrade(self, deployment: Deployment) -> Deployment:
        raise AssertionError("a run that failed before the upgrade must not upgrade")


def test_a_failure_before_the_upgrade_is_reported_without_a_window() -> None:
    w = _workload(LEGACY)
    up = Poll([entry(w.url(15091, "/stats/prometheus"), "up", w=w)])
    refused = ScrapeResult(w.url(15091, "/stats/prometheus"), MtlsOutcome.REFUSED, "refused", 0.01)
    failed = _failed(
        UPGRADE_CONTINUITY, Upgrading(Recorded(up), scrapes={"legacy": refused}), LEGACY
    )
    # no continuity verdict: nothing was measured (upgrade_window.UpgradeRun.continuity None)
    assert failed.message == (
        "before the upgrade (Istio 1.30.3): [SMC002 mtls-scrape] legacy secure merged port "
        f"15091: refused: refused{HINT}{MTLS_SCRAPE.hint}{HINT}{UPGRADE_CONTINUITY.hint}"
    )
