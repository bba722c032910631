"""Building a cluster backend: the cluster (kind or the kubeconfig's), Istio, the scraper.

:func:`make_cluster_backend` runs preflight and the tools, prepares the cluster and
hands it to :func:`backend_on`, which finds or installs Istio (the older version of an
upgrade run), builds the :class:`~.backend.ClusterBackend` and deploys its scraper.
Whatever a step sets up is pushed on the run's undo stack first, so a failure undoes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from securemetrics_e2e.catalog import (
    Scenario,
)
from securemetrics_e2e.cluster import istio
from securemetrics_e2e.cluster.backend import ClusterBackend
from securemetrics_e2e.cluster.errors import IstioConflict
from securemetrics_e2e.cluster.kube import connect
from securemetrics_e2e.cluster.layout import (
    kind_identity,
    planned_version,
)
from securemetrics_e2e.cluster.options import (
    ClusterOptions,
)
from securemetrics_e2e.cluster.setup import (
    UNINSTALL_STEP,
    KindHandle,
    PhaseTimer,
    Progress,
    Runner,
    Undo,
    check_container_runtime,
    command_runner,
    kind_cluster,
    removes_istio,
    resolve_istio,
    stderr_progress,
)
from securemetrics_e2e.cluster.tools import (
    ToolCache,
    istioctl_spec,
    kind_spec,
    kubectl_spec,
    resolve_tool,
)
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.versions import DEFAULT_VERSION, IstioVersion, resolve


@dataclasses.dataclass
class PreparedCluster:
    """A cluster the run can use: its API, how tools reach it, kubectl, and kind's handle."""

    api: Any  # KubeAPI (a KubernetesAPI on a real cluster)
    target: istio.KubeTarget
    kubectl: Path
    kind: KindHandle | None


def _prepare_cluster(
    options: ClusterOptions, timer: PhaseTimer, cache: ToolCache, undo: Undo
) -> PreparedCluster:
    """Preflight, tools and the cluster: kind (created or reused) or the kubeconfig's."""
    if options.mode == "kind":
        with timer.phase("preflight"):
            check_container_runtime()
        with timer.phase("tools"):
            kind_bin = resolve_tool(kind_spec(), cache, override=options.kind_bin).path
            kubectl = resolve_tool(kubectl_spec(), cache, override=options.kubectl_bin).path
        identity = kind_identity(options)
        name = identity.name
        with timer.phase("cluster"):
            kind = kind_cluster(name, identity.image, kind_bin, kubectl, timer=timer)
            if kind.created and not options.keep_cluster:
                undo.push(f"delete kind cluster {name}", kind.delete)
        target = istio.KubeTarget(kind.kubeconfig, identity.context)
        api = connect(
            target.kubeconfig, target.context, discovery_cache=cache.root / "discovery" / name
        )
        return PreparedCluster(api, target, kubectl, kind)
    with timer.phase("preflight"):
        api = connect(
            options.kubeconfig,
            options.context,
            discovery_cache=cache.root / "discovery" / "existing",
        )
        target = istio.KubeTarget(options.kubeconfig, api.info.context)
    with timer.phase("tools"):
        kubectl = resolve_tool(kubectl_spec(), cache, override=options.kubectl_bin).path
    return PreparedCluster(api, target, kubectl, None)


@dataclasses.dataclass
class _Istio:
    version: IstioVersion
    istioctl: Path
    namespace: str
    installed_by_run: bool
    upgrade_istioctl: Path | None = None  # an upgrade run: the newer version's
    #: the control plane's revision (None: revision-less): its mesh ConfigMap is istio-<rev>
    revision: str | None = None


def _prepare_istio(
    options: ClusterOptions,
    requested: IstioVersion | None,
    cluster: PreparedCluster,
    timer: PhaseTimer,
    cache: ToolCache,
    undo: Undo,
    run: Runner,
) -> _Istio:
    """Use the installed istiod (when its version fits) or install the requested Istio."""
    pair = options.upgrade_versions()
    if pair is not None:
        return _prepare_upgrade_start(options, pair, cluster, timer, cache, undo, run)
    installed = resolve_istio(cluster.api, str(requested) if requested else None, options.revision)
    if installed is not None:
        if installed.version is not None:
            version = resolve(installed.version)
        elif requested is not None:
            version = requested
        else:
            raise UsageError(
                f"the installed istiod image {installed.image} names no version; pass "
                "--istio-version with the version it runs"
            )
        spec = istioctl_spec(str(version))
        istioctl = resolve_tool(spec, cache, override=options.istioctl_bin).path
        rev = f", revision {installed.revision}" if installed.revision else ""
        timer.progress(
            f"[cluster] using installed Istio {version} in {installed.namespace}{rev}; the run "
            "neither installs Istio beside it nor removes it"
        )
        return _Istio(version, istioctl, installed.namespace, False, revision=installed.revision)
    version = requested or DEFAULT_VERSION
    istioctl = resolve_tool(istioctl_spec(str(version)), cache, override=options.istioctl_bin).path
    install = istio.install_command(
        str(istioctl), cluster.target, hub=options.hub, tag=options.tag, revision=options.revision
    )
    _install(options, install, istioctl, cluster, undo, run, options.revision)
    return _Istio(version, istioctl, "istio-system", True, revision=options.revision)


def _install(
    options: ClusterOptions,
    install: list[str],
    istioctl: Path,
    cluster: PreparedCluster,
    undo: Undo,
    run: Runner,
    revision: str | None,
) -> None:
    run(install)
    if removes_istio(options, cluster.kind):
        uninstall = istio.uninstall_command(str(istioctl), cluster.target, revision=revision)
        undo.push(UNINSTALL_STEP, lambda: run(uninstall))


