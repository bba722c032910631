"""The conformance checks: one behaviour each, with a stable id and finding code.

A check runs against a deployed scenario through the backend seam only, so the same
check proves the same thing on the local backend and on a cluster. It raises
:class:`CheckFailed` with a message that says what was expected and what was seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import partial

from securemetrics_e2e.backend import Backend, Credential, Deployment, Origin, Workload
from securemetrics_e2e.catalog import (
    AGENT_PORT,
    ENVOY_JOB,
    ENVOY_STATS_PORT,
    MERGED_JOB,
    Feature,
    MetricsMode,
    Scenario,
    WorkloadKind,
    WorkloadSpec,
)
from securemetrics_e2e.configdump import listener_on_port
from securemetrics_e2e.probe import MtlsOutcome, PlaintextOutcome
from securemetrics_e2e.prometheus import PrometheusAPI, Target
from securemetrics_e2e.results import CheckOutcome, Status
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

STATS_PATH = "/stats/prometheus"
#: a target DOWN in this many scrapes, and never UP, fails without waiting for the timeout
DOWN_SCRAPES = 3


class CheckFailed(AssertionError):
    """A conformance check saw the mesh misbehave.

    ``observed`` names what was seen, machine-readable, one ``clause:outcome`` token per
    kind of problem (e.g. ``scrape:closed``, ``target:down``, ``listener:missing``): the
    known-gap table (:mod:`securemetrics_e2e.knowngaps`) compares them with what a gap
    predicts, so a failure that looks different is not taken for the gap.
    """

    def __init__(
        self, check_id: str, code: str, message: str, observed: Collection[str] = ()
    ) -> None:
        super().__init__(f"[{code} {check_id}] {message}")
        self.check_id = check_id
        self.code = code
        self.message = message
        self.observed = tuple(sorted(set(observed)))


@dataclass(frozen=True)
class Check:
    id: str
    code: str
    title: str
    body: Callable[[Check, Backend, Deployment], object]
    applies: Callable[[Scenario], bool] = lambda s: True
    needs: frozenset[Feature] = frozenset()
    #: a continuity check runs on continuity scenarios only, and snapshot checks never do
    continuity: bool = False
    #: what usually causes a failure and what to change, appended to every failure message
    hint: str = ""

    def applies_to(self, scenario: Scenario) -> bool:
        return self.continuity == scenario.continuity and self.applies(scenario)

    def fail(self, message: str, observed: Collection[str] = ()) -> CheckFailed:
        """The failure, its message ending in this check's hint (what to change)."""
        text = f"{message} — hint: {self.hint}" if self.hint else message
        return CheckFailed(self.id, self.code, text, observed)

    def run(self, backend: Backend, deployment: Deployment) -> object:
        """Raise :class:`CheckFailed` if ``deployment`` misbehaves; else return what was
        measured (continuity checks), or None."""
        return self.body(self, backend, deployment)


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


def _listeners_tls_only(check: Check, backend: Backend, dep: Deployment) -> None:
    problems, seen = [], set()
    for w in dep.workloads:
        listeners = backend.listeners(w)
        for role, port in _secure_ports(w):
            lst = listener_on_port(listeners, port)
            if lst is None:
                problems.append(f"{w.name}: no listener on the {role} port {port}")
                seen.add("listener:missing")
                continue
            if not lst.tls_only:
                problems.append(f"{w.name}: listener {lst.name} accepts non-TLS connections")
                seen.add("listener:not-tls-only")
            if not lst.client_cert_required:
                problems.append(
                    f"{w.name}: listener {lst.name} does not require a client certificate"
                )
                seen.add("listener:no-client-cert")
            expected = _expected_prefixes(w, role)
            if tuple(sorted(lst.route_prefixes)) != tuple(sorted(expected)):
                problems.append(
                    f"{w.name}: {role} port {port} routes {list(lst.route_prefixes)}, "
                    f"expected {list(expected)}"
                )
                seen.add("listener:routes")
    if problems:
        raise check.fail("; ".join(problems), seen)


