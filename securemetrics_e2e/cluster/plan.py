"""The ordered plan of a cluster run: every command and every manifest, touching nothing.

The backend builds what it applies with the same functions (:func:`variant_plan`,
:func:`scraper_plan`, the command builders of :mod:`.istio`), so the plan is what a run
does, not a description of it. Steps whose execution depends on what the cluster
already holds (an installed Istio, Gateway API CRDs, a Prometheus Operator) say so.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from securemetrics_e2e.catalog import (
    AS_DOCUMENTED,
    SCENARIOS,
    UPGRADE,
    MtlsMode,
    RunUnit,
    Scenario,
    UnitKey,
    Variant,
    WorkloadKind,
)
from securemetrics_e2e.cluster import istio, pins
from securemetrics_e2e.cluster.kube import FIELD_MANAGER, RUN_LABEL, Obj
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.proxyconfig import env_waits
from securemetrics_e2e.cluster.resources import Workload, namespace_manifest, with_run_label
from securemetrics_e2e.cluster.tools import (
    ToolCache,
    ToolSpec,
    describe_resolution,
    istioctl_spec,
    kind_spec,
    kubectl_spec,
)
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
    from securemetrics_e2e.cluster.backend import CLUSTER_FEATURES

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
    rollouts: tuple[Workload, ...]
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
    rendered = scenario_manifests(
        scenario,
        mode,
        version,
        namespace=namespace,
        scraper_namespace=scraper_namespace(run_id),
        gateway_namespace=istio_namespace,
        variant=variant,
    )
    patches = scenario_patches(
        scenario,
        mode,
        version,
        namespace=namespace,
        scraper_namespace=scraper_namespace(run_id),
        gateway_namespace=istio_namespace,
        variant=variant,
    )
    solo = scenario.name == ROTATION_SCENARIO
    if solo:
        # the scraper's OUTPUT_CERTS files must be renewed during the window too
        patches.append(
            scraper_secret_ttl_patch(namespace=scraper_namespace(run_id), version=version)
        )
    manifests = [namespace_manifest(namespace, run_id, revision=revision)]
    manifests += [with_run_label(obj, run_id) for obj in rendered]
    rollouts: list[Workload] = []
    for obj in manifests:
        kind, meta = obj.get("kind"), obj.get("metadata") or {}
        ns = str(meta.get("namespace", namespace))
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            rollouts.append(Workload(str(kind), str(meta["name"]), ns))
        elif kind == "Gateway" and obj["apiVersion"].startswith("gateway.networking.k8s.io/"):
            rollouts.append(Workload("Deployment", f"{meta['name']}{GENERATED_GATEWAY_SUFFIX}", ns))
        elif kind == "Prometheus":
            # the operator names the StatefulSet it generates prometheus-<name>
            rollouts.append(Workload("StatefulSet", f"prometheus-{meta['name']}", ns))
    rollouts += [Workload(p.kind, p.name, p.namespace) for p in patches]
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


# -- the whole plan -------------------------------------------------------------------------


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (config files, proxy config) as literal blocks, as people write them."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def dump_yaml(objects: Iterable[Obj]) -> str:
    """YAML documents, keys in their given order, multi-line strings as blocks."""
    return yaml.dump_all(list(objects), Dumper=_BlockDumper, sort_keys=False, width=100)


@dataclass
class Step:
    phase: str
    title: str
    commands: list[list[str]] = field(default_factory=list)
    manifests: list[Obj] = field(default_factory=list)
    details: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """The ordered steps of one run, and the variants it skips with their reasons."""

    options: ClusterOptions
    version: IstioVersion
    steps: list[Step]
    variants: list[VariantPlan]
    teardown: list[Step]
    #: lines printed under the header (an upgrade run names both versions there)
    notes: list[str] = field(default_factory=list)
    #: what the run creates and where (:func:`creates_lines`; the backend prints the same)
    creates: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(v.id, v.skip) for v in self.variants if v.skip is not None]

    def commands(self) -> list[list[str]]:
        return [c for s in [*self.steps, *self.teardown] for c in s.commands]

    def manifests(self) -> list[Obj]:
        return [m for s in self.steps for m in s.manifests]

    def render_text(self) -> str:
        caps = capabilities(self.version)
        o = self.options
        lines = [
            f"securemetrics-e2e cluster plan, run {o.run_id}",
            f"Istio {self.version} (Kubernetes {caps.kubernetes_range}, Gateway API "
            f"{caps.gateway_api_version}); cluster: "
            + ("kind" if o.mode == "kind" else "existing (never created or deleted)"),
            f"every object the run creates carries the label {RUN_LABEL}={o.run_id}; "
            f"applies are server-side with field manager {FIELD_MANAGER}",
            *self.notes,
            "",
        ]
        if self.creates:
            lines += ["CREATES (teardown removes these and nothing else)"]
            lines += [f"  - {c}" for c in self.creates] + [""]
        number = 0
        for title, steps in (("STEPS", self.steps), ("TEARDOWN", self.teardown)):
            lines.append(title)
            for step in steps:
                number += 1
                lines.append(f"{number:3}. [{step.phase}] {step.title}")
                lines += [f"       {d}" for d in step.details]
                lines += [f"       $ {shlex.join(c)}" for c in step.commands]
                if step.manifests:
                    text = dump_yaml(step.manifests)
                    lines += ["       ---"] + [f"       {line}" for line in text.splitlines()]
            lines.append("")
        lines.append("SKIPPED")
        lines += [f"  - {vid}: {reason}" for vid, reason in self.skipped] or ["  (none)"]
        return "\n".join(lines) + "\n"


def _units(
    scenarios: Iterable[Scenario | tuple[Scenario, MtlsMode] | RunUnit] | None,
) -> list[RunUnit]:
    """Every run unit of the scenarios (of a (scenario, mode): every variant in that mode)."""
    units: list[RunUnit] = []
    for item in SCENARIOS if scenarios is None else scenarios:
        if isinstance(item, Scenario):
            units += item.run_units()
        elif isinstance(item, RunUnit):
            units.append(item)
        else:
            units += [u for u in item[0].run_units() if u.mtls_mode is item[1]]
    return units


def planned_version(options: ClusterOptions) -> IstioVersion:
    from securemetrics_e2e.versions import DEFAULT_VERSION

    return resolve(options.istio_version) if options.istio_version else DEFAULT_VERSION


@dataclass(frozen=True)
class Detected:
    """What the backend found installed before it planned (``--plan`` does not look)."""

    istio: istio.InstalledIstio | None


def render_plan(
    options: ClusterOptions,
    scenarios: Iterable[Scenario | tuple[Scenario, MtlsMode] | RunUnit] | None = None,
    *,
    cache: ToolCache | None = None,
    detected: Detected | None = None,
) -> Plan:
    """What a run with ``options`` would do for ``scenarios`` (default: all), in order.

    An upgrade run (``options.upgrade_from``) has a plan of its own
    (:func:`securemetrics_e2e.cluster.upgrade.upgrade_plan`); the other scenarios are
    listed there as skipped.
    """
    options = options.validated()
    if options.upgrade_from is not None:
        from securemetrics_e2e.cluster.upgrade import upgrade_plan

        return upgrade_plan(options, cache=cache, scenarios=_units(scenarios), detected=detected)
    version = planned_version(options)
    caps = capabilities(version)
    cache = cache or ToolCache(options.cache_dir)
    run_id = options.run_id
    kind = kind_identity(options)
    target = planned_target(options, kind)
    istioctl = str(options.istioctl_bin or "istioctl")
    variants = []
    for u in _units(scenarios):
        scope = run_scope_reason(u.scenario, options)
        variants.append(
            skipped_variant(u.scenario, u.mtls_mode, run_id, scope, u.variant)
            if scope is not None
            else variant_plan(
                u.scenario,
                u.mtls_mode,
                version,
                run_id,
                revision=options.revision,
                variant=u.variant,
            )
        )
    active = [v for v in variants if v.skip is None]
    steps: list[Step] = [
        tools_step(options, cache, [istioctl_spec(str(version))]),
        *cluster_steps(options, kind),
    ]
    installs = detected is None or detected.istio is None
    steps.append(istio_step(options, version, target, istioctl, detected))
    if any(v.needs_gateway_api for v in active):
        files = pins.gateway_api_files(caps.gateway_api_version)
        steps.append(
            Step(
                "crds",
                f"unless CRD {pins.GATEWAY_CRD} exists: apply the Gateway API "
                f"{caps.gateway_api_version} CRDs server-side, each file checked against its "
                "pinned sha256 and labelled with the run label",
                details=[f"{f.url} sha256 {f.sha256}" for f in files],
            )
        )
    if any(v.needs_operator for v in active):
        bundle = pins.PROMETHEUS_OPERATOR_BUNDLE
        steps.append(
            Step(
                "operator",
                f"unless a Prometheus Operator runs: apply Prometheus Operator "
                f"{pins.PROMETHEUS_OPERATOR_VERSION} (CRDs + operator, namespace default) "
                "server-side, checked against its pinned sha256, labelled with the run label; "
                "wait for deployment/prometheus-operator",
                details=[f"{bundle.url} sha256 {bundle.sha256}"],
            )
        )
    scraper = scraper_plan(version, run_id, revision=options.revision)
    steps.append(
        Step(
            "scraper",
            f"deploy the secure-metrics Prometheus in {scraper.namespace}; wait for "
            f"deployment/{SCRAPER_DEPLOYMENT}; its API is read through the Kubernetes API "
            f"service proxy /api/v1/namespaces/{scraper.namespace}/services/"
            f"{scraper.service}:{scraper.port}/proxy/",
            manifests=list(scraper.manifests),
        )
    )
    for index, v in enumerate(active):
        holder = next((o for o in active[:index] if o.conflicts(v)), None)
        steps += _variant_steps(v, after=holder)
    removal = istio_removal(istioctl, target, [options.revision]) if installs else []
    teardown = teardown_steps(options, active, scraper, kind, removal, detected=detected)
    creates = creates_lines(options, active, scraper, installs=istio_creates(options, detected))
    return Plan(options, version, steps, variants, teardown, creates=creates)


def istio_step(
    options: ClusterOptions,
    version: IstioVersion,
    target: istio.KubeTarget,
    istioctl: str,
    detected: Detected | None,
) -> Step:
    """Use the control plane the cluster runs (ISTIO-FACTS.md "Existing clusters": the
    revision-less ``istiod``, ``istiod-<rev>``, or the one the ``default`` tag points
    at), or install one where none runs; never one beside another."""
    rev = f" of revision {options.revision}" if options.revision else ""
    if detected is not None and detected.istio is not None:
        found = detected.istio
        return Step(
            "istio",
            f"use the installed istiod{rev} (image {found.image} in {found.namespace}); "
            "install nothing beside it and remove nothing of it",
        )
    install = istio.install_command(
        istioctl, target, hub=options.hub, tag=options.tag, revision=options.revision
    )
    title = (
        f"install Istio {version} with the default profile (istiod + istio-ingressgateway)"
        f"{f' as revision {options.revision}' if options.revision else ''}"
    )
    if detected is None:
        title = (
            f"if an istiod{rev} (or the default revision tag's) is installed, run against it "
            f"(its version must be {version}; any other istiod stops the run: the run never "
            f"installs beside one); if none runs: {title}"
        )
    return Step(
        "istio",
        title,
        commands=[install],
        details=["wait for deployment/istiod and deployment/istio-ingressgateway in istio-system"],
    )


def istio_creates(options: ClusterOptions, detected: Detected | None) -> str:
    revision = options.revision or istio.DEFAULT_REVISION
    if detected is not None and detected.istio is not None:
        return "no Istio: the installed control plane is used"
    what = f"Istio control-plane revision {revision} (istioctl install) in istio-system"
    return what if detected is not None else f"only if no istiod runs: {what}"


def istio_removal(
    istioctl: str,
    target: istio.KubeTarget,
    revisions: Sequence[str | None],
    tags: Sequence[str] = (),
) -> list[list[str]]:
    """Removing what the run installed, newest first: the tags it set, then each revision
    it installed, one by one (istio.uninstall_command: never --purge)."""
    commands = [istio.tag_remove_command(istioctl, target, t) for t in tags]
    commands += [istio.uninstall_command(istioctl, target, revision=r) for r in reversed(revisions)]
    return commands


def creates_lines(
    options: ClusterOptions,
    active: Sequence[VariantPlan],
    scraper: ScraperPlan,
    *,
    installs: str,
) -> list[str]:
    """What a run creates and where, for the plan and for the run's header."""
    where = (
        f"kind cluster {kind_identity(options).name}"
        if options.mode == "kind"
        else "the existing cluster (never created or deleted)"
    )
    namespaces = [scraper.namespace] + [v.namespace for v in active]
    lines = [
        f"in {where}: namespaces {', '.join(namespaces)} (labelled {RUN_LABEL}="
        f"{options.run_id}) and everything in them",
        installs,
    ]
    cluster_scoped = [
        m for m in scraper.manifests if m.get("kind") in ("ClusterRole", "ClusterRoleBinding")
    ]
    outside = [
        m
        for v in active
        for m in v.manifests
        if (m.get("metadata") or {}).get("namespace") not in (None, v.namespace)
        and m.get("kind") != "Namespace"
    ]
    if cluster_scoped or outside:
        lines.append(
            "run-labelled objects outside those namespaces: "
            + ", ".join(
                f"{k} in {(m.get('metadata') or {}).get('namespace') or 'the cluster'}"
                for k, m in zip(
                    istio.kinds(outside + cluster_scoped), outside + cluster_scoped, strict=True
                )
            )
        )
    patched = sorted(
        {f"{p.kind.lower()}/{p.name} in {p.namespace}" for v in active for p in v.patches}
    )
    if patched:
        lines.append(
            "patches (pod template saved first, restored at teardown): " + ", ".join(patched)
        )
    if any(v.needs_gateway_api for v in active):
        lines.append(
            "only if CRD gateways.gateway.networking.k8s.io is absent: the Gateway API CRDs"
        )
    if any(v.needs_operator for v in active):
        lines.append("only if no Prometheus Operator runs: the Prometheus Operator bundle")
    return lines


