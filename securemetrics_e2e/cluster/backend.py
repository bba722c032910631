"""The cluster backend: the conformance scenarios on kind or an existing cluster with Istio.

:func:`make_cluster_backend` prepares the cluster (see :mod:`.setup`), installs or
detects Istio and deploys the secure-metrics Prometheus; :class:`ClusterBackend`
implements the :class:`~securemetrics_e2e.backend.Backend` operations:

* ``deploy``: the scenario's chart-rendered objects, run-labelled, applied server-side
  in a namespace of its own with sidecar injection; patches to Istio's ingress gateway
  saved and undone; rollouts watched with fail-fast; diagnostics on failure.
* ``listeners``: ``pilot-agent request GET config_dump`` in ``istio-proxy``, parsed by
  :func:`securemetrics_e2e.configdump.listeners_from_config_dump`.
* ``scrape``: curl from the scraper's ``istio-proxy`` with ``/etc/istio-certs`` (the path
  Prometheus takes), plus the project's SPIFFE-checking probe through a verified
  port-forward where the pod's port is reachable that way.
* ``plaintext``: curl from inside the target pod or from the scraper pod.
* ``prometheus``: the scraper's API through the Kubernetes API service proxy.
* ``upgrade`` (an upgrade run, ``--upgrade-from``): the older Istio is installed at
  setup; the upgrade scenario's deployment is moved onto the newer one by the steps of
  :func:`.upgrade.upgrade_phase_steps`, the upgrade and switch phases ``--plan`` prints.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from securemetrics_e2e.backend import Backend, Credential, Deployment, Listener, Origin, Workload
from securemetrics_e2e.catalog import (
    UPGRADE,
    Feature,
    MtlsMode,
    RunUnit,
    Scenario,
    UnitKey,
    Variant,
    WorkloadSpec,
    upgraded_spec,
)
from securemetrics_e2e.cluster import diagnostics, istio, pins
from securemetrics_e2e.cluster.errors import DeployFailed, IstioConflict
from securemetrics_e2e.cluster.features import CLUSTER_FEATURES
from securemetrics_e2e.cluster.kube import KubeAPI, Obj, connect
from securemetrics_e2e.cluster.layout import (
    SCRAPER_DEPLOYMENT,
    ScraperPlan,
    VariantPlan,
    WorkloadLocator,
    kind_identity,
    planned_version,
    run_scope_reason,
    scraper_plan,
    skipped_variant,
    variant_plan,
)
from securemetrics_e2e.cluster.options import (
    ClusterOptions,
    add_cluster_options,
    options_from_pytest,
)
from securemetrics_e2e.cluster.plan import render_plan
from securemetrics_e2e.cluster.probing import Prober
from securemetrics_e2e.cluster.proxyconfig import env_waits, wait_for_env
from securemetrics_e2e.cluster.resources import (
    Workload as Rollout,
)
from securemetrics_e2e.cluster.resources import (
    delete_objects,
    delete_run_namespaces,
    is_ours,
    running_pods,
    wait_rollouts,
    with_run_label,
)
from securemetrics_e2e.cluster.rotation import (
    SCRAPE_INTERVAL_S,
    ClusterRotation,
    Timing,
    parse_go_duration,
)
from securemetrics_e2e.cluster.setup import (
    KindHandle,
    PhaseTimer,
    Progress,
    Undo,
    check_container_runtime,
    kind_cluster,
    resolve_istio,
    run_command,
    stderr_progress,
)
from securemetrics_e2e.cluster.steps import Plan, creates_lines
from securemetrics_e2e.cluster.tools import (
    ToolCache,
    istioctl_spec,
    kind_spec,
    kubectl_spec,
    resolve_tool,
)
from securemetrics_e2e.cluster.upgrade import (
    UPGRADE_PHASES,
    canary_revision,
    run_upgrade,
    upgrade_phase_steps,
)
from securemetrics_e2e.configdump import listeners_from_config_dump
from securemetrics_e2e.continuity import RotationRun
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.manifests import ROTATION_SECRET_TTL
from securemetrics_e2e.probe import PlaintextResult, ScrapeResult
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.spiffe import SpiffeId
from securemetrics_e2e.versions import DEFAULT_VERSION, IstioVersion, capabilities, resolve
from securemetrics_e2e.waiting import NotYet, wait_for

__all__ = [
    "ClusterBackend",
    "ClusterOptions",
    "PreparedCluster",
    "Runner",
    "add_cluster_options",
    "backend_from_pytest",
    "backend_on",
    "command_runner",
    "make_cluster_backend",
    "plan_from_pytest",
    "render_plan",
]

#: runs one command of the run (istioctl, kubectl); raises when it fails
Runner = Callable[[Sequence[str]], object]
#: the Undo step that uninstalls what this run installed (replaced after an upgrade)
UNINSTALL_STEP = "istioctl uninstall"


def command_runner(progress: Progress | None, *, timeout: float = 900.0) -> Runner:
    """A :data:`Runner` that runs the command, shows it, and raises DeployFailed on failure."""

    def run(argv: Sequence[str]) -> object:
        what = " ".join([Path(argv[0]).name, *argv[1:2]])
        return run_command(argv, timeout=timeout, what=what, progress=progress)

    return run


PROXY = "istio-proxy"
#: the Service the Prometheus Operator creates in front of every Prometheus it runs
OPERATOR_SERVICE = "prometheus-operated"
OPERATOR_PORT = 9090
CONFIG_DUMP = ("pilot-agent", "request", "GET", "config_dump")


@dataclasses.dataclass
class _Active:
    plan: VariantPlan
    deployment: Deployment


class ClusterBackend(Backend):
    """The :class:`Backend` operations on a cluster prepared by :func:`make_cluster_backend`."""

    target_timeout = 120.0  # Prometheus discovers, then scrapes every 15 s
    #: the scraper chart's scrape_interval, in which continuity is judged
    scrape_interval_s = SCRAPE_INTERVAL_S

    def __init__(
        self,
        options: ClusterOptions,
        *,
        version: IstioVersion,
        api: KubeAPI,
        target: istio.KubeTarget,
        kubectl: str,
        istioctl: str | None,
        cache: ToolCache,
        istio_namespace: str = "istio-system",
        gateway_namespace: str = "istio-system",
        trust_domain: str = "cluster.local",
        server_version: str = "",
        istio_installed_by_run: bool = False,
        undo: Undo | None = None,
        timer: PhaseTimer | None = None,
        kind: KindHandle | None = None,
        run: Runner | None = None,
        upgrade_istioctl: str | None = None,
    ) -> None:
        self._upgrade = options.upgrade_versions()
        if self._upgrade is not None and version != self._upgrade[0]:
            raise UsageError(
                f"an upgrade run starts on Istio {self._upgrade[0]} (--upgrade-from), and the "
                f"backend was given Istio {version}"
            )
        self.options = options
        self.name = options.mode
        self.version = version
        self.caps = capabilities(version)
        self.api = api
        self.target = target
        self.kubectl = kubectl
        self.istioctl = istioctl
        self.cache = cache
        self.istio_namespace = istio_namespace
        self.gateway_namespace = gateway_namespace
        self.trust_domain = trust_domain
        self.server_version = server_version
        self.istio_installed_by_run = istio_installed_by_run
        self.undo = undo or Undo()
        self.timer = timer or PhaseTimer(stderr_progress)
        self.kind = kind
        self.run = run or command_runner(self.timer.progress)
        self._upgrade_istioctl = upgrade_istioctl  # an upgrade run: the newer istioctl
        # The scraper is never restarted by an upgrade (see upgrade._restart_step): this
        # describes the one deployed, on the version the run started on.
        self.scraper: ScraperPlan = scraper_plan(version, options.run_id, revision=options.revision)
        self._active: dict[UnitKey, _Active] = {}
        self._saved_templates: dict[tuple[str, str, str], Any] = {}
        self.prober = Prober(
            api=api,
            scraper=self.scraper,
            kubectl=kubectl,
            target=target,
            trust_domain=trust_domain,
            run_id=options.run_id,
            progress=self.timer.progress,
        )
        self._gateway_api: str | None = None
        self._operator_ready = False
        self._closed = False

    # -- facts -------------------------------------------------------------------------

    @property
    def features(self) -> frozenset[Feature]:
        features = set(CLUSTER_FEATURES)
        if self.caps.native_secure_ports:
            features.add(Feature.NATIVE_SECURE_PORTS)
        if self.caps.localhost_only_metrics:
            features.add(Feature.LOCALHOST_ONLY_METRICS)
        return frozenset(features)

    def describe(self) -> dict[str, str]:
        facts = {
            "backend": self.name,
            "istio_version": str(self.version),
            "istio_installed_by_run": "yes" if self.istio_installed_by_run else "no",
            "kubernetes_version": self.server_version,
            "network": "Kubernetes pod network",
            "run_id": self.options.run_id,
            "trust_domain": self.trust_domain,
        }
        if self.kind is not None:
            facts["cluster"] = f"kind {self.kind.name}"
        elif self.target.context:
            facts["cluster"] = f"context {self.target.context}"
        for key, value in (
            ("istio_hub", self.options.hub),
            ("istio_tag", self.options.tag),
            ("istio_revision", self.options.revision),
            ("gateway_api", self._gateway_api),
        ):
            if value:
                facts[key] = value
        if self._upgrade is not None:
            old, new = self._upgrade
            how = f"canary revision {canary_revision(new)}" if self.options.canary else "in place"
            facts["upgrade"] = f"Istio {old} -> {new} ({how})"
        return facts

    def creates(self, scenarios: Sequence[Scenario]) -> list[str]:
        """What this run creates and where, as ``--plan`` lists it (:func:`creates_lines`)."""
        active = [
            v for s in scenarios for m in s.mtls_modes if (v := self.variant(s, m)).skip is None
        ]
        revision = self.options.revision or istio.DEFAULT_REVISION
        installs = (
            f"Istio control-plane revision {revision} in {self.istio_namespace} (installed "
            "by this run; removed by revision at teardown unless the cluster goes)"
            if self.istio_installed_by_run
            else f"no Istio: the installed control plane in {self.istio_namespace} is used"
        )
        return creates_lines(self.options, active, self.scraper, installs=installs)

    def scope_reason(self, scenario: Scenario) -> str | None:
        return run_scope_reason(scenario, self.options)

    def variant(
        self, scenario: Scenario, mode: MtlsMode, variant: Variant | None = None
    ) -> VariantPlan:
        variant = variant or scenario.variants[0]
        scope = self.scope_reason(scenario)
        if scope is not None:
            return skipped_variant(scenario, mode, self.options.run_id, scope, variant)
        return variant_plan(
            scenario,
            mode,
            self.version,
            self.options.run_id,
            istio_namespace=self.gateway_namespace,
            revision=self.options.revision,
            variant=variant,
        )

    # -- deploy / teardown -------------------------------------------------------------

    def deploy(
        self, scenario: Scenario, mtls_mode: MtlsMode, variant: Variant | None = None
    ) -> Deployment:
        key = RunUnit(scenario, mtls_mode, variant or scenario.variants[0]).key
        if key in self._active:
            return self._active[key].deployment
        plan = self.variant(scenario, mtls_mode, variant)
        self._check_deployable(plan, [a.plan for a in self._active.values()])
        outcome = self._deploy_plans([plan])[key]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def deploy_many(
        self, units: Sequence[RunUnit]
    ) -> dict[UnitKey, Deployment | SecureMetricsError]:
        """Deploy independent run units side by side and return each one's outcome.

        Everything is applied first, then the rollouts are awaited, so pods of all
        namespaces start together and the whole takes about as long as the slowest.
        A variant that would change what an earlier one holds (the classic ingress
        gateway) is left out of the result: deploy it after tearing the other down.
        """
        results: dict[UnitKey, Deployment | SecureMetricsError] = {}
        plans: list[VariantPlan] = []
        for unit in units:
            key = unit.key
            if key in self._active:
                results[key] = self._active[key].deployment
                continue
            plan = self.variant(unit.scenario, unit.mtls_mode, unit.variant)
            try:
                self._check_deployable(plan, [a.plan for a in self._active.values()] + plans)
            except DeployFailed:
                continue  # deferred: conflicts with a variant deployed now
            except SecureMetricsError as exc:
                results[key] = exc
                continue
            plans.append(plan)
        results.update(self._deploy_plans(plans))
        return results

    @staticmethod
    def _check_deployable(plan: VariantPlan, others: Sequence[VariantPlan]) -> None:
        if plan.skip is not None:
            raise UsageError(f"{plan.id} cannot run here: {plan.skip}")
        for other in others:
            shared = plan.conflicts(other)
            if shared:
                raise DeployFailed(
                    f"{plan.id} changes {shared}, which {other.id} "
                    "holds while it is deployed: deploy them one after the other (tear the "
                    "other down first)"
                )

    def _deploy_plans(
        self, plans: Sequence[VariantPlan]
    ) -> dict[UnitKey, Deployment | SecureMetricsError]:
        results: dict[UnitKey, Deployment | SecureMetricsError] = {}
        if not plans:
            return results
        label = plans[0].id if len(plans) == 1 else f"{len(plans)} variants"
        pending: list[VariantPlan] = []
        try:
            with self.timer.phase(f"deploy {label}"):
                if any(p.needs_gateway_api for p in plans):
                    self._ensure_gateway_api()
                if any(p.needs_operator for p in plans):
                    self._ensure_operator()
                for plan in plans:
                    pending.append(plan)
                    try:
                        self._apply_plan(plan)
                    except SecureMetricsError as exc:
                        results[plan.key] = exc
                        pending.remove(plan)
                        self._remove(plan)
                for plan in list(pending):
                    key = plan.key
                    try:
                        # the ProxyConfig path: the env first, then the rollout
                        wait_for_env(
                            self.api,
                            env_waits(plan.manifests),
                            timeout=self.options.rollout_timeout,
                        )
                        wait_rollouts(
                            self.api,
                            plan.rollouts,
                            timeout=self.options.rollout_timeout,
                            on_failure=partial(self._capture_one, plan),
                        )
                        workloads = tuple(self._locate(plan))
                    except SecureMetricsError as exc:
                        results[key] = exc
                        pending.remove(plan)
                        self._remove(plan)
                        continue
                    deployment = Deployment(
                        plan.scenario, plan.mtls_mode, plan.namespace, workloads, plan.variant
                    )
                    self._active[key] = _Active(plan, deployment)
                    results[key] = deployment
                    pending.remove(plan)
        except BaseException:
            for plan in pending:  # interrupted: nothing half-deployed stays behind
                self._remove(plan)
            raise
        return results

    def _apply_plan(self, plan: VariantPlan) -> None:
        for obj in plan.manifests:
            self.api.apply(obj)
        for patch in plan.patches:
            self._patch(patch.api_version, patch.kind, patch.name, patch.namespace, patch.body)

    def teardown(self, deployment: Deployment) -> None:
        active = self._active.pop(deployment.unit.key, None)
        if active is not None:
            self._remove(active.plan)

    def _remove(self, plan: VariantPlan) -> None:
        self.prober.forget(plan.namespace)
        held = {p.name for a in self._active.values() if a.plan is not plan for p in a.plan.patches}
        restored = [p for p in plan.patches if p.name not in held]
        for patch in restored:
            self._restore(patch.api_version, patch.kind, patch.name, patch.namespace)
        # The next holder (the legacy gateway after the native one) applies its own
        # configuration only once the restored pods run: a Gateway server on 15091 bound
        # while the old pods still carry ENVOY_SECURE_* would meet the native listener.
        wait_rollouts(
            self.api,
            [Rollout(p.kind, p.name, p.namespace) for p in restored if p.kind == "Deployment"],
            timeout=self.options.rollout_timeout,
        )
        if plan.solo:
            # the scraper restarts with its own template: the next variant needs it running
            wait_rollouts(
                self.api,
                [Rollout("Deployment", SCRAPER_DEPLOYMENT, self.scraper.namespace)],
                timeout=self.options.rollout_timeout,
            )
        outside = [
            m
            for m in plan.manifests
            if m.get("kind") != "Namespace"
            and (m.get("metadata") or {}).get("namespace") not in (None, plan.namespace)
        ]
        delete_objects(self.api, outside, self.options.run_id)
        namespace = self.api.get("v1", "Namespace", plan.namespace)
        if namespace is not None and is_ours(namespace, self.options.run_id):
            self.api.delete("v1", "Namespace", plan.namespace)

    def _patch(self, api_version: str, kind: str, name: str, namespace: str, body: Any) -> None:
        key = (kind, namespace, name)
        live = self.api.get(api_version, kind, name, namespace)
        if live is None:
            raise DeployFailed(
                f"{kind.lower()}/{name} does not exist in {namespace}: Istio was installed "
                "without it (the default profile has it); install it or run other scenarios "
                "with --scenario"
            )
        self._saved_templates.setdefault(key, istio.deployment_template(live))
        self.api.patch(api_version, kind, name, namespace, dict(body), patch_type="strategic")

    def _restore(self, api_version: str, kind: str, name: str, namespace: str) -> None:
        saved = self._saved_templates.pop((kind, namespace, name), None)
        if saved is None:
            return
        self.api.patch(
            api_version,
            kind,
            name,
            namespace,
            [{"op": "replace", "path": "/spec/template", "value": saved}],
            patch_type="json",
        )

    def _locate(self, plan: VariantPlan) -> list[Workload]:
        specs = {w.name: w for w in plan.scenario.workloads}
        found = []
        for loc in plan.locators:
            pods = running_pods(self.api, loc.namespace, loc.selector)
            if not pods:
                raise DeployFailed(
                    f"no running pod of {loc.name} ({loc.selector}) in {loc.namespace}"
                )
            found.append(self._workload(specs[loc.name], loc, pods[0]))
        return found

    def _workload(self, spec: WorkloadSpec, loc: WorkloadLocator, pod: Obj) -> Workload:
        """The workload a located pod runs, with the identity istiod signs for it.

        The SPIFFE ID is ``spiffe://<trust domain>/ns/<pod namespace>/sa/<pod's
        spec.serviceAccountName>``: istiod signs the service account of the pod's token
        (security/pkg/server/ca/authenticate/kubeauth/kube_jwt.go), so it is read from
        the pod, not assumed: istioctl names the ingress gateway's account
        ``istio-ingressgateway-service-account``, the Helm ``gateway`` chart names it
        after the release (ISTIO-FACTS.md "Gateways"). The catalog's name is only the
        fallback for a pod that names none (Kubernetes then runs it as ``default``).
        """
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        account = str((pod.get("spec") or {}).get("serviceAccountName") or "")
        return Workload(
            spec=spec,
            namespace=loc.namespace,
            pod_name=str(meta.get("name", "")),
            pod_ip=str(status.get("podIP", "")),
            spiffe_id=SpiffeId.for_workload(
                self.trust_domain, loc.namespace, account or loc.service_account
            ),
        )

    # -- shared installs ---------------------------------------------------------------

    def _apply_owned(self, objects: Sequence[Obj], what: str) -> None:
        labelled = [with_run_label(o, self.options.run_id) for o in objects]
        for obj in labelled:
            self.api.apply(obj)
        if not self.options.keep_cluster:
            self.undo.push(
                f"delete {what}", lambda: delete_objects(self.api, labelled, self.options.run_id)
            )

    def _ensure_gateway_api(self) -> None:
        if self._gateway_api is not None:
            return
        wanted = self.caps.gateway_api_version
        installed = istio.gateway_api_installed(self.api)
        if installed is None:
            with self.timer.phase(f"Gateway API {wanted} CRDs"):
                objects = istio.gateway_api_objects(wanted, self.cache)
                self._apply_owned(objects, f"Gateway API {wanted} CRDs")
                self._wait_established(
                    [o for o in objects if o["kind"] == "CustomResourceDefinition"]
                )
            self._gateway_api = f"{wanted} (installed by this run)"
        else:
            if installed != wanted:
                self.timer.progress(
                    f"[cluster] note: Gateway API {installed} is installed; Istio "
                    f"{self.version} expects {wanted} (istioctl analyze reports IST0176)"
                )
            self._gateway_api = f"{installed} (found installed)"

    def _ensure_operator(self) -> None:
        if self._operator_ready:
            return
        crd, running = istio.operator_installed(self.api)
        if not running:
            with self.timer.phase(f"Prometheus Operator {pins.PROMETHEUS_OPERATOR_VERSION}"):
                objects = istio.operator_objects(self.cache, include_crds=not crd)
                self._apply_owned(objects, "the Prometheus Operator bundle")
                self._wait_established(
                    [o for o in objects if o["kind"] == "CustomResourceDefinition"]
                )
                deployments = [
                    Rollout(
                        "Deployment",
                        o["metadata"]["name"],
                        o["metadata"].get("namespace", "default"),
                    )
                    for o in objects
                    if o["kind"] == "Deployment"
                ]
                wait_rollouts(self.api, deployments, timeout=self.options.rollout_timeout)
        self._operator_ready = True

    def _wait_established(self, crds: Sequence[Obj], timeout: float = 60.0) -> None:
        from securemetrics_e2e.waiting import NotYet, wait_for

        def established() -> None:
            for crd in crds:
                live = self.api.get(
                    "apiextensions.k8s.io/v1", "CustomResourceDefinition", crd["metadata"]["name"]
                )
                conditions = ((live or {}).get("status") or {}).get("conditions") or []
                if not any(
                    c.get("type") == "Established" and c.get("status") == "True" for c in conditions
                ):
                    raise NotYet(f"CRD {crd['metadata']['name']} not established yet")

        wait_for("installed CRDs to be established", established, timeout=timeout)

    # -- observing ---------------------------------------------------------------------

    def pod_annotations(self, workload: Workload) -> dict[str, str]:
        """The running pod's annotations as the API server admitted it (after the
        sidecar injector's mutation)."""
        pod = self.api.get("v1", "Pod", workload.pod_name, workload.namespace)
        if pod is None:
            raise SecureMetricsError(
                f"pod {workload.pod_name} of {workload.name} is gone from {workload.namespace}"
            )
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        return {str(k): str(v) for k, v in annotations.items()}

    def listeners(self, workload: Workload) -> list[Listener]:
        result = self.api.exec(
            workload.namespace, workload.pod_name, PROXY, CONFIG_DUMP, timeout=60
        )
        if result.exit_code != 0:
            raise SecureMetricsError(
                f"`{' '.join(CONFIG_DUMP)}` in {workload.namespace}/{workload.pod_name} "
                f"({PROXY}) failed with exit {result.exit_code}: {result.stderr.strip()[:300]}"
            )
        try:
            dump = json.loads(result.stdout)
        except ValueError as exc:
            raise SecureMetricsError(
                f"config_dump of {workload.namespace}/{workload.pod_name} is not JSON ({exc}): "
                f"{result.stdout[:200]!r}"
            ) from None
        return listeners_from_config_dump(dump)

    def scrape(
        self,
        workload: Workload,
        port: int,
        path: str = "/stats/prometheus",
        credential: Credential = Credential.SCRAPER,
    ) -> ScrapeResult:
        return self.prober.scrape(workload, port, path, credential)

    def plaintext(
        self, workload: Workload, port: int, origin: Origin, path: str = "/stats/prometheus"
    ) -> PlaintextResult:
        return self.prober.plaintext(workload, port, origin, path)

    def run_rotation(
        self, workload: Workload, *, rotations: int = 2, timing: Timing | None = None
    ) -> RotationRun:
        """Watch the agents renew the workload's and the scraper's certificates.

        Unlike the local backend, nothing is issued here: the rotation scenario runs its
        workload and (patched) scraper with a short SECRET_TTL, and this waits for at
        least ``rotations`` renewals of each, every one served and scraped UP, then
        measures continuity from this run's Prometheus (see :mod:`.rotation`).
        """
        ttl = parse_go_duration(ROTATION_SECRET_TTL)
        driver = ClusterRotation(
            self.api,
            scraper_namespace=self.scraper.namespace,
            scraper_pod=self.prober.scraper_pod,
            prometheus=self.prometheus,
            timing=timing or Timing.for_ttl(ttl),
            rotations=rotations,
            progress=self.timer.progress,
        )
        with self.timer.phase(f"rotation {workload.namespace}/{workload.pod_name}"):
            return driver.run(workload)

    def prometheus(self) -> PrometheusAPI:
        return PrometheusAPI(
            self.api.service_proxy_url(
                self.scraper.namespace, self.scraper.service, self.scraper.port
            ),
            session=self.api.http_session(),
            timeout=10.0,
        )

    def prometheus_for(self, deployment: Deployment) -> PrometheusAPI:
        """The operator's Prometheus for servicemonitor (its governing Service
        ``prometheus-operated``, port 9090, in the scenario namespace); else the scraper."""
        if Feature.PROMETHEUS_OPERATOR not in deployment.scenario.features:
            return self.prometheus()
        return PrometheusAPI(
            self.api.service_proxy_url(deployment.namespace, OPERATOR_SERVICE, OPERATOR_PORT),
            session=self.api.http_session(),
            timeout=10.0,
        )

    def deploy_scraper(self) -> None:
        """The secure-metrics Prometheus, in a run-labelled namespace of its own."""
        with self.timer.phase("scraper"):
            for obj in self.scraper.manifests:
                self.api.apply(obj)
            wait_rollouts(
                self.api,
                [Rollout("Deployment", SCRAPER_DEPLOYMENT, self.scraper.namespace)],
                timeout=self.options.rollout_timeout,
                on_failure=lambda message: self._capture([], "scraper", message),
            )

    # -- the upgrade scenario ----------------------------------------------------------

    def upgrade_versions(self) -> tuple[IstioVersion, IstioVersion]:
        """(the version this run started on, the one it upgrades to)."""
        if self._upgrade is None:
            raise UsageError(self.scope_reason(UPGRADE) or "this is not an upgrade run")
        return self._upgrade

    def upgrade(self, deployment: Deployment) -> Deployment:
        """Upgrade Istio and move ``deployment`` (the upgrade scenario) onto it.

        Runs the ``upgrade`` phase (istioctl in place or by canary revision, then a
        restart of the workload, never of the scraper), moves this backend to the new
        version, runs the ``switch`` phase (native secure ports where the new version
        has them), and returns the deployment with its new pods and specs. The steps
        are the plan's (:func:`.upgrade.upgrade_phase_steps`), for the cluster as
        connected: this run's kubeconfig, context and Istio namespace.
        """
        old, new = self.upgrade_versions()
        key = deployment.unit.key
        active = self._active.get(key)
        if deployment.scenario.name != UPGRADE.name or active is None:
            raise UsageError(
                f"upgrade() moves the deployed {UPGRADE.name} scenario; "
                f"{deployment.unit.id} is not it "
                "(deploy it first)"
            )
        if self.version != old:
            raise SecureMetricsError(f"this run already upgraded Istio {old} to {self.version}")
        steps = upgrade_phase_steps(
            self.options,
            active.plan,
            self.target,
            scraper_namespace=self.scraper.namespace,
            istio_namespace=self.istio_namespace,
        )
        old_ctl = self.istioctl or str(resolve_tool(istioctl_spec(str(old)), self.cache).path)
        new_ctl = self._upgrade_istioctl or str(
            resolve_tool(istioctl_spec(str(new)), self.cache).path
        )
        tools = {f"istioctl-{old}": old_ctl, f"istioctl-{new}": new_ctl, "kubectl": self.kubectl}
        replaced = {w.pod_name for w in deployment.workloads}

        def execute(phase: str) -> None:
            run_upgrade(
                steps,
                self.api,
                tools=tools,
                run=self.run,
                rollout_timeout=self.options.rollout_timeout,
                progress=self.timer.progress,
                phases=(phase,),
            )

        upgrade, switch = UPGRADE_PHASES
        with self.timer.phase(f"upgrade Istio {old} -> {new}"):
            if self.options.canary:
                self._undo_canary(new, new_ctl)
            execute(upgrade)
            self._now_on(new, new_ctl)
            execute(switch)
            self.prober.forget(deployment.namespace)  # its port-forwards led to the old pod
            workloads = tuple(self._relocate(active.plan, deployment, replaced))
        upgraded = Deployment(
            deployment.scenario,
            deployment.mtls_mode,
            deployment.namespace,
            workloads,
            deployment.variant,
        )
        self._active[key] = _Active(active.plan, upgraded)
        return upgraded

    def _now_on(self, version: IstioVersion, istioctl: str) -> None:
        """The control plane runs ``version`` now: so does everything judged from here."""
        self.version = version
        self.caps = capabilities(version)
        self.istioctl = istioctl
        if not (self.istio_installed_by_run and removes_istio(self.options, self.kind)):
            return  # a control plane the run found is upgraded and left so, never removed
        # what this run installed, removed revision by revision with the istioctl of what
        # runs now (never --purge: istio.uninstall_command)
        uninstall = istio.uninstall_command(istioctl, self.target, revision=None)
        self.undo.replace(UNINSTALL_STEP, lambda: self.run(uninstall))

    def _undo_canary(self, new: IstioVersion, istioctl: str) -> None:
        """Before the canary is installed: its revision and the default tag the run sets
        are the run's to remove (newest first: the tag, then the revision)."""
        if not (self.istio_installed_by_run and removes_istio(self.options, self.kind)):
            return
        rev = canary_revision(new)
        canary = istio.uninstall_command(istioctl, self.target, revision=rev)
        self.undo.push(f"{UNINSTALL_STEP} {rev}", lambda: self.run(canary))
        untag = istio.tag_remove_command(istioctl, self.target, "default")
        self.undo.push("istioctl tag remove default", lambda: self.run(untag))

    def _relocate(
        self, plan: VariantPlan, deployment: Deployment, replaced: Collection[str]
    ) -> list[Workload]:
        """The workloads' new pods (not one of ``replaced``), each checked to run the
        new version's proxy, with the spec the upgrade switched them to."""
        specs = {
            w.name: upgraded_spec(w.spec, self.caps.native_secure_ports)
            for w in deployment.workloads
        }
        found = []
        for loc in plan.locators:

            def new_pod(loc: WorkloadLocator = loc) -> Obj:
                pods = [
                    p
                    for p in running_pods(self.api, loc.namespace, loc.selector)
                    if (p.get("metadata") or {}).get("name") not in replaced
                ]
                if not pods:
                    raise NotYet(f"no running pod of {loc.name} other than {sorted(replaced)}")
                return pods[0]

            pod = wait_for(
                f"the restarted pod of {loc.name} in {loc.namespace}",
                new_pod,
                timeout=self.options.rollout_timeout,
                interval=0.2,
                max_interval=2.0,
            )
            meta = pod.get("metadata") or {}
            image = _proxy_image(pod)
            running = istio.version_from_image(image) if image else None
            if running is not None and running != str(self.version):
                raise DeployFailed(
                    f"pod {meta.get('name')} in {loc.namespace} runs istio-proxy {image} after "
                    f"the upgrade, not Istio {self.version}: the sidecar injector still serves "
                    "the old version"
                    + (
                        f" (is the default revision tag on {canary_revision(self.version)}?)"
                        if self.options.canary
                        else ""
                    )
                )
            found.append(self._workload(specs[loc.name], loc, pod))
        return found

    # -- diagnostics and the end -------------------------------------------------------

    def capture_diagnostics(self, deployment: Deployment | None, reason: str) -> Path:
        """Write diagnostics for ``deployment`` (or every active one); call before teardown."""
        if deployment is not None:
            active = self._active.get(deployment.unit.key)
            plans = [active.plan] if active else []
            label = (
                f"{deployment.scenario.name}-{deployment.mtls_mode.value}-{deployment.variant.id}"
            )
        else:
            plans = [a.plan for a in self._active.values()]
            label = "run"
        return self._capture(plans, label, reason)

    def _capture_one(self, plan: VariantPlan, reason: str) -> Path:
        return self._capture([plan], plan.id, reason)

    def _capture(self, plans: Sequence[VariantPlan], label: str, reason: str) -> Path:
        namespaces = [p.namespace for p in plans]
        if any(p.patches for p in plans):
            namespaces.append(self.gateway_namespace)
        namespaces.append(self.scraper.namespace)

        def targets() -> Any:
            api = self.prometheus()
            return {
                "active": [dataclasses.asdict(t) for t in api.active_targets()],
                "config": api.config_yaml(),
            }

        directory = diagnostics.collect(
            self.api,
            artifacts_dir=self.options.artifacts_dir,
            label=label,
            reason=reason,
            namespaces=namespaces,
            istioctl=self.istioctl,
            target=self.target,
            prometheus_targets=targets,
        )
        self.timer.progress(f"[cluster] diagnostics for {label}: {directory}")
        return directory

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self.timer.phase("teardown"):
            self.prober.close()
            for active in list(self._active.values()):
                self._remove(active.plan)
            self._active.clear()
            delete_objects(self.api, list(self.scraper.manifests), self.options.run_id)
            self.undo.run(self.timer.progress)
            if not (self.kind is not None and self.kind.created and not self.options.keep_cluster):
                # the cluster stays: make sure nothing labelled with this run does
                delete_run_namespaces(self.api, self.options.run_id)
            close = getattr(self.api, "close", None)
            if callable(close):
                close()
        self.timer.progress(self.timer.summary())