def _mtls_scrape(check: Check, backend: Backend, dep: Deployment) -> None:
    problems, seen = [], set()
    for w in dep.workloads:
        for role, port in _secure_ports(w):
            result = backend.scrape(w, port, STATS_PATH)
            if result.outcome is not MtlsOutcome.OK:
                path = backend.inbound_path(w, port)
                problems.append(
                    f"{w.name} {role} port {port}: {result.outcome.value}: {result.detail}"
                    + (f" [inbound path: {path}]" if path else "")
                )
                seen.add(f"scrape:{result.outcome.value}")
            elif not result.families:
                problems.append(f"{w.name} {role} port {port}: 200 but no metric families")
                seen.add("scrape:no-families")
            elif result.peer_spiffe_id != w.spiffe_id:
                problems.append(
                    f"{w.name} {role} port {port}: peer identity {result.peer_spiffe_id}, "
                    f"expected {w.spiffe_id}"
                )
                seen.add("scrape:peer-identity")
    if problems:
        raise check.fail("; ".join(problems), seen)


def _envoy_port_stats_only(check: Check, backend: Backend, dep: Deployment) -> None:
    problems, seen = [], set()
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
            problems.append(
                f"{w.name}: /metrics on the secure Envoy-only port {port} {got}; expected "
                f"HTTP 404 (only {STATS_PATH} is routed)"
            )
            seen.add(f"stats-only:{result.outcome.value}")
    if problems:
        raise check.fail("; ".join(problems), seen)


def _plaintext_refused(check: Check, backend: Backend, dep: Deployment) -> None:
    problems, seen = [], set()
    for w in dep.workloads:
        for role, port in _secure_ports(w):
            for origin in (Origin.OTHER_POD, Origin.INSIDE_POD):
                result = backend.plaintext(w, port, origin)
                if not result.protected:
                    problems.append(
                        f"{w.name}: plain HTTP from {origin.value} to the {role} port {port} "
                        f"was served ({result.outcome.value}: {result.detail})"
                    )
                    seen.add(f"plaintext-{origin.value}:{result.outcome.value}")
    if problems:
        raise check.fail("; ".join(problems), seen)


def _credential_refused(
    credential: Credential, check: Check, backend: Backend, dep: Deployment
) -> None:
    problems, seen = [], set()
    for w in dep.workloads:
        for role, port in _secure_ports(w):
            result = backend.scrape(w, port, STATS_PATH, credential=credential)
            if result.outcome in (MtlsOutcome.OK, MtlsOutcome.HTTP_ERROR):
                problems.append(
                    f"{w.name}: the {role} port {port} completed a TLS handshake with "
                    f"{_CREDENTIAL_TEXT[credential]} and answered HTTP {result.status}"
                )
                seen.add(f"handshake:{result.outcome.value}")
    if problems:
        raise check.fail("; ".join(problems), seen)


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


def _hardened_port(
    port: int,
    outside: PlaintextOutcome,
    inside: PlaintextOutcome,
    check: Check,
    backend: Backend,
    dep: Deployment,
) -> None:
    problems, seen = [], set()
    for w in dep.workloads:
        seen_out = backend.plaintext(w, port, Origin.OTHER_POD)
        if seen_out.outcome is not outside:
            problems.append(
                f"{w.name}: plain HTTP to port {port} from another pod "
                f"{_PLAINTEXT_TEXT[seen_out.outcome]} ({seen_out.detail}); it must be "
                f"{_PLAINTEXT_TEXT[outside]}"
            )
            seen.add(f"{Origin.OTHER_POD.value}:{seen_out.outcome.value}")
        seen_in = backend.plaintext(w, port, Origin.INSIDE_POD)
        if seen_in.outcome is not inside:
            problems.append(
                f"{w.name}: plain HTTP to port {port} from inside the pod "
                f"{_PLAINTEXT_TEXT[seen_in.outcome]} ({seen_in.detail}); it must be "
                f"{_PLAINTEXT_TEXT[inside]}"
            )
            seen.add(f"{Origin.INSIDE_POD.value}:{seen_in.outcome.value}")
    if problems:
        raise check.fail("; ".join(problems), seen)


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
        if match[0].health == "down" and _failed_every_scrape(api, job, w):
            return match[0]
        if match[0].health != "up":
            raise NotYet(match[0].describe())
        return match[0]

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


