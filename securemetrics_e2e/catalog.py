"""The conformance scenarios: what each deploys, which profile it belongs to, where it applies.

Modelled on the Gateway API conformance suite: a scenario declares the features it
needs; a backend or Istio version that lacks one makes the scenario SKIP with that
reason, recorded in the report, never silently.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
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
    INBOUND_CAPTURE = "inbound-capture"  # the sidecar intercepts inbound traffic (iptables)
    ISTIO_CONTROL_PLANE = "istio-control-plane"  # istiod, injection, CRDs (cluster)
    PROMETHEUS_OPERATOR = "prometheus-operator"  # cluster
    CERT_ROTATION = "cert-rotation"  # the backend can drive certificate rotation on demand
    # the backend can move deployed workloads onto a newer Istio's proxies (a restart)
    MESH_UPGRADE = "mesh-upgrade"


#: features only a real cluster has (istiod, the operator); inbound capture also runs
#: locally where pod namespaces and iptables exist (local/capture.py)
CLUSTER_ONLY = frozenset({Feature.ISTIO_CONTROL_PLANE, Feature.PROMETHEUS_OPERATOR})


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


class VariantId(enum.StrEnum):
    """A configuration of a scenario: the documented one, or the fix of a known gap."""

    AS_DOCUMENTED = "as-documented"
    # pod annotation traffic.sidecar.istio.io/excludeInboundPorts: "15091,15092"
    EXCLUDE_CAPTURE = "exclude-capture"
    # workload PeerAuthentication portLevelMtls PERMISSIVE on 15091/15092
    PORT_PERMISSIVE = "port-permissive"
    # legacy sidecar: workload PeerAuthentication portLevelMtls {15091: STRICT}
    PORT_STRICT = "port-strict"
    # Gateway API: a ProxyConfig selecting the gateway-name label sets environmentVariables
    PROXYCONFIG = "proxyconfig"
    # servicemonitor: the application's Service port declared TCP
    TCP_APP_PORT = "tcp-app-port"
    # servicemonitor: a PodMonitor on the secure merged port (Istio's prometheus-operator.yaml)
    PODMONITOR = "podmonitor"


_VARIANT_DESCRIPTIONS: dict[VariantId, str] = {
    VariantId.AS_DOCUMENTED: "the configuration istio.io documents",
    VariantId.EXCLUDE_CAPTURE: "pod annotation traffic.sidecar.istio.io/excludeInboundPorts "
    '"15091,15092": the sidecar never captures the secure ports',
    VariantId.PORT_PERMISSIVE: "workload PeerAuthentication with portLevelMtls PERMISSIVE on "
    "15091 and 15092",
    VariantId.PORT_STRICT: "workload PeerAuthentication with portLevelMtls {15091: STRICT}",
    VariantId.PROXYCONFIG: "a ProxyConfig selecting gateway.networking.k8s.io/gateway-name "
    "sets environmentVariables",
    VariantId.TCP_APP_PORT: "the application's Service port declared TCP",
    VariantId.PODMONITOR: "a PodMonitor on the secure merged port, as Istio's "
    "samples/addons/extras/prometheus-operator.yaml scrapes the proxies",
}

#: variants whose outcome depends on the sidecar's inbound capture (iptables to 15006)
_CAPTURE_VARIANTS = frozenset(
    {VariantId.EXCLUDE_CAPTURE, VariantId.PORT_PERMISSIVE, VariantId.PORT_STRICT}
)


@dataclass(frozen=True)
class Variant:
    """One configuration of a scenario, and the mTLS modes it runs in."""

    id: VariantId
    #: None: every mode of the scenario
    mtls_modes: tuple[MtlsMode, ...] | None = None

    @property
    def description(self) -> str:
        return _VARIANT_DESCRIPTIONS[self.id]


AS_DOCUMENTED = Variant(VariantId.AS_DOCUMENTED)


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
    #: its configurations, the first the one an unqualified run means
    variants: tuple[Variant, ...] = (AS_DOCUMENTED,)

    def variant(self, variant_id: str) -> Variant:
        """The variant called ``variant_id``; a clear error listing this scenario's ones."""
        for v in self.variants:
            if v.id == variant_id:
                return v
        known = ", ".join(v.id for v in self.variants)
        raise UsageError(
            f"scenario {self.name!r} has no variant {variant_id!r}; its variants: {known}"
        )

    def run_units(self) -> tuple[RunUnit, ...]:
        """Every (mode, variant) this scenario runs in, mode by mode."""
        return tuple(
            RunUnit(self, mode, v)
            for mode in self.mtls_modes
            for v in self.variants
            if v.mtls_modes is None or mode in v.mtls_modes
        )


#: how backends key deployed run units: (scenario name, mode, variant id)
UnitKey = tuple[str, MtlsMode, VariantId]


@dataclass(frozen=True)
class RunUnit:
    """What the suite deploys and reports: a scenario in one mTLS mode and one variant."""

    scenario: Scenario
    mtls_mode: MtlsMode
    variant: Variant = AS_DOCUMENTED

    @property
    def id(self) -> str:
        return unit_id(self.scenario.name, self.mtls_mode.value, self.variant.id)

    @property
    def key(self) -> UnitKey:
        return (self.scenario.name, self.mtls_mode, self.variant.id)

    @property
    def features(self) -> frozenset[Feature]:
        """The scenario's features plus what this mode and variant need from the backend."""
        return self.scenario.features | (
            frozenset({Feature.INBOUND_CAPTURE}) if needs_inbound_capture(self) else frozenset()
        )