def _prepare_upgrade_start(
    options: ClusterOptions,
    pair: tuple[IstioVersion, IstioVersion],
    cluster: PreparedCluster,
    timer: PhaseTimer,
    cache: ToolCache,
    undo: Undo,
    run: Runner,
) -> _Istio:
    """An upgrade run starts on the older version: installed here, or found installed.

    Anything else on the cluster is refused before it is touched: the run upgrades the
    control plane it starts on, so it must be the older version's, default revision.
    """
    old, new = pair
    namespace = "istio-system"
    found = istio.installed_istiods(cluster.api)
    for installed in found:
        if (installed.version, installed.revision, installed.namespace) != (
            str(old),
            None,
            namespace,
        ):
            where = installed.namespace + (
                f", revision {installed.revision}" if installed.revision else ""
            )
            kept = (
                f" (a kind cluster kept by an earlier upgrade run ends on Istio {new}: delete it "
                f"with `kind delete cluster --name {cluster.kind.name}`)"
                if cluster.kind is not None and not cluster.kind.created
                else ""
            )
            raise IstioConflict(
                f"the cluster already runs Istio {installed.version or '(version unknown)'} "
                f"(istiod image {installed.image} in {where}), and an upgrade run installs and "
                f"upgrades Istio itself: use a cluster without Istio, or one running Istio "
                f"{old} in {namespace} without a revision{kept}"
            )
    if found and options.canary:
        raise IstioConflict(
            f"the cluster already runs Istio {old} in {namespace}, which this run did not "
            "install; a canary upgrade installs a revision beside it and moves the default "
            "revision tag, changing what injects every namespace: upgrade it in place (drop "
            "--canary) or use a cluster without Istio"
        )
    istioctl = resolve_tool(istioctl_spec(str(old)), cache).path
    # both now: a download that fails must stop the run before it installs anything
    upgrade_istioctl = resolve_tool(istioctl_spec(str(new)), cache).path
    if found:
        timer.progress(
            f"[cluster] upgrade run: starting from the installed Istio {old} in {namespace}; "
            f"the run upgrades it to {new} and leaves it so"
        )
        return _Istio(old, istioctl, namespace, False, upgrade_istioctl)
    install = istio.install_command(str(istioctl), cluster.target, hub=options.hub)
    _install(options, install, istioctl, cluster, undo, run, None)
    return _Istio(old, istioctl, namespace, True, upgrade_istioctl)


def make_cluster_backend(
    options: ClusterOptions,
    *,
    progress: Progress | None = None,
    scenarios: Sequence[Scenario] | None = None,
) -> ClusterBackend:
    """Prepare the cluster and return the backend; undo everything if a step fails.

    Bad input fails before anything is touched: the options and the Istio version, then
    (kind) the container runtime or (existing) the kubeconfig and the API server, each
    within seconds. An upgrade run (``options.upgrade_from``) installs the older Istio.
    """
    options = options.validated()
    planned_version(options)  # a bad --istio-version fails here, before anything is touched
    timer = PhaseTimer(progress or stderr_progress)
    cache = ToolCache(options.cache_dir)
    undo = Undo()
    try:
        cluster = _prepare_cluster(options, timer, cache, undo)
    except BaseException:
        undo.run(timer.progress)
        raise
    return backend_on(
        options,
        cluster,
        timer=timer,
        cache=cache,
        undo=undo,
        run=command_runner(timer.progress),
        scenarios=scenarios,
    )


def backend_on(
    options: ClusterOptions,
    cluster: PreparedCluster,
    *,
    timer: PhaseTimer,
    cache: ToolCache,
    undo: Undo,
    run: Runner,
    scenarios: Sequence[Scenario] | None = None,
) -> ClusterBackend:
    """Istio (found, or installed with ``run``), the backend and its scraper on ``cluster``.

    Before the scraper is deployed, the run's header says what the run creates and where
    (the ``CREATES`` list of ``--plan``, for the control plane found). On failure
    everything in ``undo`` is undone (and the backend closed, once it exists).
    """
    try:
        options = options.validated()
        pair = options.upgrade_versions()
        requested = resolve(options.istio_version) if options.istio_version else None
        api = cluster.api
        server_version = api.server_version()
        with timer.phase("istio"):
            mesh = _prepare_istio(options, requested, cluster, timer, cache, undo, run)
        gateways = api.list("apps/v1", "Deployment", None, label_selector=istio.INGRESS_SELECTOR)
        gateway_ns = str(gateways[0]["metadata"]["namespace"]) if gateways else mesh.namespace
        backend = ClusterBackend(
            # an upgrade run keeps the version it ends on: the backend starts on the older
            options if pair is not None else options.with_version(str(mesh.version)),
            version=mesh.version,
            api=api,
            target=cluster.target,
            kubectl=str(cluster.kubectl),
            istioctl=str(mesh.istioctl),
            cache=cache,
            istio_namespace=mesh.namespace,
            gateway_namespace=gateway_ns,
            trust_domain=istio.trust_domain(api, mesh.namespace, mesh.revision),
            server_version=server_version,
            istio_installed_by_run=mesh.installed_by_run,
            undo=undo,
            timer=timer,
            kind=cluster.kind,
            run=run,
            upgrade_istioctl=str(mesh.upgrade_istioctl) if mesh.upgrade_istioctl else None,
        )
    except BaseException:
        undo.run(timer.progress)
        raise
    from securemetrics_e2e.catalog import SCENARIOS

    timer.progress("[cluster] this run creates (teardown removes these and nothing else):")
    for line in backend.creates(list(SCENARIOS) if scenarios is None else scenarios):
        timer.progress(f"[cluster]   - {line}")
    try:
        backend.deploy_scraper()
    except BaseException:
        backend.close()
        raise
    return backend