def _targets_up(job: str, check: Check, backend: Backend, dep: Deployment) -> None:
    api = backend.prometheus_for(dep)
    problems, seen = [], set()
    for w in dep.workloads:
        port = w.spec.jobs.get(job)
        if port is None:
            continue
        observed, problem = _target_problem(
            api, job, w, w.url(port, STATS_PATH), backend.target_timeout
        )
        if problem:
            problems.append(problem)
            seen.add(observed)
    if problems:
        raise check.fail("; ".join(problems), seen)


#: the job prefixes the Prometheus Operator gives ServiceMonitor and PodMonitor scrape pools
SERVICE_MONITOR_JOB = "serviceMonitor/"
POD_MONITOR_JOB = "podMonitor/"


def _port_of(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[-1]


def _servicemonitor_targets_up(check: Check, backend: Backend, dep: Deployment) -> None:
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
        if any(t.health == "unknown" for t in mine):
            raise NotYet("not scraped yet: " + ", ".join(t.scrape_url for t in mine))
        if any(t.health != "up" for t in mine):
            raise NotYet("; ".join(t.describe() for t in mine if t.health != "up"))
        return mine

    try:
        targets = wait_for(
            f"the ServiceMonitors of {dep.namespace} to scrape UP",
            all_scraped,
            timeout=backend.target_timeout,
        )
    except WaitTimeout as exc:
        down = {f"down:{_port_of(t.scrape_url)}" for t in seen if t.health != "up"}
        raise check.fail(str(exc), down or {"target:timeout"}) from None
    plain = [t.scrape_url for t in targets if not t.scrape_url.startswith("https://")]
    if plain:
        raise check.fail(
            f"ServiceMonitor targets scraped without TLS: {', '.join(plain)}", {"target:plaintext"}
        )


def _uses_operator(s: Scenario) -> bool:
    return Feature.PROMETHEUS_OPERATOR in s.features


def _rotation_continuity(check: Check, backend: Backend, dep: Deployment) -> object:
    from securemetrics_e2e.continuity import RotatingBackend, RotationRun, run_rotation

    workload = dep.workloads[0]
    run: RotationRun
    cluster_rotation = getattr(backend, "run_rotation", None)
    if callable(cluster_rotation):
        # a cluster cannot issue mesh certificates: it waits for the agents' renewals
        run = cluster_rotation(workload)
    elif isinstance(backend, RotatingBackend):
        run = run_rotation(backend, workload)
    else:
        raise check.fail(f"backend {backend.name} cannot drive certificate rotation")
    if not run.ok:
        raise check.fail(f"{run.failure_message()} ({run.continuity.verdict_line()})")
    return run.continuity


def _upgrade_continuity(check: Check, backend: Backend, dep: Deployment) -> object:
    from securemetrics_e2e.upgrade_window import UpgradingBackend, run_upgrade_window

    if not isinstance(backend, UpgradingBackend):
        raise check.fail(f"backend {backend.name} cannot upgrade a deployment")
    run = run_upgrade_window(backend, dep, partial(verify, backend))
    if not run.ok:
        verdict = f" ({run.continuity.verdict_line()})" if run.continuity is not None else ""
        raise check.fail(run.failure_message() + verdict)
    return run.continuity


def _is_hardened(s: Scenario) -> bool:
    return any(w.mode is MetricsMode.HARDENED for w in s.workloads)


def _has_envoy_port(s: Scenario) -> bool:
    return any(w.secure_envoy_port is not None for w in s.workloads)


LISTENERS = Check(
    "listeners-tls-only",
    "SMC001",
    "Secure listeners are TLS-only, require a client certificate and route as Istio does",
    _listeners_tls_only,
    hint="the secure ports come from proxyMetadata ENVOY_SECURE_METRICS_PORT / "
    "ENVOY_SECURE_MERGED_METRICS_PORT (Istio >= 1.31, pilot-agent options.go) or, before "
    "1.31, a Sidecar ingress / Gateway server on 15091 with tls mode ISTIO_MUTUAL; another "
    "mode, or an EnvoyFilter on that listener, drops the TLS-only chain",
)
MTLS_SCRAPE = Check(
    "mtls-scrape",
    "SMC002",
    "An mTLS scrape with the scraper's certificate returns valid metrics from the expected "
    "SPIFFE identity",
    _mtls_scrape,
    hint="Prometheus must present the OUTPUT_CERTS files its own istio-proxy writes "
    "(proxy.istio.io/config outputCerts, the shared istio-certs volume), issued by the same "
    "mesh CA; files written after Prometheus started are never read (istio#10544)",
)
ENVOY_STATS_ONLY = Check(
    "envoy-port-stats-only",
    "SMC003",
    "The secure Envoy-only port serves /stats/prometheus only (/metrics is 404)",
    _envoy_port_stats_only,
    applies=_has_envoy_port,
    hint="the Envoy-only secure port routes /stats/prometheus only; a route or EnvoyFilter "
    "that forwards other paths to the agent exposes the merged metrics on it",
)
PLAINTEXT = Check(
    "plaintext-refused",
    "SMC004",
    "Plain HTTP to the secure ports is refused, from another pod and from inside the pod",
    _plaintext_refused,
    hint="a secure port that serves plain HTTP has no TLS transport socket: check no Sidecar "
    "ingress, Gateway server or EnvoyFilter declares the same port without ISTIO_MUTUAL",
)
NO_CERT = Check(
    "no-client-cert-refused",
    "SMC005",
    "A client without a certificate is refused",
    partial(_credential_refused, Credential.NONE),
    hint="the listener must require a client certificate (require_client_certificate, which "
    "ISTIO_MUTUAL sets); tls mode SIMPLE or a server without a client CA lets anyone in",
)
FOREIGN = Check(
    "foreign-ca-refused",
    "SMC006",
    "A client certificate from a foreign CA is refused",
    partial(_credential_refused, Credential.FOREIGN_CA),
    hint="the proxy trusts another CA: check the mesh's trust bundle (meshConfig "
    "caCertificates, the istio-ca-root-cert ConfigMap, plugged-in cacerts) holds only your "
    "mesh roots",
)
HARDENED_STATS = Check(
    "hardened-envoy-stats-localhost",
    "SMC007",
    "With localhost-only metrics, 15090 is refused from another pod and served inside it",
    partial(_hardened_port, ENVOY_STATS_PORT, PlaintextOutcome.REFUSED, PlaintextOutcome.SERVED),
    applies=_is_hardened,
    needs=frozenset({Feature.POD_ISOLATION}),
    hint='set proxyMetadata METRICS_LOCALHOST_ACCESS_ONLY: "true" on the workload (Istio >= '
    "1.23, istio PR #50728): Envoy then binds 15090 to localhost only",
)
HARDENED_AGENT = Check(
    "hardened-agent-forbidden",
    "SMC008",
    "With localhost-only metrics, 15020 answers 403 to another pod and serves inside it",
    partial(_hardened_port, AGENT_PORT, PlaintextOutcome.FORBIDDEN, PlaintextOutcome.SERVED),
    applies=_is_hardened,
    needs=frozenset({Feature.POD_ISOLATION}),
    hint='set proxyMetadata METRICS_LOCALHOST_ACCESS_ONLY: "true" on the workload (Istio >= '
    "1.23, istio PR #50728): the agent then answers 403 to other pods on 15020",
)
MERGED_UP = Check(
    "targets-up-merged",
    "SMC009",
    f"Prometheus job {MERGED_JOB} scrapes every workload UP at https://<podIP>:<port>{STATS_PATH}",
    partial(_targets_up, MERGED_JOB),
    applies=lambda s: not _uses_operator(s),
    hint="the pod needs the prometheus.istio.io/secure-port annotation the job keeps, and the "
    "job scheme https with the OUTPUT_CERTS client certificate; `securemetrics-e2e "
    "scrape-config` prints a working job (zero targets: istio#19874)",
)
ENVOY_UP = Check(
    "targets-up-envoy",
    "SMC010",
    f"Prometheus job {ENVOY_JOB} scrapes every workload UP at https://<podIP>:<port>{STATS_PATH}",
    partial(_targets_up, ENVOY_JOB),
    applies=lambda s: _has_envoy_port(s) and not _uses_operator(s),
    hint="the pod needs the prometheus.istio.io/secure-envoy-port annotation the job keeps, "
    "and the job scheme https with the OUTPUT_CERTS client certificate; `securemetrics-e2e "
    "scrape-config` prints a working job (zero targets: istio#19874)",
)
SERVICE_MONITOR_UP = Check(
    "servicemonitor-targets-up",
    "SMC012",
    "The Prometheus Operator scrapes every ServiceMonitor and PodMonitor target UP over https",
    _servicemonitor_targets_up,
    applies=_uses_operator,
    hint="the ServiceMonitor endpoint needs scheme https and a tlsConfig reading the "
    "OUTPUT_CERTS files mounted into the Operator's Prometheus (spec.volumes / volumeMounts "
    "of the Prometheus resource, with its istio-proxy writing them)",
)

ROTATION_CONTINUITY = Check(
    "rotation-continuity",
    "SMC011",
    "Rotated workload and scraper certificates are served at once, and Prometheus loses no "
    "scrape (100% up, no gap longer than two intervals)",
    _rotation_continuity,
    applies=lambda s: s.name == "rotation",
    needs=frozenset({Feature.CERT_ROTATION}),
    continuity=True,
    hint="Prometheus must read the OUTPUT_CERTS files istio-agent renews (mounted, not copied "
    "once into a Secret: istio#28050); a proxy that keeps an old certificate is not reading "
    "SDS updates",
)
UPGRADE_CONTINUITY = Check(
    "upgrade-continuity",
    "SMC013",
    "Across an Istio minor upgrade the workload is scraped over mTLS before and after, "
    "switched to the native ports where the new version has them, and its namespace is "
    "never without a successful scrape (whole window covered, no gap longer than two "
    "intervals)",
    _upgrade_continuity,
    applies=lambda s: s.name == "upgrade",
    needs=frozenset({Feature.MESH_UPGRADE}),
    continuity=True,
    hint="restarted pods must keep the secure-port annotations and proxyMetadata of the old "
    "ones (dropped targets: istio#19874), and the scrape jobs must accept both the legacy "
    "and the native ports while the rollout runs",
)

SECURE_PORT_ANNOTATION = "prometheus.istio.io/secure-port"


def _injector_annotated(spec: WorkloadSpec) -> bool:
    """Workloads whose secure-port annotation is the injector's to set: native sidecars.
    Gateways and the legacy workaround set it by hand (ISTIO-FACTS.md)."""
    return spec.kind is WorkloadKind.SIDECAR and spec.mode in (
        MetricsMode.NATIVE,
        MetricsMode.HARDENED,
    )


def _injector_secure_port(check: Check, backend: Backend, dep: Deployment) -> None:
    """The injector sets ``prometheus.istio.io/secure-port`` from the istio-proxy env
    ``ENVOY_SECURE_MERGED_METRICS_PORT`` unless already set (pkg/kube/inject/webhook.go
    applySecurePrometheusAnnotation); Istio's own test wants the merged port there
    (tests/integration/telemetry/api/metrics_port_test.go, auto-annotation-secure-port)."""
    problems = []
    for w in dep.workloads:
        if not _injector_annotated(w.spec):
            continue
        seen = backend.pod_annotations(w).get(SECURE_PORT_ANNOTATION)
        want = str(w.spec.secure_merged_port)
        if seen != want:
            shown = "absent" if seen is None else repr(seen)
            problems.append(
                f"{w.name}: pod {w.pod_name} has {SECURE_PORT_ANNOTATION} {shown}, expected "
                f"{want!r} set by the sidecar injector from ENVOY_SECURE_MERGED_METRICS_PORT"
            )
    if problems:
        raise check.fail("; ".join(problems))


INJECTOR_ANNOTATION = Check(
    "injector-secure-port-annotation",
    "SMC014",
    "The sidecar injector annotates native sidecars with prometheus.istio.io/secure-port "
    "set to the merged port",
    _injector_secure_port,
    applies=lambda s: any(_injector_annotated(w) for w in s.workloads),
    needs=frozenset({Feature.NATIVE_SECURE_PORTS}),
    hint="the injector sets the annotation from the istio-proxy env "
    "ENVOY_SECURE_MERGED_METRICS_PORT only when the pod has none (pkg/kube/inject/webhook.go "
    "applySecurePrometheusAnnotation): remove a hand-set secure-port annotation naming "
    "another port",
)


CHECKS: tuple[Check, ...] = (
    LISTENERS,
    MTLS_SCRAPE,
    ENVOY_STATS_ONLY,
    PLAINTEXT,
    NO_CERT,
    FOREIGN,
    HARDENED_STATS,
    HARDENED_AGENT,
    MERGED_UP,
    ENVOY_UP,
    SERVICE_MONITOR_UP,
    ROTATION_CONTINUITY,
    UPGRADE_CONTINUITY,
    INJECTOR_ANNOTATION,
)


def verify(backend: Backend, dep: Deployment, check_ids: tuple[str, ...]) -> tuple[str, ...]:
    """The problems ``check_ids`` find on ``dep`` ("[code id] message" each; none: ())."""
    problems = []
    for check_id in check_ids:
        try:
            check(check_id).run(backend, dep)
        except CheckFailed as exc:
            problems.append(f"[{exc.code} {check_id}] {exc.message}")
    return tuple(problems)


def check(check_id: str) -> Check:
    for c in CHECKS:
        if c.id == check_id:
            return c
    raise KeyError(check_id)


def skip_reason(c: Check, backend: Backend) -> str | None:
    missing = sorted(f.value for f in c.needs - backend.features)
    if missing:
        return f"backend {backend.name} lacks {', '.join(missing)}"
    return None


def run_checks(
    backend: Backend, dep: Deployment, version: str = "", only: Collection[str] = ()
) -> list[CheckOutcome]:
    """Every check that applies to ``dep``'s scenario (``only``: those of these ids), as
    outcomes mapped through the known-gap table at Istio ``version`` (default: the
    backend's), for controls and the CLI."""
    from securemetrics_e2e.knowngaps import checked

    version = version or backend.describe().get("istio_version", "")
    outcomes = []
    for c in CHECKS:
        if not c.applies_to(dep.scenario) or (only and c.id not in only):
            continue
        start = time.monotonic()
        reason = skip_reason(c, backend)
        observed: tuple[str, ...] = ()
        if reason is not None:
            status, message = Status.SKIP, reason
        else:
            try:
                c.run(backend, dep)
                status, message = Status.PASS, ""
            except CheckFailed as exc:
                status, message, observed = Status.FAIL, exc.message, exc.observed
        outcomes.append(
            checked(
                dep.unit,
                c,
                version,
                status,
                message,
                observed,
                duration_s=time.monotonic() - start,
            )
        )
    return outcomes
