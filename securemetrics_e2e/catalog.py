"""The conformance scenarios: what each deploys, which profile it belongs to, where it applies.

Modelled on the Gateway API conformance suite: a scenario declares the features it
needs; a backend or Istio version that lacks one makes the scenario SKIP with that
reason, recorded in the report, never silently.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from securemetrics_e2e.errors import UsageError


class Profile(enum.StrEnum):
    CORE = "core"
    EXTENDED = "extended"


class MtlsMode(enum.StrEnum):
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


class Feature(enum.StrEnum):
    """What a scenario needs from the Istio version or the backend."""

    NATIVE_SECURE_PORTS = "native-secure-ports"  # Istio >= 1.31
    LOCALHOST_ONLY_METRICS = "localhost-only-metrics"  # Istio >= 1.23
    POD_ISOLATION = "pod-isolation"  # a real "outside the pod" (netns or cluster)
    INBOUND_CAPTURE = "inbound-capture"  # the sidecar intercepts inbound traffic (cluster)
    ISTIO_CONTROL_PLANE = "istio-control-plane"  # istiod, injection, CRDs (cluster)
    PROMETHEUS_OPERATOR = "prometheus-operator"  # cluster
    CERT_ROTATION = "cert-rotation"  # the backend can drive certificate rotation on demand
    # the backend can move deployed workloads onto a newer Istio's proxies (a restart)
    MESH_UPGRADE = "mesh-upgrade"


#: features only a real cluster has (istiod, iptables capture, the operator)
CLUSTER_ONLY = frozenset(
    {Feature.INBOUND_CAPTURE, Feature.ISTIO_CONTROL_PLANE, Feature.PROMETHEUS_OPERATOR}
)


class WorkloadKind(enum.StrEnum):
    SIDECAR = "sidecar"
    GATEWAY = "gateway"


class MetricsMode(enum.StrEnum):
    """How a workload exposes its metrics securely."""

    NATIVE = "native"  # ENVOY_SECURE_METRICS_PORT / ENVOY_SECURE_MERGED_METRICS_PORT
    HARDENED = "hardened"  # native + METRICS_LOCALHOST_ACCESS_ONLY
    LEGACY = "legacy"  # < 1.31: Sidecar ingress or ISTIO_MUTUAL Gateway on 15091


SECURE_ENVOY_PORT = 15091
SECURE_MERGED_PORT = 15092
ENVOY_STATS_PORT = 15090
AGENT_PORT = 15020
ADMIN_PORT = 15000
APP_PORT = 8080

MERGED_JOB = "istio-secure-merged-metrics"
ENVOY_JOB = "istio-secure-envoy-metrics"


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload a scenario deploys, before a backend gives it an address."""

    name: str
    kind: WorkloadKind
    mode: MetricsMode
    service_account: str

    @property
    def secure_envoy_port(self) -> int | None:
        """The port serving Envoy-only stats over mTLS, if this mode opens one."""
        return None if self.mode is MetricsMode.LEGACY else SECURE_ENVOY_PORT

    @property
    def secure_merged_port(self) -> int:
        """The port serving merged metrics over mTLS (legacy: 15091 to the agent)."""
        return SECURE_ENVOY_PORT if self.mode is MetricsMode.LEGACY else SECURE_MERGED_PORT

    @property
    def jobs(self) -> dict[str, int]:
        """Scrape job -> the port that job must find for this workload."""
        jobs = {MERGED_JOB: self.secure_merged_port}
        if self.secure_envoy_port is not None:
            jobs[ENVOY_JOB] = self.secure_envoy_port
        return jobs


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    profile: Profile
    features: frozenset[Feature]
    workloads: tuple[WorkloadSpec, ...]
    mtls_modes: tuple[MtlsMode, ...] = (MtlsMode.PERMISSIVE,)
    notes: tuple[str, ...] = field(default=())
    #: a continuity scenario: checked over a window of time, by its own checks only
    continuity: bool = False