def _proxy_image(pod: Obj) -> str | None:
    """The image of the pod's istio-proxy (a container, or a native-sidecar init container)."""
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        if container.get("name") == PROXY:
            return str(container.get("image", "")) or None
    return None


# -- building one ----------------------------------------------------------------------


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


def removes_istio(options: ClusterOptions, kind: KindHandle | None) -> bool:
    """Whether teardown uninstalls the revisions this run installed: not with
    --keep-cluster, and not on a kind cluster this run created (deleting the cluster
    removes them); on an existing or reused cluster, by revision only."""
    if options.keep_cluster:
        return False
    return not (kind is not None and kind.created)


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


# -- pytest ----------------------------------------------------------------------------


def _chosen_scenarios(config: Any) -> list[Scenario]:
    from securemetrics_e2e.catalog import SCENARIOS, scenario

    names = [n for opt in (config.getoption("--scenario") or []) for n in opt.split(",") if n]
    return [scenario(n) for n in names] if names else list(SCENARIOS)


def _check_selection(options: ClusterOptions, chosen: Sequence[Scenario]) -> None:
    """An upgrade run deploys the upgrade scenario only: refuse a selection without it."""
    if options.upgrade_from is not None and all(s.name != UPGRADE.name for s in chosen):
        names = ", ".join(s.name for s in chosen)
        raise UsageError(
            f"--upgrade-from makes an upgrade run, which deploys only the {UPGRADE.name} "
            f"scenario, and --scenario selects {names}: add --scenario {UPGRADE.name} or drop "
            "--upgrade-from"
        )


