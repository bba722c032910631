"""Where a cluster run puts things and what each run unit deploys, touching nothing.

The kind cluster's identity, the namespaces, the Istio version a run plans for, why a
unit is skipped, and each variant's manifests, patches, rollouts and workload locators:
the facts both the ordered plan (:mod:`.plan`, :mod:`.steps`, :mod:`.upgrade`) and the
running backend (:mod:`.backend`) build from, so the plan is what a run does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from securemetrics_e2e.catalog import (
    AS_DOCUMENTED,
    UPGRADE,
    MtlsMode,
    RunUnit,
    Scenario,
    UnitKey,
    Variant,
    WorkloadKind,
)
from securemetrics_e2e.cluster import istio, pins
from securemetrics_e2e.cluster.features import CLUSTER_FEATURES
from securemetrics_e2e.cluster.kube import Obj
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.resources import Rollout, namespace_manifest, with_run_label
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.manifests import (
    GENERATED_GATEWAY_SUFFIX,
    ROTATION_SCENARIO,
    Patch,
    scenario_manifests,
    scenario_patches,
    scraper_manifests,
    scraper_secret_ttl_patch,
)
from securemetrics_e2e.versions import (
    DEFAULT_VERSION,
    Capabilities,
    IstioVersion,
    KubernetesRange,
    capabilities,
    previous_minor,
    resolve,
)

ISTIO_NAMESPACE = "istio-system"
SCRAPER_DEPLOYMENT = "prometheus"
SCRAPER_SELECTOR = "app.kubernetes.io/name=prometheus"


def kind_kubeconfig(name: str) -> Path:
    # where pytest-kind-ng's KindCluster keeps it (relative to the working directory)
    return Path(".pytest-kind") / name / "kubeconfig"


def common_kubernetes(old: IstioVersion, new: IstioVersion) -> KubernetesRange:
    """The Kubernetes minors both versions support: the cluster must run one of them."""
    a, b = capabilities(old).kubernetes_range, capabilities(new).kubernetes_range

    def key(minor: str) -> tuple[int, ...]:
        return tuple(int(p) for p in minor.split("."))

    oldest, newest = max(a.oldest, b.oldest, key=key), min(a.newest, b.newest, key=key)
    if key(oldest) > key(newest):
        raise UsageError(
            f"Istio {old} (Kubernetes {a}) and {new} (Kubernetes {b}) share no Kubernetes minor"
        )
    return KubernetesRange(oldest, newest)


class KindIdentity(NamedTuple):
    """The kind cluster of a run: its name and node image."""

    name: str
    image: str

    @property
    def context(self) -> str:
        """The kubeconfig context kind writes for the cluster."""
        return f"kind-{self.name}"

    @property
    def kubeconfig(self) -> Path:
        return kind_kubeconfig(self.name)


def kind_identity(options: ClusterOptions) -> KindIdentity:
    """The kind cluster a run with ``options`` creates or reuses.

    One cluster per Istio minor, so ``--keep-cluster`` runs reuse it. An upgrade run has
    one per version pair, apart from plain runs' (a kept one ends on the newer Istio,
    which a plain run of the older must not find), with the node image of a Kubernetes
    minor both versions support.
    """
    pair = options.upgrade_versions()
    if pair is not None:
        old, new = pair
        name = f"sm-e2e-upgrade-{old.minor}-{new.minor}"
        kubernetes = common_kubernetes(old, new)
    else:
        version = planned_version(options)
        name = f"sm-e2e-{version.major}-{version.minor}"
        kubernetes = capabilities(version).kubernetes_range
    return KindIdentity(
        options.cluster_name or name, options.kind_image or pins.node_image(kubernetes)
    )


def planned_target(options: ClusterOptions, kind: KindIdentity) -> istio.KubeTarget:
    """How istioctl and kubectl will reach the cluster of a run with ``options``."""
    if options.mode == "kind":
        return istio.KubeTarget(kind.kubeconfig, kind.context)
    return istio.KubeTarget(options.kubeconfig, options.context)


def scenario_namespace(
    scenario: Scenario, mode: MtlsMode, run_id: str, variant: Variant = AS_DOCUMENTED
) -> str:
    """One namespace per run unit (its PeerAuthentication governs the whole namespace);
    the scenario's first variant keeps the plain ``sm-<scenario>-<mode>-<run>`` name."""
    suffix = "" if variant.id is scenario.variants[0].id else f"-{variant.id}"
    return f"sm-{scenario.name}-{mode.value.lower()}{suffix}-{run_id}"


