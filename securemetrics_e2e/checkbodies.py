"""The bodies of the conformance checks: one behaviour each, against a deployed scenario.

A body runs through the backend seam only, so the same check proves the same thing on the
local backend and on a cluster. It raises :class:`~securemetrics_e2e.checkbase.CheckFailed`
(through ``check.fail``) with a message that says what was expected and what was seen.
Which body is which check, with its id, code, title and hint, is the registry's:
:mod:`securemetrics_e2e.checks`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from securemetrics_e2e.backend import Backend, Credential, Deployment, Origin, Workload
from securemetrics_e2e.catalog import (
    Feature,
    MetricsMode,
    Scenario,
    WorkloadKind,
    WorkloadSpec,
)
from securemetrics_e2e.checkbase import Check
from securemetrics_e2e.configdump import listener_on_port
from securemetrics_e2e.istionames import SECURE_PORT
from securemetrics_e2e.probe import MtlsOutcome, PlaintextOutcome
from securemetrics_e2e.prometheus import PrometheusAPI, Target, up_problem
from securemetrics_e2e.rotation import RotatingBackend, RotationRun, run_rotation
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

STATS_PATH = "/stats/prometheus"
#: a target DOWN in this many scrapes, and never UP, fails without waiting for the timeout
DOWN_SCRAPES = 3


def _secure_ports(w: Workload) -> Iterator[tuple[str, int]]:
    """(role, port) of every secure port the workload must serve."""
    if w.spec.secure_envoy_port is not None:
        yield "secure Envoy-only", w.spec.secure_envoy_port
    yield "secure merged", w.spec.secure_merged_port


def _expected_prefixes(w: Workload, role: str) -> tuple[str, ...]:
    if role == "secure Envoy-only":
        return (STATS_PATH,)
    if w.spec.mode is MetricsMode.LEGACY:
        # Sidecar ingress defaultEndpoint forwards everything; the legacy gateway's
        # VirtualService routes only the stats prefix.
        return ("/",) if w.kind is WorkloadKind.SIDECAR else (STATS_PATH,)
    return (STATS_PATH, "/metrics")


# --------------------------------------------------------------------------- checks


def listeners_tls_only(check: Check, backend: Backend, dep: Deployment) -> None:
    with check.findings() as found:
        for w in dep.workloads:
            listeners = backend.listeners(w)
            for role, port in _secure_ports(w):
                lst = listener_on_port(listeners, port)
                if lst is None:
                    found.add(
                        f"{w.name}: no listener on the {role} port {port}", "listener:missing"
                    )
                    continue
                if not lst.tls_only:
                    found.add(
                        f"{w.name}: listener {lst.name} accepts non-TLS connections",
                        "listener:not-tls-only",
                    )
                if not lst.client_cert_required:
                    found.add(
                        f"{w.name}: listener {lst.name} does not require a client certificate",
                        "listener:no-client-cert",
                    )
                expected = _expected_prefixes(w, role)
                if tuple(sorted(lst.route_prefixes)) != tuple(sorted(expected)):
                    found.add(
                        f"{w.name}: {role} port {port} routes {list(lst.route_prefixes)}, "
                        f"expected {list(expected)}",
                        "listener:routes",
                    )


def mtls_scrape(check: Check, backend: Backend, dep: Deployment) -> None:
    with check.findings() as found:
        for w in dep.workloads:
            for role, port in _secure_ports(w):
                result = backend.scrape(w, port, STATS_PATH)
                where = f"{w.name} {role} port {port}"
                if result.outcome is not MtlsOutcome.OK:
                    path = backend.inbound_path(w, port)
                    found.add(
                        f"{where}: {result.outcome.value}: {result.detail}"
                        + (f" [inbound path: {path}]" if path else ""),
                        f"scrape:{result.outcome.value}",
                    )
                elif not result.families:
                    found.add(f"{where}: 200 but no metric families", "scrape:no-families")
                elif result.peer_spiffe_id != w.spiffe_id:
                    found.add(
                        f"{where}: peer identity {result.peer_spiffe_id}, expected {w.spiffe_id}",
                        "scrape:peer-identity",
                    )


def envoy_port_stats_only(check: Check, backend: Backend, dep: Deployment) -> None:
    with check.findings() as found:
        for w in dep.workloads:
            port = w.spec.secure_envoy_port
            if port is None:
                continue
            result = backend.scrape(w, port, "/metrics")
            if result.status != 404:
                got = (
                    f"answered HTTP {result.status}"
                    if result.status is not None
                    else f"gave no HTTP answer ({result.outcome.value}: {result.detail})"
                )
                found.add(
                    f"{w.name}: /metrics on the secure Envoy-only port {port} {got}; expected "
                    f"HTTP 404 (only {STATS_PATH} is routed)",
                    f"stats-only:{result.outcome.value}",
                )


def plaintext_refused(check: Check, backend: Backend, dep: Deployment) -> None:
    with check.findings() as found:
        for w in dep.workloads:
            for role, port in _secure_ports(w):
                for origin in (Origin.OTHER_POD, Origin.INSIDE_POD):
                    result = backend.plaintext(w, port, origin)
                    if not result.protected:
                        found.add(
                            f"{w.name}: plain HTTP from {origin.value} to the {role} port "
                            f"{port} was served ({result.outcome.value}: {result.detail})",
                            f"plaintext-{origin.value}:{result.outcome.value}",
                        )


def credential_refused(
    credential: Credential, check: Check, backend: Backend, dep: Deployment
) -> None:
    with check.findings() as found:
        for w in dep.workloads:
            for role, port in _secure_ports(w):
                result = backend.scrape(w, port, STATS_PATH, credential=credential)
                if result.outcome in (MtlsOutcome.OK, MtlsOutcome.HTTP_ERROR):
                    found.add(
                        f"{w.name}: the {role} port {port} completed a TLS handshake with "
                        f"{_CREDENTIAL_TEXT[credential]} and answered HTTP {result.status}",
                        f"handshake:{result.outcome.value}",
                    )


#: how failure messages name a credential and a plain-HTTP outcome (not by enum value)
_CREDENTIAL_TEXT = {
    Credential.SCRAPER: "the scraper's client certificate",
    Credential.NONE: "no client certificate",
    Credential.FOREIGN_CA: "a client certificate from a foreign CA",
}
_PLAINTEXT_TEXT = {
    PlaintextOutcome.REFUSED: "refused (connection refused)",
    PlaintextOutcome.CLOSED: "closed without an answer",
    PlaintextOutcome.REJECTED_BY_PROXY: "rejected by the proxy (503)",
    PlaintextOutcome.FORBIDDEN: "forbidden (HTTP 403)",
    PlaintextOutcome.NOT_FOUND: "answered 404",
    PlaintextOutcome.OTHER_HTTP: "answered without metrics",
    PlaintextOutcome.SERVED: "served (metrics returned)",
    PlaintextOutcome.TIMEOUT: "timed out",
}


def hardened_port(
    port: int,
    outside: PlaintextOutcome,
    inside: PlaintextOutcome,
    check: Check,
    backend: Backend,
    dep: Deployment,
) -> None:
    wanted = (
        (Origin.OTHER_POD, "from another pod", outside),
        (Origin.INSIDE_POD, "from inside the pod", inside),
    )
    with check.findings() as found:
        for w in dep.workloads:
            for origin, where, want in wanted:
                got = backend.plaintext(w, port, origin)
                if got.outcome is not want:
                    found.add(
                        f"{w.name}: plain HTTP to port {port} {where} "
                        f"{_PLAINTEXT_TEXT[got.outcome]} ({got.detail}); it must be "
                        f"{_PLAINTEXT_TEXT[want]}",
                        f"{origin.value}:{got.outcome.value}",
                    )


def _target_problem(
    api: PrometheusAPI, job: str, w: Workload, want: str, timeout: float
) -> tuple[str, str]:
    """Why ``job`` does not scrape ``want`` UP for workload ``w``, and the observed outcome
    (``target:timeout|dropped|down|wrong-url``); ("", "") when it does."""
    seen: list[Target] = []

    def judged() -> Target:
        mine = w.targets_in(api.active_targets(job))
        seen[:] = mine
        if not mine:
            if w.dropped_in(api.dropped_targets(job)):
                # discovered and dropped by the job's relabeling: final, no waiting
                return Target(job, "", "dropped", "", None)
            raise NotYet(f"pod {w.pod_name} not discovered by job {job} yet")
        match = [t for t in mine if t.scrape_url == want]
        if not match:
            return mine[0]
        why = up_problem(match[:1])
        if why is None or (match[0].health == "down" and _failed_every_scrape(api, job, w)):
            return match[0]
        raise NotYet(why)

    try:
        target = wait_for(f"job {job} to scrape {want} successfully", judged, timeout=timeout)
    except WaitTimeout as exc:
        return "target:timeout", f"{w.name}: {exc}"
    if target.health == "dropped":
        return "target:dropped", (
            f"{w.name}: job {job} found ZERO targets for pod {w.pod_name}: the pod was "
            f"dropped by relabeling (is the pod annotation that names its secure port "
            f"missing? cf. istio#19874)"
        )
    if target.health == "down":
        return "target:down", f"{w.name}: job {job}: {target.describe()}"
    if target.scrape_url != want:
        urls = ", ".join(f"{t.scrape_url} ({t.health})" for t in seen)
        return "target:wrong-url", f"{w.name}: job {job} scrapes {urls}, expected {want}"
    return "", ""


def _failed_every_scrape(api: PrometheusAPI, job: str, w: Workload) -> bool:
    """Prometheus' own record: at least DOWN_SCRAPES scrapes of ``w``, none of them UP.

    A single failed scrape may be a warm-up; several in a row, and never a success, is a
    verdict that needs no waiting for the timeout.
    """
    series = f"{w.up_series(job)}[5m]"
    counts = api.query(f"count_over_time({series})")
    best = api.query(f"max_over_time({series})")
    if not counts or not best:
        return False
    return int(float(counts[0]["value"][1])) >= DOWN_SCRAPES and float(best[0]["value"][1]) == 0


def targets_up(job: str, check: Check, backend: Backend, dep: Deployment) -> None:
    api = backend.prometheus_for(dep)
    with check.findings() as found:
        for w in dep.workloads:
            port = w.spec.jobs.get(job)
            if port is None:
                continue
            observed, problem = _target_problem(
                api, job, w, w.url(port, STATS_PATH), backend.timeouts.target_up
            )
            if problem:
                found.add(problem, observed)


#: the job prefixes the Prometheus Operator gives ServiceMonitor and PodMonitor scrape pools
SERVICE_MONITOR_JOB = "serviceMonitor/"
POD_MONITOR_JOB = "podMonitor/"


def _port_of(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[-1]


def servicemonitor_targets_up(check: Check, backend: Backend, dep: Deployment) -> None:
    """Every ServiceMonitor / PodMonitor of the scenario has targets, all UP over https.

    Observed outcomes name the port of each target not UP (``down:<port>``), so a known gap
    about one port (the application's, or the secure merged one) is told from another.
    """
    api = backend.prometheus_for(dep)
    prefixes = tuple(f"{p}{dep.namespace}/" for p in (SERVICE_MONITOR_JOB, POD_MONITOR_JOB))
    seen: list[Target] = []

    def all_scraped() -> list[Target]:
        mine = [t for t in api.active_targets() if t.job.startswith(prefixes)]
        seen[:] = mine
        if not mine:
            raise NotYet(f"no scrape pool {' or '.join(p + '*' for p in prefixes)} yet")
        why = up_problem(mine)
        if why is not None:
            raise NotYet(why)
        return mine

    try:
        targets = wait_for(
            f"the ServiceMonitors of {dep.namespace} to scrape UP",
            all_scraped,
            timeout=backend.timeouts.target_up,
        )
    except WaitTimeout as exc:
        down = {f"down:{_port_of(t.scrape_url)}" for t in seen if t.health != "up"}
        raise check.fail(str(exc), down or {"target:timeout"}) from None
    plain = [t.scrape_url for t in targets if not t.scrape_url.startswith("https://")]
    if plain:
        raise check.fail(
            f"ServiceMonitor targets scraped without TLS: {', '.join(plain)}", {"target:plaintext"}
        )


def uses_operator(s: Scenario) -> bool:
    return Feature.PROMETHEUS_OPERATOR in s.features


@runtime_checkable
class AwaitsRenewals(Protocol):
    """A backend that cannot issue mesh certificates and rotates by waiting for the agents'
    own renewals (a cluster): it runs the whole rotation window itself."""

    def run_rotation(self, workload: Workload) -> RotationRun: ...


def rotation_continuity(check: Check, backend: Backend, dep: Deployment) -> object:
    """Rotation, by whichever of the two rotation Protocols the backend implements: it
    issues certificates (:class:`~securemetrics_e2e.continuity.RotatingBackend`, local) or
    waits for renewals (:class:`AwaitsRenewals`, cluster)."""
    workload = dep.workloads[0]
    run: RotationRun
    if isinstance(backend, AwaitsRenewals):
        run = backend.run_rotation(workload)
    elif isinstance(backend, RotatingBackend):
        run = run_rotation(backend, workload)
    else:
        raise check.fail(f"backend {backend.name} cannot drive certificate rotation")
    if not run.ok:
        raise check.fail(f"{run.failure_message()} ({run.continuity.verdict_line()})")
    return run.continuity


def is_hardened(s: Scenario) -> bool:
    return any(w.mode is MetricsMode.HARDENED for w in s.workloads)


def has_envoy_port(s: Scenario) -> bool:
    return any(w.secure_envoy_port is not None for w in s.workloads)


def injector_annotated(spec: WorkloadSpec) -> bool:
    """Workloads whose secure-port annotation is the injector's to set: native sidecars.
    Gateways and the legacy workaround set it by hand (ISTIO-FACTS.md)."""
    return spec.kind is WorkloadKind.SIDECAR and spec.mode in (
        MetricsMode.NATIVE,
        MetricsMode.HARDENED,
    )


def injector_secure_port(check: Check, backend: Backend, dep: Deployment) -> None:
    """The injector sets ``prometheus.istio.io/secure-port`` from the istio-proxy env
    ``ENVOY_SECURE_MERGED_METRICS_PORT`` unless already set (pkg/kube/inject/webhook.go
    applySecurePrometheusAnnotation); Istio's own test wants the merged port there
    (tests/integration/telemetry/api/metrics_port_test.go, auto-annotation-secure-port)."""
    with check.findings() as found:
        for w in dep.workloads:
            if not injector_annotated(w.spec):
                continue
            seen = backend.pod_annotations(w).get(SECURE_PORT)
            want = str(w.spec.secure_merged_port)
            if seen != want:
                shown = "absent" if seen is None else repr(seen)
                found.add(
                    f"{w.name}: pod {w.pod_name} has {SECURE_PORT} {shown}, expected {want!r} "
                    "set by the sidecar injector from ENVOY_SECURE_MERGED_METRICS_PORT"
                )