def tools_step(options: ClusterOptions, cache: ToolCache, istioctls: Sequence[ToolSpec]) -> Step:
    """How each tool will be found; several istioctl versions for an upgrade run."""
    tools = [describe_resolution(kubectl_spec(), cache, override=options.kubectl_bin)]
    tools += [describe_resolution(s, cache, override=options.istioctl_bin) for s in istioctls]
    if options.mode == "kind":
        tools.insert(0, describe_resolution(kind_spec(), cache, override=options.kind_bin))
    return Step("tools", "resolve the tools (flag, PATH, or verified download)", details=tools)


def cluster_steps(options: ClusterOptions, kind: KindIdentity) -> list[Step]:
    """Where the run happens: a kind cluster created (or reused), or the kubeconfig's."""
    if options.mode != "kind":
        context = f", context {options.context}" if options.context else ", its current context"
        return [
            Step(
                "cluster",
                "use the existing cluster of kubeconfig "
                f"{options.kubeconfig or '$KUBECONFIG or ~/.kube/config'}{context}"
                "; check that its API server answers within 5 s",
            )
        ]
    kind_bin = str(options.kind_bin or "kind")
    return [
        Step(
            "cluster",
            "check that the container runtime answers (kind needs Docker or Podman)",
            commands=[["docker", "info", "--format", "{{.ServerVersion}}"]],
        ),
        Step(
            "cluster",
            f"create kind cluster {kind.name} with node image {kind.image}, or reuse it if it "
            "exists (pytest-kind-ng KindCluster)",
            commands=[
                [kind_bin, "get", "clusters"],
                [
                    kind_bin,
                    "create",
                    "cluster",
                    f"--name={kind.name}",
                    f"--kubeconfig={kind.kubeconfig}",
                    f"--image={kind.image}",
                ],
            ],
        ),
    ]


