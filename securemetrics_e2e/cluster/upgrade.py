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
executes the steps of its :data:`UPGRADE_PHASES` with :func:`run_upgrade`, built by the
one function the plan takes them from, :func:`upgrade_phase_steps`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from securemetrics_e2e.catalog import UPGRADE, MtlsMode, RunUnit, Scenario, upgraded_spec
from securemetrics_e2e.cluster import istio
from securemetrics_e2e.cluster.errors import IstioConflict
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.cluster.layout import (
    ISTIO_NAMESPACE,
    SCRAPER_DEPLOYMENT,
    VariantPlan,
    common_kubernetes,
    kind_identity,
    planned_target,
    run_scope_reason,
    scraper_plan,
    skipped_variant,
    variant_plan,
)
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.resources import Rollout, wait_rollouts, with_run_label
from securemetrics_e2e.cluster.steps import (
    Detected,
    Plan,
    Step,
    cluster_steps,
    creates_lines,
    istio_removal,
    teardown_steps,
    tools_step,
)
from securemetrics_e2e.cluster.tools import ToolCache, istioctl_spec
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.manifests import scenario_manifests
from securemetrics_e2e.versions import IstioVersion, capabilities

__all__ = [
    "UPGRADE_PHASES",
    "UpgradeStep",
    "UpgradeWindow",
    "canary_revision",
    "run_upgrade",
    "upgrade_phase_steps",
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


def _upgrade_pair(options: ClusterOptions) -> tuple[IstioVersion, IstioVersion]:
    pair = options.upgrade_versions()
    if pair is None:
        raise UsageError("an upgrade plan needs --upgrade-from (the Istio version to start on)")
    return pair


def upgrade_plan(
    options: ClusterOptions,
    *,
    cache: ToolCache | None = None,
    scenarios: Sequence[RunUnit] = (),
    detected: Detected | None = None,
) -> Plan:
    """Every command and manifest of an upgrade run, in order, touching nothing.

    ``scenarios`` other than the upgrade scenario are listed as skipped, with why.
    ``detected``: what the backend found installed (None: not looked, as ``--plan``).
    A found control plane (the older version, revision-less) is upgraded in place and
    left so, never removed; a canary beside it is refused, since it moves the default
    revision tag every ``istio-injection=enabled`` namespace follows.
    """
    options = options.validated()
    old, new = _upgrade_pair(options)
    canary = options.canary
    cache = cache or ToolCache(options.cache_dir)
    run_id = options.run_id
    kind = kind_identity(options)
    target = planned_target(options, kind)
    # A plan names istioctl by role; the run passes the resolved paths (run_upgrade's tools).
    old_ctl, new_ctl = f"istioctl-{old}", f"istioctl-{new}"
    scraper = scraper_plan(old, run_id)
    before = variant_plan(UPGRADE, MtlsMode.PERMISSIVE, old, run_id)
    if before.skip is not None:
        raise UsageError(f"the upgrade scenario cannot start on Istio {old}: {before.skip}")
    namespace = before.namespace
    how = f"canary revision {canary_revision(new)}" if canary else "in place"
    steps: list[Step] = [
        tools_step(options, cache, [istioctl_spec(str(old)), istioctl_spec(str(new))])
    ]
    steps += cluster_steps(options, kind)
    if options.mode == "kind":
        steps[-1].details.append(
            f"Kubernetes {common_kubernetes(old, new)}: supported by both Istio {old} and {new}"
        )
    found = detected is not None and detected.istio is not None
    if found and canary:
        raise IstioConflict(
            f"a canary upgrade run installs a revision beside the installed Istio {old} and "
            "moves the default revision tag: upgrade it in place (drop --canary) or use a "
            "cluster without Istio"
        )
    install = [istio.install_command(old_ctl, target, hub=options.hub)]
    if found:
        title = f"use the installed Istio {old} in {ISTIO_NAMESPACE}: it is upgraded in place"
    elif detected is not None:
        title = f"install Istio {old} with the default profile"
    else:
        title = (
            f"if an istiod is installed it must be Istio {old} in {ISTIO_NAMESPACE} without a "
            "revision (an upgrade run installs and upgrades Istio itself: any other is "
            "refused; a canary run is refused on any installed control plane); otherwise "
            f"install Istio {old} with the default profile"
        )
    steps.append(
        UpgradeStep(
            "istio",
            title,
            commands=[] if found else install,
            rollouts=[
                Rollout("Deployment", "istiod", ISTIO_NAMESPACE),
                Rollout("Deployment", istio.INGRESS_GATEWAY, ISTIO_NAMESPACE),
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
    steps += upgrade_phase_steps(options, before, target, scraper_namespace=scraper.namespace)
    final = upgraded_scenario(new).workloads[0]
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
    revisions: list[str | None] = [None, canary_revision(new)] if canary else [None]
    removal = (
        []
        if found
        else istio_removal(new_ctl, target, revisions, tags=["default"] if canary else [])
    )
    teardown = teardown_steps(
        options,
        [before],
        scraper,
        kind,
        removal,
        detected=detected,
        uninstall_note=f", with istioctl {new}",
    )
    installs = (
        f"no Istio: the installed {old} is upgraded in place to {new} and left so"
        if found
        else f"Istio control-plane revision default ({old}, upgraded in place to {new})"
        if not canary
        else f"Istio control-plane revisions default ({old}) and {canary_revision(new)} "
        f"({new}) and the default revision tag"
    )
    if detected is None and not found:
        installs = f"only if no istiod runs: {installs}"
    creates = creates_lines(options, [before], scraper, installs=installs)
    variants: list[VariantPlan] = [before]
    for u in scenarios:
        reason = run_scope_reason(u.scenario, options)
        if reason is not None:
            variants.append(skipped_variant(u.scenario, u.mtls_mode, run_id, reason, u.variant))
    notes = [
        f"upgrade run: Istio {old} -> {new}, {how}; only the upgrade scenario is deployed; "
        f"the cluster must run Kubernetes {common_kubernetes(old, new)} (both support it)",
    ]
    return Plan(
        options.with_version(str(new)), new, steps, variants, teardown, notes, creates=creates
    )


def upgrade_phase_steps(
    options: ClusterOptions,
    before: VariantPlan,
    target: istio.KubeTarget,
    *,
    scraper_namespace: str,
    istio_namespace: str = ISTIO_NAMESPACE,
) -> list[UpgradeStep]:
    """The steps of :data:`UPGRADE_PHASES`: upgrade Istio, restart the workload of
    ``before`` (the deployed upgrade scenario) onto the new proxies, switch it.

    :func:`upgrade_plan` prints them and the backend runs them, so what runs is what
    the plan shows; building them resolves no tool and touches nothing.
    """
    old, new = _upgrade_pair(options)
    revision = canary_revision(new) if options.canary else None
    kubectl = [str(options.kubectl_bin or "kubectl"), *target.args()]
    return [
        _upgrade_step(old, new, target, istio_namespace, revision, options.hub),
        _restart_step(old, new, kubectl, before.namespace, scraper_namespace, revision),
        _switch_step(
            before,
            upgraded_scenario(new),
            new,
            options.run_id,
            scraper_namespace,
            istio_namespace,
        ),
    ]


def _upgrade_step(
    old: IstioVersion,
    new: IstioVersion,
    target: istio.KubeTarget,
    istio_namespace: str,
    revision: str | None,
    hub: str | None,
) -> UpgradeStep:
    new_ctl = f"istioctl-{new}"
    if revision is None:
        return UpgradeStep(
            "upgrade",
            f"in place: istioctl upgrade to Istio {new} (same flags as the install)",
            commands=[istio.install_command(new_ctl, target, hub=hub, verb="upgrade")],
            rollouts=[
                Rollout("Deployment", "istiod", istio_namespace),
                Rollout("Deployment", istio.INGRESS_GATEWAY, istio_namespace),
            ],
        )
    return UpgradeStep(
        "upgrade",
        f"canary: install Istio {new} as revision {revision} beside {old} (istiod only), "
        "then make it the default revision tag",
        commands=[
            istio.install_command(new_ctl, target, hub=hub, revision=revision, profile="minimal"),
            istio.tag_set_command(new_ctl, target, "default", revision),
        ],
        rollouts=[Rollout("Deployment", f"istiod-{revision}", istio_namespace)],
    )


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
    steps: Sequence[Step],
    api: KubeAPI,
    *,
    tools: dict[str, str],
    run: Callable[[Sequence[str]], object],
    rollout_timeout: float,
    verify: Callable[[str], None] | None = None,
    progress: Callable[[str], None] = lambda line: None,
    phases: Collection[str] | None = None,
) -> UpgradeWindow:
    """Execute ``steps`` in order (only those of ``phases``, when given): a plan's
    (:attr:`Plan.steps`), or those of :func:`upgrade_phase_steps`. Progress numbers
    them as they are numbered in ``steps``.

    ``tools`` maps a tool's role in the plan (``istioctl-<V>``, ``kubectl``) to a binary;
    ``run`` runs one command (raises on failure), ``verify`` runs the checks for a
    verification step (raises on failure). The first failure stops the upgrade: what
    was applied stays for diagnostics, and teardown removes it by its run label.
    Without ``phases`` the steps must open and close a continuity window; with them the
    window is the time the chosen steps took.
    """
    known = [s.phase for s in steps]
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
    for number, step in enumerate(steps, 1):
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