def plan_from_pytest(config: Any, version: str | None) -> Plan:
    """The plan of the run pytest's options describe (for ``--plan``); with
    ``--upgrade-from``, the upgrade run's plan."""
    options = options_from_pytest(config, version)
    chosen = _chosen_scenarios(config)
    _check_selection(options, chosen)
    return render_plan(options, chosen)


def print_plan(config: Any, version: str | None) -> None:
    """Write the plan to the terminal, past pytest's output capture."""
    text = plan_from_pytest(config, version).render_text()
    capture = config.pluginmanager.get_plugin("capturemanager")
    disabled = capture.global_and_fixture_disabled() if capture is not None else None
    if disabled is not None:
        with disabled:
            sys.stdout.write(text)
            sys.stdout.flush()
    else:
        sys.stdout.write(text)


def backend_from_pytest(config: Any, version: str | None) -> ClusterBackend:
    """The backend pytest's options describe; with ``--plan``, print the plan and exit."""
    if config.getoption("--plan"):
        import pytest

        print_plan(config, version)
        pytest.exit("--plan: the plan above was printed; nothing was executed", returncode=0)
    options = options_from_pytest(config, version)
    _check_selection(options, _chosen_scenarios(config))
    progress: Callable[[str], None] = stderr_progress
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        progress = reporter.write_line
    return make_cluster_backend(options, progress=progress, scenarios=_chosen_scenarios(config))