def _variant_steps(v: VariantPlan, *, after: VariantPlan | None = None) -> list[Step]:
    steps: list[Step] = []
    details = []
    if after is not None:
        shared = after.conflicts(v)
        details.append(
            f"only once {after.id} is torn down and what it patched is restored and rolled "
            f"out again: both change {shared}, so they never run at the same time"
        )
    steps.append(
        Step(
            v.id,
            f"deploy {v.id} in namespace {v.namespace} (sidecar injection on)",
            manifests=list(v.manifests),
            details=details,
        )
    )
    for p in v.patches:
        steps.append(
            Step(
                v.id,
                f"patch {p.kind.lower()}/{p.name} in {p.namespace} (strategic merge; its "
                "pod template is saved first and restored at teardown)",
                details=yaml.safe_dump(dict(p.body), sort_keys=False).splitlines(),
            )
        )
    for wait in env_waits(v.manifests):
        steps.append(
            Step(
                f"{v.scenario.name} {v.mtls_mode.value}",
                f"wait until {wait.describe()}, before its rollout: istiod renders the "
                "generated gateway from the last push context and does not watch ProxyConfig "
                "(pilot/pkg/config/kube/gatewaycommon/deploymentcontroller.go)",
            )
        )
    steps.append(
        Step(
            v.id,
            "wait for rollouts, failing fast on ImagePullBackOff/CrashLoopBackOff: "
            + ", ".join(str(w) for w in v.rollouts),
            details=[
                "then, per check: config_dump via `pilot-agent request GET config_dump` in "
                "istio-proxy; mTLS scrape with curl and /etc/istio-certs from the scraper's "
                "istio-proxy plus the SPIFFE-checking probe through a verified kubectl "
                "port-forward; plaintext attempts from the target pod and the scraper pod",
            ],
        )
    )

    return steps


