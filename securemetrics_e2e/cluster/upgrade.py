"""The ``upgrade`` scenario on a cluster: secure scraping across an Istio minor upgrade.

An upgrade run (``--upgrade-from``) installs the previous minor, deploys the upgrade
scenario with its legacy configuration (a ``Sidecar`` terminating ISTIO_MUTUAL on
15091) and verifies it; upgrades Istio, restarts the workload onto the new proxies,
switches it to the native secure ports where the new version has them (>= 1.31), and
verifies again; continuity is measured from Prometheus over the whole window
(:mod:`securemetrics_e2e.upgrade_window`).

Two procedures, as istio.io documents them:

* in place (``docs/setup/upgrade/in-place``): ``istioctl upgrade`` of the NEW version
  (an alias of ``install``: istio/istio ``operator/cmd/mesh/upgrade.go``) with the same
  ``--set`` flags as the install; the installed version must be at most one minor older.
* canary (``docs/setup/upgrade/canary``): ``istioctl install --set revision=<rev>`` of
  the new version beside the old control plane, then ``istioctl tag set default
  --revision <rev> --overwrite`` so namespaces labelled ``istio-injection=enabled`` are
  injected by it (``istioctl/pkg/tag/tag.go``), then restart the workloads. The new
  revision is installed with ``profile=minimal`` (istiod only): the classic ingress
  gateway stays on the old control plane, and this scenario does not use it.

Both istioctl binaries are resolved through :mod:`.tools` (PATH when the version
matches, or the release tarball checked against its ``.sha256``). More than one minor
at once is refused with the intermediate minor named: upgrade in two runs.

:func:`upgrade_plan` is the whole run, step by step; ``--plan`` prints it, the backend
builds its cluster, Istio, scraper and deployment with the same builders, and
:meth:`ClusterBackend.upgrade <securemetrics_e2e.cluster.backend.ClusterBackend.upgrade>`
executes its :data:`UPGRADE_PHASES` with :func:`run_upgrade`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from securemetrics_e2e.catalog import UPGRADE, MtlsMode, Scenario, upgraded_spec
from securemetrics_e2e.cluster import istio, pins
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.plan import (
    ISTIO_NAMESPACE,
    SCRAPER_DEPLOYMENT,
    Plan,
    Step,
    VariantPlan,
    cluster_steps,
    kind_kubeconfig,
    run_scope_reason,
    scraper_plan,
    skipped_variant,
    teardown_steps,
    tools_step,
    variant_plan,
)
from securemetrics_e2e.cluster.resources import Workload as Rollout
from securemetrics_e2e.cluster.resources import wait_rollouts, with_run_label
from securemetrics_e2e.cluster.tools import ToolCache, istioctl_spec
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.manifests import scenario_manifests
from securemetrics_e2e.versions import (
    IstioVersion,
    KubernetesRange,
    capabilities,
    previous_minor,
    upgrade_pair,
)

__all__ = [
    "UPGRADE_PHASES",
    "UpgradeStep",
    "UpgradeWindow",
    "canary_revision",
    "common_kubernetes",
    "previous_minor",  # the rule lives in versions; kept importable here
    "render_upgrade_plan",
    "run_upgrade",
    "upgrade_cluster_name",
    "upgrade_node_image",
    "upgrade_pair",
    "upgrade_plan",
    "upgraded_scenario",
]

#: the phases ClusterBackend.upgrade executes; the others are what the backend does to
#: set up (cluster, Istio, scraper, deploy) and the checks (before, after)
UPGRADE_PHASES: Final = ("upgrade", "switch")
WORKLOAD_DEPLOYMENT = "httpbin"


def canary_revision(version: IstioVersion) -> str:
    """The revision name istio.io uses for a version: ``1.31.1`` -> ``1-31-1``."""
    return str(version).replace(".", "-")


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


def upgrade_cluster_name(options: ClusterOptions, old: IstioVersion, new: IstioVersion) -> str:
    """The kind cluster of an upgrade run: one per version pair, apart from plain runs'
    (a kept one ends on the newer Istio, which a plain run of the older must not find)."""
    return options.cluster_name or f"sm-e2e-upgrade-{old.minor}-{new.minor}"


def upgrade_node_image(options: ClusterOptions, old: IstioVersion, new: IstioVersion) -> str:
    """A kind node image of a Kubernetes minor both versions support."""
    return options.kind_image or pins.node_image(common_kubernetes(old, new))


def upgraded_scenario(version: IstioVersion) -> Scenario:
    """The upgrade scenario as it stands on ``version`` after the switch."""
    native = capabilities(version).native_secure_ports
    return dataclasses.replace(
        UPGRADE, workloads=tuple(upgraded_spec(w, native) for w in UPGRADE.workloads)
    )


@dataclass
class UpgradeStep(Step):
    """A plan step plus what :func:`run_upgrade` does besides commands and applies.

    Executed in this order: commands, applies, rollouts awaited, deletes, verification.
    Deleting after the rollout keeps the old configuration serving until the new pod
    is ready (the legacy ``Sidecar`` goes once the native pod runs).
    """

    delete: list[Obj] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)
    verify: str = ""  # what the checks must confirm here ("" = no verification)
    window: str = ""  # "start" / "end" of the continuity window


def render_upgrade_plan(
    options: ClusterOptions,
    from_version: str,
    to_version: str,
    *,
    canary: bool,
    cache: ToolCache | None = None,
) -> Plan:
    """:func:`upgrade_plan` for ``from_version`` -> ``to_version`` (the CLI's entry)."""
    upgrade = dataclasses.replace(
        options, upgrade_from=from_version, istio_version=to_version, canary=canary
    )
    return upgrade_plan(upgrade, cache=cache)


def upgrade_plan(
    options: ClusterOptions,
    *,
    cache: ToolCache | None = None,
    target: istio.KubeTarget | None = None,
    istio_namespace: str = ISTIO_NAMESPACE,
    scenarios: Sequence[tuple[Scenario, MtlsMode]] = (),
) -> Plan:
    """Every command and manifest of an upgrade run, in order, touching nothing.

    ``target`` is how istioctl and kubectl reach the cluster (default: from
    ``options``; the backend passes the one it connected with). ``scenarios`` other than
    the upgrade scenario are listed as skipped, with why.
    """
    options = options.validated()
    pair = options.upgrade_versions()
    if pair is None:
        raise UsageError("an upgrade plan needs --upgrade-from (the Istio version to start on)")
    old, new = pair
    canary = options.canary
    cache = cache or ToolCache(options.cache_dir)
    run_id = options.run_id
    name = upgrade_cluster_name(options, old, new) if options.mode == "kind" else ""
    kubeconfig = kind_kubeconfig(name) if options.mode == "kind" else options.kubeconfig
    if target is None:
        context = f"kind-{name}" if options.mode == "kind" else options.context
        target = istio.KubeTarget(kubeconfig, context)
    # A plan names istioctl by role; the run passes the resolved paths (run_upgrade's tools).
    old_ctl, new_ctl = f"istioctl-{old}", f"istioctl-{new}"
    kubectl = [str(options.kubectl_bin or "kubectl"), *target.args()]
    scraper = scraper_plan(old, run_id)
    before = variant_plan(
        UPGRADE, MtlsMode.PERMISSIVE, old, run_id, istio_namespace=istio_namespace
    )
    if before.skip is not None:
        raise UsageError(f"the upgrade scenario cannot start on Istio {old}: {before.skip}")
    namespace = before.namespace
    revision = canary_revision(new) if canary else None
    how = f"canary revision {revision}" if canary else "in place"
    steps: list[Step] = [
        tools_step(options, cache, [istioctl_spec(str(old)), istioctl_spec(str(new))])
    ]
    steps += cluster_steps(options, name, kubeconfig, upgrade_node_image(options, old, new))
    if options.mode == "kind":
        steps[-1].details.append(
            f"Kubernetes {common_kubernetes(old, new)}: supported by both Istio {old} and {new}"
        )
    steps.append(
        UpgradeStep(
            "istio",
            f"if an istiod is installed it must be Istio {old} in {istio_namespace} without a "
            "revision (an upgrade run installs and upgrades Istio itself: any other is "
            f"refused); otherwise install Istio {old} with the default profile",
            commands=[istio.install_command(old_ctl, target, hub=options.hub)],
            rollouts=[
                Rollout("Deployment", "istiod", istio_namespace),
                Rollout("Deployment", istio.INGRESS_GATEWAY, istio_namespace),
            ],
        )
    )
    steps.append(
        UpgradeStep(
            "scraper",
            f"deploy the secure-metrics Prometheus of Istio {old} in {scraper.namespace}",
            manifests=list(scraper.manifests),
            rollouts=[Rollout("Deployment", SCRAPER_DEPLOYMENT, scraper.namespace)],
        )
    )
    legacy = UPGRADE.workloads[0]
    steps.append(
        UpgradeStep(
            "before",
            f"deploy {before.id} on Istio {old} in {namespace}: {WORKLOAD_DEPLOYMENT} with the "
            f"{legacy.mode} configuration (secure port {legacy.secure_merged_port})",
            manifests=list(before.manifests),
            rollouts=list(before.rollouts),
        )
    )
    steps.append(
        UpgradeStep(
            "before",
            f"verify on Istio {old}: {legacy.mode} port {legacy.secure_merged_port} scraped "
            "over mTLS and UP; the continuity window opens",
            verify=f"{legacy.mode} on {old}",
            window="start",
        )
    )
    steps += _upgrade_steps(old, new, target, istio_namespace, revision, options.hub)
    steps.append(_restart_step(old, new, kubectl, namespace, scraper.namespace, revision))
    upgraded = upgraded_scenario(new)
    final = upgraded.workloads[0]
    steps.append(_switch_step(before, upgraded, new, run_id, scraper.namespace, istio_namespace))
    steps.append(
        UpgradeStep(
            "after",
            f"verify on Istio {new}: {final.mode} port {final.secure_merged_port} scraped over "
            "mTLS and UP; the window closes, and its continuity is read from Prometheus' up "
            "samples",
            verify=f"{final.mode} on {new}",
            window="end",
        )
    )
    teardown = teardown_steps(
        options,
        [before],
        scraper,
        target,
        new_ctl,
        name,
        kubeconfig,
        uninstall_note=f" with istioctl {new} (--purge: "
        + ("both revisions)" if canary else "the upgraded control plane)"),
    )
    variants: list[VariantPlan] = [before]
    for s, m in scenarios:
        reason = run_scope_reason(s, options)
        if reason is not None:
            variants.append(skipped_variant(s, m, run_id, reason))
    notes = [
        f"upgrade run: Istio {old} -> {new}, {how}; only the upgrade scenario is deployed; "
        f"the cluster must run Kubernetes {common_kubernetes(old, new)} (both support it)",
    ]
    return Plan(options.with_version(str(new)), new, steps, variants, teardown, notes)


def _upgrade_steps(
    old: IstioVersion,
    new: IstioVersion,
    target: istio.KubeTarget,
    istio_namespace: str,
    revision: str | None,
    hub: str | None,
) -> list[Step]:
    new_ctl = f"istioctl-{new}"
    hub_flags = ["--set", f"hub={hub}"] if hub else []
    if revision is None:
        return [
            UpgradeStep(
                "upgrade",
                f"in place: istioctl upgrade to Istio {new} (same flags as the install)",
                commands=[istio.install_command(new_ctl, target, hub=hub, verb="upgrade")],
                rollouts=[
                    Rollout("Deployment", "istiod", istio_namespace),
                    Rollout("Deployment", istio.INGRESS_GATEWAY, istio_namespace),
                ],
            )
        ]
    return [
        UpgradeStep(
            "upgrade",
            f"canary: install Istio {new} as revision {revision} beside {old} (istiod only), "
            "then make it the default revision tag",
            commands=[
                [
                    new_ctl,
                    "install",
                    "-y",
                    *target.args(),
                    "--set",
                    "profile=minimal",
                    *hub_flags,
                    "--set",
                    f"revision={revision}",
                ],
                [
                    new_ctl,
                    "tag",
                    "set",
                    "default",
                    *target.args(),
                    "--revision",
                    revision,
                    "--overwrite",
                ],
            ],
            rollouts=[Rollout("Deployment", f"istiod-{revision}", istio_namespace)],
        )
    ]


def _restart_step(
    old: IstioVersion,
    new: IstioVersion,
    kubectl: list[str],
    namespace: str,
    scraper_namespace: str,
    revision: str | None,
) -> UpgradeStep:
    control_plane = (
        f"the Istio {old} control plane, which keeps running beside revision {revision}"
        if revision
        else f"the upgraded Istio {new} control plane"
    )
    return UpgradeStep(
        "upgrade",
        f"restart the workload onto Istio {new}'s proxies (the scraper is NOT restarted)",
        commands=[
            [*kubectl, "rollout", "restart", f"deployment/{WORKLOAD_DEPLOYMENT}", "-n", namespace]
        ],
        rollouts=[Rollout("Deployment", WORKLOAD_DEPLOYMENT, namespace)],
        details=[
            f"deployment/{SCRAPER_DEPLOYMENT} in {scraper_namespace} keeps its pod: its TSDB "
            "is an emptyDir, so a new pod would hold none of this window's samples and the "
            "continuity measurement would see a gap of the run's own making",
            f"so its istio-proxy stays on Istio {old}, served by {control_plane}; istio.io "
            "(docs/releases/supported-releases, Control Plane/Data Plane Skew) supports a "
            "control plane one version ahead of the data plane",
        ],
    )


def _switch_step(
    before: VariantPlan,
    upgraded: Scenario,
    new: IstioVersion,
    run_id: str,
    scraper_namespace: str,
    istio_namespace: str,
) -> UpgradeStep:
    legacy = before.scenario.workloads[0]
    if upgraded.workloads == before.scenario.workloads:
        return UpgradeStep(
            "switch",
            f"Istio {new} has no native secure ports: keep the {legacy.mode} configuration",
        )
    rendered = scenario_manifests(
        upgraded,
        before.mtls_mode,
        new,
        namespace=before.namespace,
        scraper_namespace=scraper_namespace,
        gateway_namespace=istio_namespace,
    )
    native = [with_run_label(o, run_id) for o in rendered]
    kept = {(o["kind"], o["metadata"]["name"]) for o in native}
    # the namespace stays: only objects of the old configuration the new one lacks go
    gone = [
        o
        for o in before.manifests
        if o["kind"] != "Namespace" and (o["kind"], o["metadata"]["name"]) not in kept
    ]
    spec = upgraded.workloads[0]
    return UpgradeStep(
        "switch",
        f"Istio {new} has native secure ports: switch {WORKLOAD_DEPLOYMENT} to them ({spec.mode}: "
        f"{' and '.join(str(p) for p in sorted(set(spec.jobs.values())))}), then remove the "
        f"{legacy.mode} objects",
        manifests=native,
        delete=gone,
        rollouts=[Rollout("Deployment", WORKLOAD_DEPLOYMENT, before.namespace)],
        details=(["once rolled out, delete " + ", ".join(istio.kinds(gone))] if gone else []),
    )


# -- the driver ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UpgradeWindow:
    """When the continuity window of the upgrade opened and closed."""

    start: datetime
    end: datetime
    verified: tuple[str, ...]


def run_upgrade(
    plan: Plan,
    api: KubeAPI,
    *,
    tools: dict[str, str],
    run: Callable[[Sequence[str]], object],
    rollout_timeout: float,
    verify: Callable[[str], None] | None = None,
    progress: Callable[[str], None] = lambda line: None,
    phases: Collection[str] | None = None,
) -> UpgradeWindow:
    """Execute ``plan``'s steps in order (only those of ``phases``, when given).

    ``tools`` maps a tool's role in the plan (``istioctl-<V>``, ``kubectl``) to a binary;
    ``run`` runs one command (raises on failure), ``verify`` runs the checks for a
    verification step (raises on failure). The first failure stops the upgrade: what
    was applied stays for diagnostics, and teardown removes it by its run label.
    Without ``phases`` the plan must open and close a continuity window; with them the
    window is the time the chosen steps took.
    """
    known = [s.phase for s in plan.steps]
    if phases is not None:
        unknown = sorted(set(phases) - set(known))
        if unknown:
            raise UsageError(
                f"the upgrade plan has no phase {', '.join(unknown)}; its phases: "
                + ", ".join(dict.fromkeys(known))
            )
    began = datetime.now(UTC)
    start: datetime | None = None
    end: datetime | None = None
    verified: list[str] = []
    for number, step in enumerate(plan.steps, 1):
        if phases is not None and step.phase not in phases:
            continue
        progress(f"[upgrade] {number}. [{step.phase}] {step.title}")
        commands = [[tools.get(c[0], c[0]), *c[1:]] for c in step.commands]
        for argv in commands:
            if argv[0].startswith("istioctl-"):
                raise UsageError(
                    f"no binary given for {argv[0]}: resolve it with cluster.tools first"
                )
        for argv in commands:
            run(argv)
        for obj in step.manifests:
            api.apply(obj)
        if not isinstance(step, UpgradeStep):
            continue
        if step.rollouts:
            wait_rollouts(api, step.rollouts, timeout=rollout_timeout)
        for obj in step.delete:
            meta = obj.get("metadata") or {}
            api.delete(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
        if step.verify:
            if verify is None:
                raise UsageError(f"step {number} verifies {step.verify}, and no verify was given")
            verify(step.verify)
            verified.append(step.verify)
        if step.window == "start":
            start = datetime.now(UTC)
        elif step.window == "end":
            end = datetime.now(UTC)
    if phases is None and (start is None or end is None):
        raise UsageError("the upgrade plan has no continuity window (start and end steps)")
    return UpgradeWindow(start or began, end or datetime.now(UTC), tuple(verified))