HTTPBIN = "httpbin"
GATEWAY = "istio-ingressgateway"

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="native-sidecar",
        description="Native secure ports 15091/15092 on a sidecar workload (httpbin).",
        profile=Profile.CORE,
        features=frozenset({Feature.NATIVE_SECURE_PORTS}),
        workloads=(WorkloadSpec(HTTPBIN, WorkloadKind.SIDECAR, MetricsMode.NATIVE, "httpbin"),),
        mtls_modes=(MtlsMode.PERMISSIVE, MtlsMode.STRICT),
    ),
    Scenario(
        name="native-gateway",
        description="Native secure ports 15091/15092 on the classic istio-ingressgateway.",
        profile=Profile.CORE,
        features=frozenset({Feature.NATIVE_SECURE_PORTS}),
        workloads=(
            WorkloadSpec(
                GATEWAY,
                WorkloadKind.GATEWAY,
                MetricsMode.NATIVE,
                "istio-ingressgateway-service-account",
            ),
        ),
    ),
    Scenario(
        name="gateway-api",
        description="Native secure ports on a Gateway API gateway deployed by Istio.",
        profile=Profile.EXTENDED,
        features=frozenset({Feature.NATIVE_SECURE_PORTS}),
        workloads=(
            WorkloadSpec(
                "secure-gw-istio", WorkloadKind.GATEWAY, MetricsMode.NATIVE, "secure-gw-istio"
            ),
        ),
        notes=(
            "Whether spec.infrastructure annotations or a ProxyConfig open the ports on a "
            "generated gateway is Istio-side wiring: only the cluster backend checks it.",
        ),
    ),
    Scenario(
        name="hardened",
        description="Native secure ports plus METRICS_LOCALHOST_ACCESS_ONLY: 15090 and 15020 "
        "closed to other pods.",
        profile=Profile.CORE,
        features=frozenset(
            {Feature.NATIVE_SECURE_PORTS, Feature.LOCALHOST_ONLY_METRICS, Feature.POD_ISOLATION}
        ),
        workloads=(WorkloadSpec(HTTPBIN, WorkloadKind.SIDECAR, MetricsMode.HARDENED, "httpbin"),),
        mtls_modes=(MtlsMode.PERMISSIVE, MtlsMode.STRICT),
    ),
    Scenario(
        name="legacy-sidecar",
        description="Pre-1.31 workaround: a Sidecar ingress on 15091 to 127.0.0.1:15020.",
        profile=Profile.CORE,
        features=frozenset(),
        workloads=(WorkloadSpec(HTTPBIN, WorkloadKind.SIDECAR, MetricsMode.LEGACY, "httpbin"),),
        mtls_modes=(MtlsMode.PERMISSIVE, MtlsMode.STRICT),
    ),
    Scenario(
        name="legacy-gateway",
        description="Pre-1.31 workaround: ISTIO_MUTUAL Gateway on 15091 + ServiceEntry + "
        "VirtualService to the agent.",
        profile=Profile.CORE,
        features=frozenset(),
        workloads=(
            WorkloadSpec(
                GATEWAY,
                WorkloadKind.GATEWAY,
                MetricsMode.LEGACY,
                "istio-ingressgateway-service-account",
            ),
        ),
    ),
    Scenario(
        name="servicemonitor",
        description="Prometheus Operator scraping through a ServiceMonitor with https + tlsConfig.",
        profile=Profile.EXTENDED,
        # its workload runs the native ports (the checks judge 15091/15092), so < 1.31 skips
        features=frozenset(
            {
                Feature.PROMETHEUS_OPERATOR,
                Feature.ISTIO_CONTROL_PLANE,
                Feature.NATIVE_SECURE_PORTS,
            }
        ),
        workloads=(WorkloadSpec(HTTPBIN, WorkloadKind.SIDECAR, MetricsMode.NATIVE, "httpbin"),),
        mtls_modes=(MtlsMode.PERMISSIVE, MtlsMode.STRICT),
    ),
)

ROTATION = Scenario(
    name="rotation",
    description="Workload and scraper certificates rotated several times while Prometheus "
    "scrapes: every rotation is served, no scrape is lost.",
    profile=Profile.EXTENDED,
    features=frozenset({Feature.NATIVE_SECURE_PORTS, Feature.CERT_ROTATION}),
    workloads=(WorkloadSpec(HTTPBIN, WorkloadKind.SIDECAR, MetricsMode.NATIVE, "httpbin"),),
    continuity=True,
)
UPGRADE = Scenario(
    name="upgrade",
    description="Istio upgraded one minor while Prometheus scrapes: the workload, restarted "
    "onto the new proxies and switched to the native ports where they exist, is scraped "
    "over mTLS before and after, and the namespace is never without a successful scrape.",
    profile=Profile.EXTENDED,
    features=frozenset({Feature.MESH_UPGRADE}),
    # deployed with the legacy configuration of the older minor; see upgraded_spec
    workloads=(WorkloadSpec(HTTPBIN, WorkloadKind.SIDECAR, MetricsMode.LEGACY, "httpbin"),),
    continuity=True,
    notes=(
        "On a cluster this is an upgrade run (--upgrade-from): istioctl installs the older "
        "minor, upgrades in place or by canary revision, and the workload is restarted. "
        "The local backend rebuilds the data-plane half: the workload's pod is replaced by "
        "one with the new configuration while the same Prometheus scrapes.",
    ),
)
SCENARIOS = (*SCENARIOS, ROTATION, UPGRADE)

_BY_NAME = {s.name: s for s in SCENARIOS}


def scenario(name: str) -> Scenario:
    """The scenario called ``name``; a clear error listing the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(_BY_NAME)
        raise UsageError(f"unknown scenario {name!r}; known scenarios: {known}") from None


def upgraded_spec(spec: WorkloadSpec, native_secure_ports: bool) -> WorkloadSpec:
    """What ``spec`` becomes after the upgrade: the legacy workaround gives way to the
    native secure ports when the new version has them (ISTIO-FACTS: >= 1.31)."""
    if spec.mode is MetricsMode.LEGACY and native_secure_ports:
        return WorkloadSpec(spec.name, spec.kind, MetricsMode.NATIVE, spec.service_account)
    return spec


def mode_features(mode: MtlsMode) -> frozenset[Feature]:
    """STRICT only differs from PERMISSIVE where the sidecar captures inbound traffic."""
    return frozenset({Feature.INBOUND_CAPTURE}) if mode is MtlsMode.STRICT else frozenset()