def scraper_namespace(run_id: str) -> str:
    return f"sm-scraper-{run_id}"


def version_skip_reason(
    scenario: Scenario,
    caps: Capabilities,
    mode: MtlsMode = MtlsMode.PERMISSIVE,
    variant: Variant = AS_DOCUMENTED,
) -> str | None:
    """Why the Istio version (or a cluster) cannot run ``scenario`` in ``mode`` and ``variant``."""
    from securemetrics_e2e.applicability import VERSION_GATED, skip_reason

    return skip_reason(
        RunUnit(scenario, mode, variant),
        backend="cluster",
        backend_features=CLUSTER_FEATURES | VERSION_GATED,
        version=str(caps.version),
    )


def run_scope_reason(scenario: Scenario, options: ClusterOptions) -> str | None:
    """Why a run with ``options`` leaves ``scenario`` out although the cluster could run it.

    An upgrade run installs an older Istio and upgrades it: only the upgrade scenario is
    judged there. Any other run has no older Istio to start from, so it leaves out the
    upgrade scenario.
    """
    pair = options.upgrade_versions()
    if pair is not None:
        if scenario.name == UPGRADE.name:
            return None
        return (
            f"an upgrade run (--upgrade-from {pair[0]}) deploys only the upgrade scenario: "
            "run the others without --upgrade-from"
        )
    if scenario.name != UPGRADE.name:
        return None
    version = planned_version(options)
    try:
        older = previous_minor(version)
    except UsageError:
        return (
            f"the upgrade scenario needs an upgrade run from an older minor, and Istio "
            f"{version} is the oldest supported: add --upgrade-from with a newer --istio-version"
        )
    return (
        "the upgrade scenario needs an upgrade run: add --upgrade-from "
        f"<previous minor, e.g. {older}>"
    )


def skipped_variant(
    scenario: Scenario,
    mode: MtlsMode,
    run_id: str,
    reason: str,
    variant: Variant | None = None,
) -> VariantPlan:
    """A run unit that is not deployed, with why (nothing rendered for it)."""
    variant = variant or scenario.variants[0]
    namespace = scenario_namespace(scenario, mode, run_id, variant)
    return VariantPlan(scenario, mode, namespace, (), (), (), (), reason, variant=variant)


@dataclass(frozen=True)
class WorkloadLocator:
    """Where the pods of one catalog workload are found once deployed."""

    name: str
    namespace: str
    selector: str
    service_account: str


@dataclass(frozen=True)
class VariantPlan:
    """Everything the backend does to deploy one run unit (scenario, mTLS mode, variant)."""

    scenario: Scenario
    mtls_mode: MtlsMode
    namespace: str
    manifests: tuple[Obj, ...]  # the namespace first, all run-labelled
    patches: tuple[Patch, ...]
    rollouts: tuple[Rollout, ...]
    locators: tuple[WorkloadLocator, ...]
    skip: str | None = None
    #: it restarts what every variant shares (the scraper): nothing may run beside it
    solo: bool = False
    variant: Variant = AS_DOCUMENTED

    @property
    def unit(self) -> RunUnit:
        return RunUnit(self.scenario, self.mtls_mode, self.variant)

    @property
    def key(self) -> UnitKey:
        return self.unit.key

    @property
    def id(self) -> str:
        return self.unit.id

    @property
    def needs_gateway_api(self) -> bool:
        return any(
            o.get("apiVersion", "").startswith("gateway.networking.k8s.io/") for o in self.manifests
        )

    @property
    def needs_operator(self) -> bool:
        return any(
            o.get("apiVersion", "").startswith("monitoring.coreos.com/") for o in self.manifests
        )

    @property
    def exclusive(self) -> frozenset[str]:
        """Objects outside the namespace this variant changes (no two variants at once)."""
        return frozenset(f"{p.kind}/{p.namespace}/{p.name}" for p in self.patches)

    def conflicts(self, other: VariantPlan) -> str | None:
        """What keeps this variant and ``other`` from being deployed at the same time."""
        shared = self.exclusive & other.exclusive
        if shared:
            return ", ".join(sorted(shared))
        if self.solo or other.solo:
            return "the shared scraper Prometheus (restarted with short-lived certificates)"
        return None


