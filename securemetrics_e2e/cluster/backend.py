"""The cluster backend: the conformance scenarios on kind or an existing cluster with Istio.

:func:`.bootstrap.make_cluster_backend` prepares the cluster (see :mod:`.setup`),
installs or detects Istio and deploys the secure-metrics Prometheus; :class:`ClusterBackend`
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
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from securemetrics_e2e.backend import Backend, Credential, Deployment, Listener, Origin, Workload
from securemetrics_e2e.catalog import (
    Feature,
    MtlsMode,
    RunUnit,
    Scenario,
    UnitKey,
    Variant,
)
from securemetrics_e2e.cluster import diagnostics, istio
from securemetrics_e2e.cluster.errors import DeployFailed
from securemetrics_e2e.cluster.features import CLUSTER_FEATURES
from securemetrics_e2e.cluster.kube import KubeAPI
from securemetrics_e2e.cluster.layout import (
    SCRAPER_DEPLOYMENT,
    SCRAPER_SELECTOR,
    ScraperPlan,
    VariantPlan,
    run_scope_reason,
    scraper_plan,
    skipped_variant,
    variant_plan,
)
from securemetrics_e2e.cluster.locate import Active, locate
from securemetrics_e2e.cluster.options import (
    ClusterOptions,
)
from securemetrics_e2e.cluster.probing import Prober
from securemetrics_e2e.cluster.provenance import running_images
from securemetrics_e2e.cluster.proxyconfig import env_waits, wait_for_env
from securemetrics_e2e.cluster.resources import (
    Rollout,
    delete_objects,
    delete_run_namespaces,
    is_ours,
    wait_rollouts,
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
    Runner,
    Undo,
    command_runner,
    stderr_progress,
)
from securemetrics_e2e.cluster.shared import SharedInstalls
from securemetrics_e2e.cluster.steps import creates_lines
from securemetrics_e2e.cluster.tools import (
    ToolCache,
)
from securemetrics_e2e.cluster.upgrade import (
    canary_revision,
)
from securemetrics_e2e.cluster.upgrading import UpgradeOperations
from securemetrics_e2e.configdump import listeners_from_config_dump
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.istionames import PROXY_CONTAINER
from securemetrics_e2e.manifests import ROTATION_SECRET_TTL
from securemetrics_e2e.probe import PlaintextResult, ScrapeResult
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.rotation import RotationRun
from securemetrics_e2e.timeouts import CLUSTER
from securemetrics_e2e.versions import IstioVersion, capabilities

#: the Service the Prometheus Operator creates in front of every Prometheus it runs
OPERATOR_SERVICE = "prometheus-operated"
OPERATOR_PORT = 9090
CONFIG_DUMP = ("pilot-agent", "request", "GET", "config_dump")


class ClusterBackend(UpgradeOperations, Backend):
    """The :class:`Backend` operations on a cluster that
    :func:`.bootstrap.make_cluster_backend` prepared."""

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
        self.timeouts = dataclasses.replace(CLUSTER, rollout=options.rollout_timeout)
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
        self._active: dict[UnitKey, Active] = {}
        self.shared = SharedInstalls(api, options, cache=cache, timer=self.timer, undo=self.undo)
        self.prober = Prober(
            api=api,
            scraper=self.scraper,
            kubectl=kubectl,
            target=target,
            trust_domain=trust_domain,
            run_id=options.run_id,
            progress=self.timer.progress,
        )
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
            ("gateway_api", self.shared.gateway_api),
        ):
            if value:
                facts[key] = value
        if self._upgrade is not None:
            old, new = self._upgrade
            how = f"canary revision {canary_revision(new)}" if self.options.canary else "in place"
            facts["upgrade"] = f"Istio {old} -> {new} ({how})"
        try:  # what really ran, read back from the pods (cluster/provenance.py)
            facts.update(
                running_images(
                    self.api,
                    istio_namespace=self.istio_namespace,
                    revision=self.options.revision,
                    scraper_namespace=self.scraper.namespace,
                    scraper_selector=SCRAPER_SELECTOR,
                )
            )
        except Exception as exc:  # the report must be written even if the cluster is gone
            facts["provenance_error"] = f"could not read the running images: {exc}"
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
                    self.shared.ensure_gateway_api(self.caps.gateway_api_version, str(self.version))
                if any(p.needs_operator for p in plans):
                    self.shared.ensure_operator()
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
                            timeout=self.timeouts.rollout,
                        )
                        wait_rollouts(
                            self.api,
                            plan.rollouts,
                            timeout=self.timeouts.rollout,
                            on_failure=partial(self._capture_one, plan),
                        )
                        workloads = tuple(locate(self.api, plan, self.trust_domain))
                    except SecureMetricsError as exc:
                        results[key] = exc
                        pending.remove(plan)
                        self._remove(plan)
                        continue
                    deployment = Deployment(
                        plan.scenario, plan.mtls_mode, plan.namespace, workloads, plan.variant
                    )
                    self._active[key] = Active(plan, deployment)
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
            self.shared.patch(
                patch.api_version, patch.kind, patch.name, patch.namespace, patch.body
            )

    def teardown(self, deployment: Deployment) -> None:
        active = self._active.pop(deployment.unit.key, None)
        if active is not None:
            self._remove(active.plan)

    def _remove(self, plan: VariantPlan) -> None:
        self.prober.forget(plan.namespace)
        held = {p.name for a in self._active.values() if a.plan is not plan for p in a.plan.patches}
        restored = [p for p in plan.patches if p.name not in held]
        for patch in restored:
            self.shared.restore(patch.api_version, patch.kind, patch.name, patch.namespace)
        # The next holder (the legacy gateway after the native one) applies its own
        # configuration only once the restored pods run: a Gateway server on 15091 bound
        # while the old pods still carry ENVOY_SECURE_* would meet the native listener.
        wait_rollouts(
            self.api,
            [Rollout(p.kind, p.name, p.namespace) for p in restored if p.kind == "Deployment"],
            timeout=self.timeouts.rollout,
        )
        if plan.solo:
            # the scraper restarts with its own template: the next variant needs it running
            wait_rollouts(
                self.api,
                [Rollout("Deployment", SCRAPER_DEPLOYMENT, self.scraper.namespace)],
                timeout=self.timeouts.rollout,
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
            workload.namespace, workload.pod_name, PROXY_CONTAINER, CONFIG_DUMP, timeout=60
        )
        if result.exit_code != 0:
            raise SecureMetricsError(
                f"`{' '.join(CONFIG_DUMP)}` in {workload.namespace}/{workload.pod_name} "
                f"({PROXY_CONTAINER}) failed with exit {result.exit_code}: "
                f"{result.stderr.strip()[:300]}"
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
        return self.prober.scrape(
            workload, port, path, credential, timeout=self.timeouts.scrape_request
        )

    def plaintext(
        self, workload: Workload, port: int, origin: Origin, path: str = "/stats/prometheus"
    ) -> PlaintextResult:
        seconds = self.timeouts.plaintext_request
        return self.prober.plaintext(workload, port, origin, path, timeout=seconds)

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
            timing=timing or Timing.for_ttl(ttl, scrape_request=self.timeouts.scrape_request),
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
                timeout=self.timeouts.rollout,
                on_failure=lambda message: self._capture([], "scraper", message),
            )

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