def unit_id(scenario_name: str, mtls_mode: str, variant_id: str) -> str:
    """The id progress lines, reports, JUnit and pytest use: ``scenario[MODE/variant]``."""
    return f"{scenario_name}[{mtls_mode}/{variant_id}]"


def needs_inbound_capture(unit: RunUnit) -> bool:
    """Whether ``unit``'s outcome depends on the sidecar's inbound capture.

    Capture (iptables REDIRECT to 15006, virtualInbound) is what the mTLS mode and the
    port-level PeerAuthentication act on (istio/istio
    pilot/pkg/networking/core/listener_inbound.go, filterchain_options.go); the injection
    template excludes only 15090, 15021 and 15020 from it
    (manifests/charts/istio-control/istio-discovery/files/injection-template.yaml). So on
    sidecars: every STRICT unit, every unit of a legacy Sidecar ingress (an inbound chain
    governed by the port's mode) and every variant that changes capture or a port's mode.
    A continuity scenario measures continuity across a change (rotation, upgrade); the
    local backend replays that change's data-plane half without capture.
    """
    sidecars = [w for w in unit.scenario.workloads if w.kind is WorkloadKind.SIDECAR]
    if not sidecars or unit.scenario.continuity:
        return False
    return (
        unit.mtls_mode is MtlsMode.STRICT
        or any(w.mode is MetricsMode.LEGACY for w in sidecars)
        or unit.variant.id in _CAPTURE_VARIANTS
    )


HTTPBIN = "httpbin"
GATEWAY = "istio-ingressgateway"

#: a sidecar scenario's variants where the gap strict-captures-secure-ports lies. Its fixes
#: run in STRICT only: in PERMISSIVE port-permissive renders the namespace's own mode
#: again and exclude-capture skips a passthrough chain that hands TLS on untouched, so
#: both would repeat the as-documented PERMISSIVE unit
_WITH_CAPTURE_FIXES = (
    AS_DOCUMENTED,
    Variant(VariantId.EXCLUDE_CAPTURE, (MtlsMode.STRICT,)),
    Variant(VariantId.PORT_PERMISSIVE, (MtlsMode.STRICT,)),
)
SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="native-sidecar",
        description="Native secure ports 15091/15092 on a sidecar workload (httpbin).",
        profile=Profile.CORE,
        features=frozenset({Feature.NATIVE_SECURE_PORTS}),
        workloads=(WorkloadSpec(HTTPBIN, WorkloadKind.SIDECAR, MetricsMode.NATIVE, "httpbin"),),
        mtls_modes=(MtlsMode.PERMISSIVE, MtlsMode.STRICT),
        variants=_WITH_CAPTURE_FIXES,
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
        variants=(AS_DOCUMENTED, Variant(VariantId.PROXYCONFIG)),
        notes=(
            "as-documented puts proxy.istio.io/config in spec.infrastructure.annotations; "
            "proxyconfig sets the variables through a ProxyConfig resource. The local "
            "backend derives the generated gateway's environment from those objects as "
            "Istio's deployment controller does (local/gatewaymodel.py).",
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
        variants=_WITH_CAPTURE_FIXES,
    ),
    Scenario(
        name="legacy-sidecar",
        description="Pre-1.31 workaround: a Sidecar ingress on 15091 to 127.0.0.1:15020.",
        profile=Profile.CORE,
        features=frozenset(),
        workloads=(WorkloadSpec(HTTPBIN, WorkloadKind.SIDECAR, MetricsMode.LEGACY, "httpbin"),),
        mtls_modes=(MtlsMode.PERMISSIVE, MtlsMode.STRICT),
        # STRICT as documented already terminates mesh mTLS on the Sidecar ingress port
        variants=(AS_DOCUMENTED, Variant(VariantId.PORT_STRICT, (MtlsMode.PERMISSIVE,))),
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
        variants=(AS_DOCUMENTED, Variant(VariantId.TCP_APP_PORT), Variant(VariantId.PODMONITOR)),
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
    # the legacy workaround works in PERMISSIVE only with STRICT on its port (known gap
    # legacy-sidecar-permissive-plaintext): the upgrade starts from the working one
    variants=(Variant(VariantId.PORT_STRICT),),
    notes=(
        "It starts from the legacy configuration that works: the Sidecar ingress on 15091 "
        "with portLevelMtls {15091: STRICT} (variant port-strict); as documented, without "
        "it, PERMISSIVE serves that port in plaintext (known gap "
        "legacy-sidecar-permissive-plaintext).",
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


def scenario_names(values: Iterable[str] | None) -> list[str]:
    """The scenario names repeatable, comma-separated ``--scenario`` values give, in order,
    once each (the one parser of a scenario list: the CLI, the plugin, the cluster plan)."""
    return list(dict.fromkeys(n.strip() for v in values or () for n in v.split(",") if n.strip()))


def chosen_scenarios(values: Iterable[str] | None) -> list[Scenario]:
    """The scenarios ``--scenario`` values name, in order; every scenario when none is."""
    names = scenario_names(values)
    return [scenario(n) for n in names] if names else list(SCENARIOS)


def upgraded_spec(spec: WorkloadSpec, native_secure_ports: bool) -> WorkloadSpec:
    """What ``spec`` becomes after the upgrade: the legacy workaround gives way to the
    native secure ports when the new version has them (ISTIO-FACTS: >= 1.31)."""
    if spec.mode is MetricsMode.LEGACY and native_secure_ports:
        return WorkloadSpec(spec.name, spec.kind, MetricsMode.NATIVE, spec.service_account)
    return spec