def teardown_steps(
    options: ClusterOptions,
    active: Sequence[VariantPlan],
    scraper: ScraperPlan,
    kind: KindIdentity,
    removal: Sequence[list[str]],
    *,
    detected: Detected | None = None,
    uninstall_note: str = "",
) -> list[Step]:
    """Teardown: the run-labelled namespaces and objects, the restored patches, and what
    the run installed (``removal``: its revisions and tags), nothing else."""
    run_id = options.run_id
    teardown: list[Step] = []
    namespaces = [scraper.namespace] + [v.namespace for v in active]
    teardown.append(
        Step(
            "diagnostics",
            f"on any failure, before anything below: capture pods, events, logs, config_dumps, "
            f"istioctl analyze / proxy-config and Prometheus targets into {options.artifacts_dir}/",
        )
    )
    teardown.append(
        Step(
            "cleanup",
            f"delete the namespaces labelled {RUN_LABEL}={run_id} (and only those): "
            + ", ".join(namespaces),
        )
    )
    outside = [
        m
        for v in [*active]
        for m in v.manifests
        if (m.get("metadata") or {}).get("namespace") not in (None, v.namespace)
        and m.get("kind") != "Namespace"
    ]
    cluster_scoped = [
        m for m in scraper.manifests if m.get("kind") in ("ClusterRole", "ClusterRoleBinding")
    ]
    teardown.append(
        Step(
            "cleanup",
            "delete the run-labelled objects outside those namespaces: "
            + ", ".join(istio.kinds(outside + cluster_scoped)),
        )
    )
    patched = sorted(
        {f"{p.kind.lower()}/{p.name} in {p.namespace}" for v in active for p in v.patches}
    )
    if patched:
        teardown.append(Step("cleanup", "restore the saved pod templates of " + ", ".join(patched)))
    if not options.keep_cluster:
        installs = []
        if any(v.needs_operator for v in active):
            installs.append("the Prometheus Operator bundle objects")
        if any(v.needs_gateway_api for v in active):
            installs.append("the Gateway API CRDs")
        if installs:
            teardown.append(
                Step("cleanup", "if this run installed them: delete " + " and ".join(installs))
            )
        if removal:
            if options.mode == "kind":
                when = (
                    "if this run reused a kind cluster (else the cluster goes) and installed Istio"
                )
            elif detected is None:
                when = "if this run installed Istio (no istiod ran)"
            else:
                when = "this run installed Istio"
            teardown.append(
                Step(
                    "istio",
                    f"{when}: remove what it installed, revision by revision (never --purge)"
                    + uninstall_note,
                    commands=list(removal),
                )
            )
        if options.mode == "kind":
            teardown.append(
                Step(
                    "cluster",
                    f"delete kind cluster {kind.name} (--keep-cluster keeps it for the next run)",
                    commands=[
                        [
                            str(options.kind_bin or "kind"),
                            "delete",
                            "cluster",
                            f"--name={kind.name}",
                            f"--kubeconfig={kind.kubeconfig}",
                        ]
                    ],
                )
            )
    else:
        teardown.append(
            Step("keep", "--keep-cluster: keep the cluster, Istio and the installed CRDs/operator")
        )
    return teardown
