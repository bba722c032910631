"""The ``upgrade`` scenario (cluster only): secure scraping across an Istio minor upgrade.

Install the previous minor, deploy the workload with the legacy configuration (a
``Sidecar`` terminating ISTIO_MUTUAL on 15091) and verify; upgrade Istio, restart the
workloads onto the new proxies, switch to the native secure ports where the new
version has them (>= 1.31), verify again; continuity is measured over the whole window.

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

Both istioctl binaries are resolved through :mod:`.tools` (flag, PATH when the version
matches, or the release tarball checked against its ``.sha256``). More than one minor
at once is refused with the intermediate minor named: upgrade in two runs.

:func:`render_upgrade_plan` is what :func:`run_upgrade` executes, step by step.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from securemetrics_e2e.catalog import MtlsMode, scenario
from securemetrics_e2e.cluster import istio, pins
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.plan import (
    SCRAPER_DEPLOYMENT,
    Plan,
    Step,
    VariantPlan,
    kind_kubeconfig,
    scraper_plan,
)
from securemetrics_e2e.cluster.resources import Workload as Rollout
from securemetrics_e2e.cluster.resources import namespace_manifest, wait_rollouts, with_run_label
from securemetrics_e2e.cluster.tools import ToolCache, describe_resolution, istioctl_spec
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.manifests import scenario_manifests
from securemetrics_e2e.versions import (
    IstioVersion,
    KubernetesRange,
    capabilities,
    resolve,
    supported_versions,
)

LEGACY = "legacy-sidecar"
NATIVE = "native-sidecar"
WORKLOAD_DEPLOYMENT = "httpbin"
#: istio.io in-place upgrades: "no more than one minor version less than the upgrade
#: version"; the canary page allows no more.
MAX_MINOR_STEP = 1


def canary_revision(version: IstioVersion) -> str:
    """The revision name istio.io uses for a version: ``1.31.1`` -> ``1-31-1``."""
    return str(version).replace(".", "-")


def upgrade_pair(from_text: str, to_text: str) -> tuple[IstioVersion, IstioVersion]:
    """Both versions resolved; an error naming both when Istio does not support the step."""
    old, new = resolve(from_text), resolve(to_text)
    gap = new.minor - old.minor if new.major == old.major else None
    if gap is None or gap < 1:
        raise UsageError(
            f"cannot upgrade Istio {old} to {new}: the upgrade scenario goes from an older "
            f"minor to a newer one (e.g. --upgrade-from {_previous(new)} for {new})"
        )
    if gap > MAX_MINOR_STEP:
        minors = [f"{old.major}.{m}" for m in range(old.minor + 1, new.minor + 1)]
        steps = " -> ".join([str(old), *minors])
        raise UsageError(
            f"cannot upgrade Istio {old} to {new} in one step: Istio supports in-place and "
            f"canary upgrades from the previous minor only (istio.io docs/setup/upgrade). "
            f"Upgrade one minor at a time: {steps}"
        )
    return old, new


def _previous(version: IstioVersion) -> str:
    older = [v for v in supported_versions() if v.minor_version < version.minor_version]
    return str(older[-1]) if older else "an older supported minor"


def previous_minor(version: IstioVersion) -> IstioVersion:
    """The latest known patch of the minor before ``version`` (the default upgrade start)."""
    older = [v for v in supported_versions() if v.minor == version.minor - 1]
    if not older:
        raise UsageError(
            f"no supported Istio minor precedes {version}; supported: "
            + ", ".join(str(v) for v in supported_versions())
        )
    return older[-1]


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


@dataclass
class UpgradeStep(Step):
    """A plan step plus what :func:`run_upgrade` does besides commands and applies."""

    delete: list[Obj] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)
    verify: str = ""  # what the checks must confirm here ("" = no verification)
    window: str = ""  # "start" / "end" of the continuity window


def _kubectl(options: ClusterOptions, target: istio.KubeTarget) -> list[str]:
    return [str(options.kubectl_bin or "kubectl"), *target.args()]


def render_upgrade_plan(
    options: ClusterOptions,
    from_version: str,
    to_version: str,
    *,
    canary: bool,
    cache: ToolCache | None = None,
) -> Plan:
    """Every command and manifest of the upgrade scenario, in order, touching nothing."""
    options = options.validated()
    old, new = upgrade_pair(from_version, to_version)
    cache = cache or ToolCache(options.cache_dir)
    run_id = options.run_id
    if options.mode == "kind":
        name = options.cluster_name or f"sm-e2e-upgrade-{old.minor}-{new.minor}"
        target = istio.KubeTarget(kind_kubeconfig(name), f"kind-{name}")
    else:
        name, target = "", istio.KubeTarget(options.kubeconfig, options.context)
    # A plan names the tool by role; the run passes the resolved paths.
    old_ctl, new_ctl = f"istioctl-{old}", f"istioctl-{new}"
    kubectl = _kubectl(options, target)
    namespace = f"sm-upgrade-{'canary' if canary else 'inplace'}-{run_id}"
    scraper = scraper_plan(old, run_id)
    revision = canary_revision(new) if canary else None
    steps: list[Step] = []

    steps.append(
        UpgradeStep(
            "tools",
            f"resolve istioctl {old} and istioctl {new} (flag, PATH, or verified download)",
            details=[
                describe_resolution(istioctl_spec(str(old)), cache, use_path=True),
                describe_resolution(istioctl_spec(str(new)), cache, use_path=True),
            ],
        )
    )
    if options.mode == "kind":
        image = options.kind_image or pins.node_image(common_kubernetes(old, new))
        steps.append(
            UpgradeStep(
                "cluster",
                f"create kind cluster {name} with node image {image} (a Kubernetes both "
                "versions support), or reuse it",
            )
        )
    steps.append(
        UpgradeStep(
            "istio",
            f"install Istio {old} (default profile, no revision)",
            commands=[istio.install_command(old_ctl, target)],
            rollouts=[Rollout("Deployment", "istiod", "istio-system")],
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
    legacy = _workload_manifests(LEGACY, old, namespace, run_id, scraper.namespace)
    steps.append(
        UpgradeStep(
            "before",
            f"deploy {LEGACY} on Istio {old} in {namespace}",
            manifests=legacy,
            rollouts=[Rollout("Deployment", WORKLOAD_DEPLOYMENT, namespace)],
        )
    )
    steps.append(
        UpgradeStep(
            "before",
            f"verify on Istio {old}: the legacy port 15091 is scraped over mTLS and UP",
            verify=f"{LEGACY} on {old}",
            window="start",
        )
    )
    if canary:
        assert revision is not None
        steps.append(
            UpgradeStep(
                "upgrade",
                f"canary: install Istio {new} as revision {revision} beside {old} (istiod "
                f"only), then make it the default revision tag",
                commands=[
                    [
                        new_ctl,
                        "install",
                        "-y",
                        *target.args(),
                        "--set",
                        "profile=minimal",
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
                rollouts=[Rollout("Deployment", f"istiod-{revision}", "istio-system")],
            )
        )
    else:
        steps.append(
            UpgradeStep(
                "upgrade",
                f"in place: istioctl upgrade to Istio {new} (same flags as the install)",
                commands=[[new_ctl, "upgrade", "-y", *target.args(), "--set", "profile=default"]],
                rollouts=[
                    Rollout("Deployment", "istiod", "istio-system"),
                    Rollout("Deployment", istio.INGRESS_GATEWAY, "istio-system"),
                ],
            )
        )
    steps.append(
        UpgradeStep(
            "upgrade",
            f"restart the workload and the scraper onto Istio {new}'s proxies",
            commands=[
                [
                    *kubectl,
                    "rollout",
                    "restart",
                    f"deployment/{WORKLOAD_DEPLOYMENT}",
                    "-n",
                    namespace,
                ],
                [
                    *kubectl,
                    "rollout",
                    "restart",
                    f"deployment/{SCRAPER_DEPLOYMENT}",
                    "-n",
                    scraper.namespace,
                ],
            ],
            rollouts=[
                Rollout("Deployment", WORKLOAD_DEPLOYMENT, namespace),
                Rollout("Deployment", SCRAPER_DEPLOYMENT, scraper.namespace),
            ],
        )
    )
    final = LEGACY
    if capabilities(new).native_secure_ports:
        final = NATIVE
        native = _workload_manifests(NATIVE, new, namespace, run_id, scraper.namespace)
        kept = {(o["kind"], o["metadata"]["name"]) for o in native}
        gone = [o for o in legacy if (o["kind"], o["metadata"]["name"]) not in kept]
        steps.append(
            UpgradeStep(
                "switch",
                f"Istio {new} has native secure ports: switch {WORKLOAD_DEPLOYMENT} to them "
                "and remove the legacy objects",
                manifests=native,
                delete=gone,
                rollouts=[Rollout("Deployment", WORKLOAD_DEPLOYMENT, namespace)],
                details=["delete " + ", ".join(istio.kinds(gone))] if gone else [],
            )
        )
    else:
        steps.append(
            UpgradeStep(
                "switch",
                f"Istio {new} has no native secure ports: keep the legacy configuration",
            )
        )
    steps.append(
        UpgradeStep(
            "after",
            f"verify on Istio {new}: {final} scraped over mTLS and UP; continuity of the "
            "whole window from Prometheus' up samples",
            verify=f"{final} on {new}",
            window="end",
        )
    )
    teardown: list[Step] = [
        UpgradeStep(
            "cleanup",
            f"delete the namespaces labelled with run {run_id}: {namespace}, {scraper.namespace}",
        ),
        UpgradeStep(
            "istio",
            f"uninstall Istio ({'both revisions' if canary else new})",
            commands=[istio.uninstall_command(new_ctl, target, revision=None)],
        ),
    ]
    variants: list[VariantPlan] = []  # not a catalog variant: nothing to skip
    return Plan(options.with_version(str(new)), new, steps, variants, teardown)


def _workload_manifests(
    name: str, version: IstioVersion, namespace: str, run_id: str, scraper_namespace: str
) -> list[Obj]:
    rendered = scenario_manifests(
        scenario(name),
        MtlsMode.PERMISSIVE,
        version,
        namespace=namespace,
        scraper_namespace=scraper_namespace,
    )
    return [namespace_manifest(namespace, run_id)] + [with_run_label(o, run_id) for o in rendered]


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
    verify: Callable[[str], None],
    rollout_timeout: float,
    progress: Callable[[str], None] = lambda line: None,
) -> UpgradeWindow:
    """Execute ``plan``'s steps in order; ``tools`` maps ``istioctl-<V>`` to a binary.

    ``run`` runs one command (raises on failure), ``verify`` runs the checks for a
    verification step (raises on failure). The first failure stops the upgrade: what
    was applied stays for diagnostics, and teardown removes it by its run label.
    """
    start: datetime | None = None
    end: datetime | None = None
    verified: list[str] = []
    for number, step in enumerate(plan.steps, 1):
        progress(f"[upgrade] {number}. [{step.phase}] {step.title}")
        for command in step.commands:
            argv = [tools.get(command[0], command[0]), *command[1:]]
            if argv[0].startswith("istioctl-"):
                raise UsageError(
                    f"no binary given for {argv[0]}: resolve it with cluster.tools first"
                )
            progress(f"[upgrade] $ {shlex.join(argv)}")
            run(argv)
        for obj in step.manifests:
            api.apply(obj)
        if isinstance(step, UpgradeStep):
            for obj in step.delete:
                meta = obj.get("metadata") or {}
                api.delete(obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace"))
            if step.rollouts:
                wait_rollouts(api, step.rollouts, timeout=rollout_timeout)
            if step.verify:
                verify(step.verify)
                verified.append(step.verify)
            if step.window == "start":
                start = datetime.now(UTC)
            elif step.window == "end":
                end = datetime.now(UTC)
    if start is None or end is None:
        raise UsageError("the upgrade plan has no continuity window (start and end steps)")
    return UpgradeWindow(start, end, tuple(verified))