def variant_plan(
    scenario: Scenario,
    mode: MtlsMode,
    version: IstioVersion,
    run_id: str,
    *,
    istio_namespace: str = ISTIO_NAMESPACE,
    revision: str | None = None,
    variant: Variant | None = None,
) -> VariantPlan:
    """The plan of one run unit (``variant`` None: the scenario's first, as documented)."""
    variant = variant or scenario.variants[0]
    caps = capabilities(version)
    namespace = scenario_namespace(scenario, mode, run_id, variant)
    skip = version_skip_reason(scenario, caps, mode, variant)
    if skip is not None:
        return VariantPlan(scenario, mode, namespace, (), (), (), (), skip, variant=variant)
    # the objects the run owns and the patches to objects it does not, from one placement
    placed = {
        "namespace": namespace,
        "scraper_namespace": scraper_namespace(run_id),
        "gateway_namespace": istio_namespace,
    }
    rendered = scenario_manifests(scenario, mode, version, variant=variant, **placed)
    patches = scenario_patches(scenario, mode, version, variant=variant, **placed)
    solo = scenario.name == ROTATION_SCENARIO
    if solo:
        # the scraper's OUTPUT_CERTS files must be renewed during the window too
        patches.append(
            scraper_secret_ttl_patch(namespace=scraper_namespace(run_id), version=version)
        )
    manifests = [namespace_manifest(namespace, run_id, revision=revision)]
    manifests += [with_run_label(obj, run_id) for obj in rendered]
    rollouts: list[Rollout] = []
    for obj in manifests:
        kind, meta = obj.get("kind"), obj.get("metadata") or {}
        ns = str(meta.get("namespace", namespace))
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            rollouts.append(Rollout(str(kind), str(meta["name"]), ns))
        elif kind == "Gateway" and obj["apiVersion"].startswith("gateway.networking.k8s.io/"):
            rollouts.append(Rollout("Deployment", f"{meta['name']}{GENERATED_GATEWAY_SUFFIX}", ns))
        elif kind == "Prometheus":
            # the operator names the StatefulSet it generates prometheus-<name>
            rollouts.append(Rollout("StatefulSet", f"prometheus-{meta['name']}", ns))
    rollouts += [Rollout(p.kind, p.name, p.namespace) for p in patches]
    return VariantPlan(
        scenario,
        mode,
        namespace,
        tuple(manifests),
        tuple(patches),
        tuple(rollouts),
        tuple(_locators(scenario, manifests, namespace, istio_namespace)),
        solo=solo,
        variant=variant,
    )


def _locators(
    scenario: Scenario, manifests: Sequence[Obj], namespace: str, istio_namespace: str
) -> Iterable[WorkloadLocator]:
    for spec in scenario.workloads:
        if spec.kind is WorkloadKind.SIDECAR:
            dep = next(
                (
                    o
                    for o in manifests
                    if o.get("kind") == "Deployment" and o["metadata"]["name"] == spec.name
                ),
                None,
            )
            labels = ((dep or {}).get("spec") or {}).get("selector", {}).get("matchLabels") or {
                "app": spec.name
            }
            selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            yield WorkloadLocator(spec.name, namespace, selector, spec.service_account)
        elif spec.name.endswith(GENERATED_GATEWAY_SUFFIX) and scenario.name == "gateway-api":
            gateway = spec.name.removesuffix(GENERATED_GATEWAY_SUFFIX)
            yield WorkloadLocator(
                spec.name,
                namespace,
                f"gateway.networking.k8s.io/gateway-name={gateway}",
                spec.service_account,
            )
        else:
            yield WorkloadLocator(
                spec.name, istio_namespace, istio.INGRESS_SELECTOR, spec.service_account
            )


@dataclass(frozen=True)
class ScraperPlan:
    namespace: str
    manifests: tuple[Obj, ...]
    service: str
    port: int


def scraper_plan(version: IstioVersion, run_id: str, *, revision: str | None = None) -> ScraperPlan:
    namespace = scraper_namespace(run_id)
    rendered = scraper_manifests(namespace=namespace, version=version)
    manifests = [namespace_manifest(namespace, run_id, revision=revision)]
    manifests += [with_run_label(obj, run_id) for obj in rendered]
    service = next(o for o in rendered if o.get("kind") == "Service")
    port = int(service["spec"]["ports"][0]["port"])
    return ScraperPlan(namespace, tuple(manifests), str(service["metadata"]["name"]), port)


def planned_version(options: ClusterOptions) -> IstioVersion:
    return resolve(options.istio_version) if options.istio_version else DEFAULT_VERSION
