"""The seam between scenarios and the places they run.

Scenario code talks to a :class:`Backend` through operations named for what they do
(deploy, list a workload's listeners, scrape over mTLS from the scraper pod, try
plaintext from a chosen place, read a Prometheus job's targets), never for how. The
local backend answers them from network namespaces, Envoy and Prometheus processes on
this machine; the cluster backend from a Kubernetes cluster running Istio.
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securemetrics_e2e.catalog import (
    Feature,
    MtlsMode,
    RunUnit,
    Scenario,
    UnitKey,
    Variant,
    WorkloadKind,
    WorkloadSpec,
)
from securemetrics_e2e.errors import SecureMetricsError
from securemetrics_e2e.timeouts import Timeouts

if TYPE_CHECKING:
    from securemetrics_e2e.pki import SpiffeId
    from securemetrics_e2e.probe import PlaintextResult, ScrapeResult
    from securemetrics_e2e.prometheus import PrometheusAPI, Target


class Origin(enum.StrEnum):
    """Where a plaintext attempt comes from."""

    INSIDE_POD = "inside-pod"  # the target pod's own loopback / pod IP, as istio-proxy would
    OTHER_POD = "other-pod"  # another pod on the pod network (the scraper's)


class Credential(enum.StrEnum):
    """Which client certificate an mTLS scrape presents."""

    SCRAPER = "scraper"  # the scraper's workload certificate (OUTPUT_CERTS files)
    NONE = "none"  # no client certificate at all
    FOREIGN_CA = "foreign-ca"  # a well-formed SPIFFE certificate from a CA the mesh does not trust


@dataclass(frozen=True)
class Workload:
    """A deployed workload: a pod with an address and an expected identity."""

    spec: WorkloadSpec
    namespace: str
    pod_name: str
    pod_ip: str
    spiffe_id: SpiffeId

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> WorkloadKind:
        return self.spec.kind

    def targets_in(self, targets: Iterable[Target]) -> list[Target]:
        """Those of ``targets`` that scrape this workload's pod (by the job's pod labels)."""
        return [
            t
            for t in targets
            if t.labels.get("pod") == self.pod_name and t.labels.get("namespace") == self.namespace
        ]

    def dropped_in(self, dropped: Iterable[Mapping[str, Any]]) -> bool:
        """Whether service discovery found this pod and the job's relabeling dropped it
        (``dropped``: the discovered labels of a job's dropped targets): final, it will
        never be scraped."""
        return any(d.get("__meta_kubernetes_pod_name") == self.pod_name for d in dropped)

    def up_series(self, job: str) -> str:
        """The PromQL selector of ``job``'s ``up`` samples of this pod."""
        return f'up{{job="{job}",namespace="{self.namespace}",pod="{self.pod_name}"}}'

    def url(self, port: int, path: str, scheme: str = "https") -> str:
        host = f"[{self.pod_ip}]" if ":" in self.pod_ip else self.pod_ip
        return f"{scheme}://{host}:{port}{path}"


@dataclass(frozen=True)
class Listener:
    """A listener as the proxy's config_dump describes it."""

    name: str
    address: str
    port: int
    tls_only: bool  # every filter chain only accepts TLS (matches or terminates it)
    client_cert_required: bool  # every TLS context sets require_client_certificate
    route_prefixes: tuple[str, ...]  # HTTP route prefixes across its filter chains
    upstream_clusters: tuple[str, ...] = ()


@dataclass(frozen=True)
class Deployment:
    """A run unit deployed by a backend, ready to be checked."""

    scenario: Scenario
    mtls_mode: MtlsMode
    namespace: str
    workloads: tuple[Workload, ...]
    #: default: the scenario's first variant (what an unqualified deploy means)
    variant: Variant = None  # type: ignore[assignment]  # filled in by __post_init__

    def __post_init__(self) -> None:
        if self.variant is None:
            object.__setattr__(self, "variant", self.scenario.variants[0])

    @property
    def unit(self) -> RunUnit:
        return RunUnit(self.scenario, self.mtls_mode, self.variant)

    def workload(self, name: str) -> Workload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(f"no workload {name!r} in scenario {self.scenario.name}")


class Backend(abc.ABC):
    """Where scenarios run. Subclasses implement every operation; scenarios never branch."""

    #: a short name for reports ("local", "kind", "existing")
    name: str = "abstract"
    #: the named waits (securemetrics_e2e.timeouts), at this backend's scale
    timeouts: Timeouts = Timeouts()
    #: continuity windows may run in the background from deployment on, beside the other
    #: units' checks (:mod:`securemetrics_e2e.windows`); False: each in its check's turn
    windows_beside_checks: bool = False

    @property
    @abc.abstractmethod
    def features(self) -> frozenset[Feature]:
        """The features this backend can exercise (others make scenarios skip)."""

    @abc.abstractmethod
    def describe(self) -> dict[str, str]:
        """Facts for the report: backend, Istio version, Kubernetes version, network mode."""

    @abc.abstractmethod
    def deploy(
        self, scenario: Scenario, mtls_mode: MtlsMode, variant: Variant | None = None
    ) -> Deployment:
        """Deploy ``scenario`` in ``variant`` (None: the scenario's first, the one an
        unqualified run means) and wait until its proxies and the scraper are ready."""

    @abc.abstractmethod
    def teardown(self, deployment: Deployment) -> None:
        """Remove everything :meth:`deploy` created. Safe to call twice."""

    @abc.abstractmethod
    def listeners(self, workload: Workload) -> list[Listener]:
        """The listeners of ``workload``'s proxy, read from its admin config_dump."""

    @abc.abstractmethod
    def scrape(
        self,
        workload: Workload,
        port: int,
        path: str = "/stats/prometheus",
        credential: Credential = Credential.SCRAPER,
    ) -> ScrapeResult:
        """GET ``path`` on ``workload``'s ``port`` over mTLS, from the scraper pod."""

    @abc.abstractmethod
    def plaintext(
        self, workload: Workload, port: int, origin: Origin, path: str = "/stats/prometheus"
    ) -> PlaintextResult:
        """Try plain HTTP to ``workload``'s ``port`` from ``origin`` and classify the result."""

    def inbound_path(self, workload: Workload, port: int) -> str:
        """Which of the sidecar's inbound chains connections to ``port`` took, from its
        proxy's access log ("" where the backend cannot tell)."""
        return ""

    @abc.abstractmethod
    def pod_annotations(self, workload: Workload) -> dict[str, str]:
        """The annotations of ``workload``'s running pod, as admitted (after injection)."""

    @abc.abstractmethod
    def prometheus(self) -> PrometheusAPI:
        """A client for the scraper's Prometheus HTTP API."""

    def deploy_many(
        self, units: Sequence[RunUnit]
    ) -> dict[UnitKey, Deployment | SecureMetricsError]:
        """Deploy several run units; a unit missing from the result (by
        :attr:`RunUnit.key`) is deferred.

        A backend may leave out a unit that would change what another one holds
        (on a cluster, two scenarios patching the same ingress gateway); deploy it
        again once the other is torn down. This default deploys one after the other.
        """
        results: dict[UnitKey, Deployment | SecureMetricsError] = {}
        for unit in units:
            try:
                results[unit.key] = self.deploy(unit.scenario, unit.mtls_mode, unit.variant)
            except SecureMetricsError as exc:
                results[unit.key] = exc
        return results

    def capture_diagnostics(self, deployment: Deployment | None, reason: str) -> Path | None:
        """Save what explains a failure (proxy config, logs, targets) before teardown."""
        return None

    def prometheus_for(self, deployment: Deployment) -> PrometheusAPI:
        """The Prometheus that scrapes ``deployment``: the suite's scraper, unless the
        scenario brings its own (the Prometheus Operator's, for servicemonitor)."""
        return self.prometheus()

    def scope_reason(self, scenario: Scenario) -> str | None:
        """Why this run of the backend leaves ``scenario`` out although it has its
        features (e.g. a cluster upgrade run deploys only the upgrade scenario), or None."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing global
        """Release what the backend holds across deployments."""

    @contextlib.contextmanager
    def deployed(
        self, scenario: Scenario, mtls_mode: MtlsMode, variant: Variant | None = None
    ) -> Iterator[Deployment]:
        """Deploy, yield, and always tear down, even when the body fails."""
        deployment = self.deploy(scenario, mtls_mode, variant)
        try:
            yield deployment
        finally:
            self.teardown(deployment)
