"""The conformance check registry: one entry per check, the only list of them.

Each entry is a :class:`~securemetrics_e2e.checkbase.Check`: a stable id, a finding code
(SMC...), a title, its body (:mod:`securemetrics_e2e.checkbodies`), which scenarios it
applies to, the backend features it needs, and a hint. Everything else is generated from
this table: the pytest items of ``scenarios/test_conformance.py``, the CLI's ``--check`` /
``--skip-check`` selection, ``plan`` and ``list``, and the report's titles. Adding a
check is one entry here, its body, and its negative control (CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from functools import partial

from securemetrics_e2e.backend import Backend, Credential, Deployment
from securemetrics_e2e.catalog import (
    AGENT_PORT,
    ENVOY_JOB,
    ENVOY_STATS_PORT,
    MERGED_JOB,
    Feature,
)
from securemetrics_e2e.checkbase import Check, CheckFailed
from securemetrics_e2e.checkbodies import (
    STATS_PATH,
    credential_refused,
    envoy_port_stats_only,
    hardened_port,
    has_envoy_port,
    injector_annotated,
    injector_secure_port,
    is_hardened,
    listeners_tls_only,
    mtls_scrape,
    plaintext_refused,
    rotation_continuity,
    servicemonitor_targets_up,
    targets_up,
    uses_operator,
)
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.probe import PlaintextOutcome

__all__ = ["CHECKS", "Check", "CheckFailed", "CheckSelection", "check", "named", "verify"]


def _upgrade_continuity(check: Check, backend: Backend, dep: Deployment) -> object:
    from securemetrics_e2e.upgrade_window import UpgradingBackend, run_upgrade_window

    if not isinstance(backend, UpgradingBackend):
        raise check.fail(f"backend {backend.name} cannot upgrade a deployment")
    run = run_upgrade_window(backend, dep, partial(verify, backend))
    if not run.ok:
        verdict = f" ({run.continuity.verdict_line()})" if run.continuity is not None else ""
        raise check.fail(run.failure_message() + verdict)
    return run.continuity


LISTENERS = Check(
    "listeners-tls-only",
    "SMC001",
    "Secure listeners are TLS-only, require a client certificate and route as Istio does",
    listeners_tls_only,
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
    mtls_scrape,
    hint="Prometheus must present the OUTPUT_CERTS files its own istio-proxy writes "
    "(proxy.istio.io/config outputCerts, the shared istio-certs volume), issued by the same "
    "mesh CA; files written after Prometheus started are never read (istio#10544)",
)
ENVOY_STATS_ONLY = Check(
    "envoy-port-stats-only",
    "SMC003",
    "The secure Envoy-only port serves /stats/prometheus only (/metrics is 404)",
    envoy_port_stats_only,
    applies=has_envoy_port,
    hint="the Envoy-only secure port routes /stats/prometheus only; a route or EnvoyFilter "
    "that forwards other paths to the agent exposes the merged metrics on it",
)
PLAINTEXT = Check(
    "plaintext-refused",
    "SMC004",
    "Plain HTTP to the secure ports is refused, from another pod and from inside the pod",
    plaintext_refused,
    hint="a secure port that serves plain HTTP has no TLS transport socket: check no Sidecar "
    "ingress, Gateway server or EnvoyFilter declares the same port without ISTIO_MUTUAL",
)
NO_CERT = Check(
    "no-client-cert-refused",
    "SMC005",
    "A client without a certificate is refused",
    partial(credential_refused, Credential.NONE),
    hint="the listener must require a client certificate (require_client_certificate, which "
    "ISTIO_MUTUAL sets); tls mode SIMPLE or a server without a client CA lets anyone in",
)
FOREIGN = Check(
    "foreign-ca-refused",
    "SMC006",
    "A client certificate from a foreign CA is refused",
    partial(credential_refused, Credential.FOREIGN_CA),
    hint="the proxy trusts another CA: check the mesh's trust bundle (meshConfig "
    "caCertificates, the istio-ca-root-cert ConfigMap, plugged-in cacerts) holds only your "
    "mesh roots",
)
HARDENED_STATS = Check(
    "hardened-envoy-stats-localhost",
    "SMC007",
    "With localhost-only metrics, 15090 is refused from another pod and served inside it",
    partial(hardened_port, ENVOY_STATS_PORT, PlaintextOutcome.REFUSED, PlaintextOutcome.SERVED),
    applies=is_hardened,
    needs=frozenset({Feature.POD_ISOLATION}),
    hint='set proxyMetadata METRICS_LOCALHOST_ACCESS_ONLY: "true" on the workload (Istio >= '
    "1.23, istio PR #50728): Envoy then binds 15090 to localhost only",
)
HARDENED_AGENT = Check(
    "hardened-agent-forbidden",
    "SMC008",
    "With localhost-only metrics, 15020 answers 403 to another pod and serves inside it",
    partial(hardened_port, AGENT_PORT, PlaintextOutcome.FORBIDDEN, PlaintextOutcome.SERVED),
    applies=is_hardened,
    needs=frozenset({Feature.POD_ISOLATION}),
    hint='set proxyMetadata METRICS_LOCALHOST_ACCESS_ONLY: "true" on the workload (Istio >= '
    "1.23, istio PR #50728): the agent then answers 403 to other pods on 15020",
)
MERGED_UP = Check(
    "targets-up-merged",
    "SMC009",
    f"Prometheus job {MERGED_JOB} scrapes every workload UP at https://<podIP>:<port>{STATS_PATH}",
    partial(targets_up, MERGED_JOB),
    applies=lambda s: not uses_operator(s),
    hint="the pod needs the prometheus.istio.io/secure-port annotation the job keeps, and the "
    "job scheme https with the OUTPUT_CERTS client certificate; `securemetrics-e2e "
    "scrape-config` prints a working job (zero targets: istio#19874)",
)
ENVOY_UP = Check(
    "targets-up-envoy",
    "SMC010",
    f"Prometheus job {ENVOY_JOB} scrapes every workload UP at https://<podIP>:<port>{STATS_PATH}",
    partial(targets_up, ENVOY_JOB),
    applies=lambda s: has_envoy_port(s) and not uses_operator(s),
    hint="the pod needs the prometheus.istio.io/secure-envoy-port annotation the job keeps, "
    "and the job scheme https with the OUTPUT_CERTS client certificate; `securemetrics-e2e "
    "scrape-config` prints a working job (zero targets: istio#19874)",
)
SERVICE_MONITOR_UP = Check(
    "servicemonitor-targets-up",
    "SMC012",
    "The Prometheus Operator scrapes every ServiceMonitor and PodMonitor target UP over https",
    servicemonitor_targets_up,
    applies=uses_operator,
    hint="the ServiceMonitor endpoint needs scheme https and a tlsConfig reading the "
    "OUTPUT_CERTS files mounted into the Operator's Prometheus (spec.volumes / volumeMounts "
    "of the Prometheus resource, with its istio-proxy writing them)",
)

ROTATION_CONTINUITY = Check(
    "rotation-continuity",
    "SMC011",
    "Rotated workload and scraper certificates are served at once, and Prometheus loses no "
    "scrape (100% up, no gap longer than two intervals)",
    rotation_continuity,
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


INJECTOR_ANNOTATION = Check(
    "injector-secure-port-annotation",
    "SMC014",
    "The sidecar injector annotates native sidecars with prometheus.istio.io/secure-port "
    "set to the merged port",
    injector_secure_port,
    applies=lambda s: any(injector_annotated(w) for w in s.workloads),
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


_BY_ID = {c.id: c for c in CHECKS}
_BY_CODE = {c.code: c for c in CHECKS}


def check(check_id: str) -> Check:
    """The registered check ``check_id``; KeyError for an id this suite does not define."""
    return _BY_ID[check_id]


def named(name: str, option: str) -> Check:
    """The check a command line names, by id or SMC code; UsageError naming ``option``."""
    found = _BY_ID.get(name) or _BY_CODE.get(name.upper())
    if found is None:
        known = ", ".join(f"{c.id} ({c.code})" for c in CHECKS)
        raise UsageError(f"{option} {name!r}: no such check; known checks: {known}")
    return found


class CheckSelection:
    """Which checks a run was asked to run (``--check``) and to leave out (``--skip-check``).

    A check left out is recorded as a SKIP with :meth:`reason`, never silently dropped, so a
    report says what it did not check and why.
    """

    def __init__(self, only: Iterable[str] = (), skip: Iterable[str] = ()) -> None:
        self.only = tuple(dict.fromkeys(_split(only, "--check")))
        self.skip = tuple(dict.fromkeys(_split(skip, "--skip-check")))

    def reason(self, chk: Check) -> str | None:
        """Why the selection leaves ``chk`` out, or None when it runs."""
        if chk.id in self.skip:
            return f"left out by --skip-check {chk.id}"
        if self.only and chk.id not in self.only:
            return f"not selected by --check {','.join(self.only)}"
        return None

    def as_args(self) -> list[str]:
        """The pytest options that carry this selection to the plugin."""
        args = [f"--check={c}" for c in self.only]
        return args + [f"--skip-check={c}" for c in self.skip]


def _split(values: Iterable[str], option: str) -> Iterable[str]:
    """Check ids from repeatable, comma-separated options (ids or SMC codes)."""
    for value in values:
        for name in value.split(","):
            if name.strip():
                yield named(name.strip(), option).id


def verify(backend: Backend, dep: Deployment, check_ids: Collection[str]) -> tuple[str, ...]:
    """The problems ``check_ids`` find on ``dep`` ("[code id] message" each; none: ())."""
    problems = []
    for check_id in check_ids:
        try:
            check(check_id).run(backend, dep)
        except CheckFailed as exc:
            problems.append(f"[{exc.code} {check_id}] {exc.message}")
    return tuple(problems)
