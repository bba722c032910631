"""The steps of a cluster run's plan: each command and manifest, in order, as text.

:class:`Step` and :class:`Plan` are what ``--plan`` prints; the builders here (the
tools, the cluster, Istio, each variant, teardown) serve both a plain run's plan
(:func:`.plan.render_plan`) and an upgrade run's (:func:`.upgrade.upgrade_plan`).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import yaml

from securemetrics_e2e.cluster import istio
from securemetrics_e2e.cluster.kube import FIELD_MANAGER, RUN_LABEL, Obj
from securemetrics_e2e.cluster.layout import (
    KindIdentity,
    ScraperPlan,
    VariantPlan,
    kind_identity,
)
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.proxyconfig import env_waits
from securemetrics_e2e.cluster.tools import (
    ToolCache,
    ToolSpec,
    describe_resolution,
    kind_spec,
    kubectl_spec,
)
from securemetrics_e2e.versions import (
    IstioVersion,
    capabilities,
)


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


@dataclass(frozen=True)
class Detected:
    """What the backend found installed before it planned (``--plan`` does not look)."""

    istio: istio.InstalledIstio | None


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
