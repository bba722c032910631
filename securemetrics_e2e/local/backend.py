"""The local backend: Istio's secure-metrics data plane rebuilt from real parts.

Per backend (what a cluster has once): a pod network, a mesh CA, and the scraper pod
running a real Prometheus loaded with the chart's scrape configuration. Per deployed
scenario (what a namespace holds on a cluster): one pod per workload with a real Envoy
configured as pilot-agent configures it, the agent's status port, and for sidecars the
application. Deploying or removing a scenario rewrites the file_sd file, as pods
appearing and disappearing would change Kubernetes discovery.
Continuity windows run beside other checks (:mod:`securemetrics_e2e.windows`): units
and file_sd change under one lock; probes present a copy of the scraper's files.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from securemetrics_e2e import progress
from securemetrics_e2e.backend import Backend, Credential, Deployment, Listener, Origin, Workload
from securemetrics_e2e.catalog import (
    APP_PORT,
    Feature,
    MetricsMode,
    MtlsMode,
    RunUnit,
    Scenario,
    UnitKey,
    Variant,
    WorkloadKind,
    WorkloadSpec,
    upgraded_spec,
)
from securemetrics_e2e.continuity import Missing, wait_scraped
from securemetrics_e2e.errors import EnvironmentProblem, SecureMetricsError, UsageError
from securemetrics_e2e.local import capture, promconfig
from securemetrics_e2e.local.agent import start_agent
from securemetrics_e2e.local.app import start_app
from securemetrics_e2e.local.bootstrap import SdsFiles, build_bootstrap
from securemetrics_e2e.local.envoy import Envoy
from securemetrics_e2e.local.faults import SCRAPER_FAULTS, Fault
from securemetrics_e2e.local.gatewaymodel import GeneratedGateway, unit_gateway
from securemetrics_e2e.local.httpserver import PodHTTPServer
from securemetrics_e2e.local.identities import IdentityOperations
from securemetrics_e2e.local.netns import LoopbackNetwork, PodNetwork
from securemetrics_e2e.local.owner import new_run_id, stop_own, sweep
from securemetrics_e2e.local.pods import (
    SCRAPER_NAMESPACE,
    SCRAPER_SERVICE_ACCOUNT,
    DeploymentRuntime,
    WorkloadRuntime,
    container_ports,
    pod_annotations,
    unit_manifests,
)
from securemetrics_e2e.local.promserver import PrometheusServer
from securemetrics_e2e.local.provenance import stand_ins
from securemetrics_e2e.pki import MeshCA, OutputCerts
from securemetrics_e2e.probe import PlaintextResult, ScrapeResult, attempt_plaintext, scrape_mtls
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.spiffe import SpiffeId
from securemetrics_e2e.timeouts import LOCAL
from securemetrics_e2e.versions import (
    DEFAULT_VERSION,
    IstioVersion,
    capabilities,
    previous_minor,
    resolve,
    upgrade_pair,
)

#: per captured pod: one line per virtualInbound connection (chain, TLS, peer)
INBOUND_ACCESS_LOG = "inbound-access.log"
_counter = itertools.count()


class LocalBackend(IdentityOperations, Backend):
    """Scenarios on this machine: network namespaces, Envoy, Prometheus, a mesh CA."""

    name = "local"
    windows_beside_checks = True  # what a window changes is renewed atomically for others

    def __init__(
        self,
        *,
        network: str = "auto",
        fault: Fault | None = None,
        scrape_interval: str = "1s",
        trust_domain: str = "cluster.local",
        istio_version: str = "",
        upgrade_from: str | None = None,
        workdir: Path | None = None,
        artifacts_dir: Path = Path("artifacts"),
    ) -> None:
        if network not in ("auto", "netns", "loopback"):
            raise UsageError(f"unknown local network {network!r}; use auto, netns or loopback")
        self.scrape_interval_s = promconfig.duration_seconds(scrape_interval)
        if upgrade_from:  # bad input fails before anything starts
            upgrade_pair(upgrade_from, istio_version or str(DEFAULT_VERSION))
        self.upgrade_from = upgrade_from
        self.fault = fault
        self.artifacts_dir = artifacts_dir
        self.istio_version = istio_version
        self._network_choice = network
        self._scrape_interval = scrape_interval
        self.timeouts = LOCAL
        self._trust_domain = trust_domain
        self._workdir_parent = workdir
        self._started = False
        self._active: dict[str, DeploymentRuntime] = {}
        self._lock = threading.RLock()  # ``_active`` and file_sd: windows run in threads
        self._scraper_lock = threading.Lock()
        self.unavailable_reason: str | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def _start(self) -> None:
        # what a killed run left (its owner gone) goes first; a live run's stays
        swept = sweep((self._workdir_parent,) if self._workdir_parent else ())
        if swept:
            progress.note(f"removed what an interrupted earlier run left: {swept.summary()}")
        self.run_id = new_run_id()
        self.workdir = Path(
            tempfile.mkdtemp(prefix=f"smx-{self.run_id}-", dir=self._workdir_parent)
        )
        self._started = True  # from here on close() has something to clean up
        why_not = None if self._network_choice == "loopback" else PodNetwork.available()
        if self._network_choice == "netns" and why_not:
            raise EnvironmentProblem(f"--local-network netns requested but {why_not}")
        self.network: PodNetwork | LoopbackNetwork
        if why_not is None and self._network_choice != "loopback":
            self.network = PodNetwork(self.run_id)
        else:
            self.unavailable_reason = why_not or "loopback network requested"
            self.network = LoopbackNetwork(self.run_id)
        self.ca = MeshCA.create(self._trust_domain)
        self.foreign_ca = MeshCA.create(self._trust_domain)
        self.scraper_pod = self.network.add_pod("prometheus")
        scraper = self.ca.issue(SCRAPER_NAMESPACE, SCRAPER_SERVICE_ACCOUNT)
        # The agent writes OUTPUT_CERTS before Prometheus starts (istio#10544: a
        # Prometheus started before the files exist never retries).
        self.scraper_certs: OutputCerts = scraper.write_output_certs(self.workdir / "istio-certs")
        self.foreign_certs = self.foreign_ca.issue(
            SCRAPER_NAMESPACE, SCRAPER_SERVICE_ACCOUNT
        ).write_output_certs(self.workdir / "foreign-certs")
        self.sd_file = self.workdir / "pods.json"
        promconfig.write_sd_file(self.sd_file, [])
        chart_text = promconfig.chart_scrape_config_path().read_text()
        config = promconfig.local_scrape_config(
            chart_text,
            sd_file=self.sd_file,
            certs_dir=self.scraper_certs.directory,
            scrape_interval=self._scrape_interval,
        )
        if self.fault is Fault.SCRAPE_JOB_PLAINTEXT:
            config = promconfig.scrape_plaintext_envoy_port(config)
        prom_dir = self.workdir / "prometheus"
        prom_dir.mkdir()
        self.prometheus_server = PrometheusServer(self.scraper_pod, prom_dir, config)
        self.prometheus_server.start(self.timeouts.scraper_ready)

    def close(self) -> None:
        """Stop every process and remove every namespace and file this backend made."""
        if not self._started:
            return
        self._started = False
        errors: list[str] = []
        for runtime in list(self._active.values()):
            try:
                self.teardown(runtime.deployment)
            except Exception as exc:  # keep cleaning; report at the end
                errors.append(str(exc))
        server = getattr(self, "prometheus_server", None)
        if server is not None:
            server.stop()
        stop_own(self.run_id)  # one a stop signal orphaned before its PID was recorded
        network = getattr(self, "network", None)
        if network is not None:
            try:
                network.close()
            except Exception as exc:
                errors.append(str(exc))
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise EnvironmentProblem("cleanup incomplete: " + "; ".join(errors))

    # -- the seam ----------------------------------------------------------------------

    @property
    def features(self) -> frozenset[Feature]:
        # The data plane of any version can be rebuilt here; what needs istiod, iptables
        # capture or the Prometheus Operator cannot.
        features = {
            Feature.NATIVE_SECURE_PORTS,
            Feature.LOCALHOST_ONLY_METRICS,
            Feature.CERT_ROTATION,  # the run's own CA re-issues through file-based SDS
            Feature.MESH_UPGRADE,  # pods are replaced by pods with the new configuration
        }
        if self._network_choice != "loopback" and (
            not self._started or isinstance(self.network, PodNetwork)
        ):
            features.add(Feature.POD_ISOLATION)
            if self.capture_unavailable_reason() is None:
                features.add(Feature.INBOUND_CAPTURE)
        return frozenset(features)

    def capture_unavailable_reason(self) -> str | None:
        """Why sidecar pods get no inbound capture here (None: they do)."""
        if self._network_choice == "loopback":
            return "the loopback network has no pod namespaces to hold iptables rules"
        return PodNetwork.available() or capture.unavailable_reason()

    def describe(self) -> dict[str, str]:
        network = getattr(self, "network", None)
        return {
            "backend": self.name,
            "istio_version": self.istio_version,
            "network": network.kind if network is not None else self._network_choice,
            "fault": str(self.fault or ""),
            # the report says whether STRICT and legacy units ran through Istio's inbound path
            "inbound_capture": f"off: {why_not}"
            if (why_not := self.capture_unavailable_reason())
            else "istio-iptables REDIRECT to virtualInbound (15006) in each sidecar pod",
            **stand_ins(),  # what stood in for the mesh: recorded in the report
        }

    def deploy(
        self,
        scenario: Scenario,
        mtls_mode: MtlsMode,
        variant: Variant | None = None,
        *,
        fault: Fault | None = None,
    ) -> Deployment:
        """Deploy ``scenario`` in ``variant``; ``fault`` breaks this deployment's data plane
        only (a negative control beside healthy or other broken deployments, one Prometheus)."""
        runtime = self._begin(RunUnit(scenario, mtls_mode, variant or scenario.variants[0]), fault)
        self._finish([runtime])
        return runtime.deployment

    def deploy_many(
        self, units: Sequence[RunUnit]
    ) -> dict[UnitKey, Deployment | SecureMetricsError]:
        """Start every run unit's pods, then wait for all their proxies at once."""
        results: dict[UnitKey, Deployment | SecureMetricsError] = {}
        started: list[DeploymentRuntime] = []
        for unit in units:
            try:
                started.append(self._begin(unit, None))
            except SecureMetricsError as exc:
                results[unit.key] = exc
        for runtime in started:
            key = runtime.deployment.unit.key
            try:
                self._finish([runtime])
                results[key] = runtime.deployment
            except SecureMetricsError as exc:
                results[key] = exc
        return results

    def deploy_with_faults(
        self, items: Sequence[tuple[Scenario, MtlsMode, Fault] | tuple[RunUnit, Fault]]
    ) -> list[Deployment]:
        """Negative controls side by side: each item a broken deployment of its own,
        started together and awaited together."""
        runtimes = [
            self._begin(item[0], item[1])
            if len(item) == 2
            else self._begin(RunUnit(item[0], item[1], item[0].variants[0]), item[2])
            for item in items
        ]
        self._finish(runtimes)
        return [runtime.deployment for runtime in runtimes]

    def _begin(self, unit: RunUnit, fault: Fault | None) -> DeploymentRuntime:
        """Create the pods and start their processes, without waiting for them."""
        if fault in SCRAPER_FAULTS:
            raise UsageError(
                f"fault {fault} breaks the scraper, which every deployment shares: "
                "give it to LocalBackend(fault=...) instead"
            )
        fault = fault or (None if self.fault in SCRAPER_FAULTS else self.fault)
        if not self._started:
            try:
                self._start()
            except BaseException:
                self.close()
                raise
        scenario, mtls_mode, variant = unit.scenario, unit.mtls_mode, unit.variant
        namespace = f"smx-{scenario.name}-{mtls_mode.value.lower()}"
        if variant.id is not scenario.variants[0].id:
            namespace += f"-{variant.id}"
        if fault is not None and fault is not self.fault:
            namespace += f"-{fault}"
        runtime = DeploymentRuntime(Deployment(scenario, mtls_mode, namespace, (), variant))
        with self._lock:
            if namespace in self._active:
                raise UsageError(f"run unit {unit.id} is already deployed on this backend")
            self._active[namespace] = runtime
        try:
            objects = unit_manifests(
                unit,
                self.istio_version or str(DEFAULT_VERSION),
                captured=Feature.INBOUND_CAPTURE in self.features,
            )
            gateway = unit_gateway(
                unit,
                self.istio_version or str(DEFAULT_VERSION),
                broken_proxy_config=fault is Fault.PROXYCONFIG_SELECTS_NOTHING,
            )
            for spec in scenario.workloads:
                runtime.workloads[spec.name] = self._start_workload(
                    spec,
                    namespace,
                    fault,
                    gateway=gateway if gateway and spec.name == gateway.deployment else None,
                    objects=objects,
                )
        except BaseException:
            self.teardown(runtime.deployment)
            raise
        return runtime

    def _finish(self, runtimes: list[DeploymentRuntime]) -> None:
        """Wait for the proxies of ``runtimes``, then publish their pods to discovery."""
        for runtime in runtimes:
            try:
                for w in runtime.workloads.values():
                    w.envoy.wait_ready()
            except BaseException:
                self.teardown(runtime.deployment)
                raise
            dep = runtime.deployment
            runtime.deployment = Deployment(
                dep.scenario,
                dep.mtls_mode,
                dep.namespace,
                tuple(w.workload for w in runtime.workloads.values()),
                dep.variant,
            )
        self._publish_pods()

    def _start_workload(
        self,
        spec: WorkloadSpec,
        namespace: str,
        fault: Fault | None,
        *,
        gateway: GeneratedGateway | None = None,
        objects: list[dict[str, Any]] | None = None,
    ) -> WorkloadRuntime:
        ns = SCRAPER_NAMESPACE if spec.name == "istio-ingressgateway" else namespace
        pod = self.network.add_pod(f"{spec.name}-{next(_counter)}")
        pod_dir = self.workdir / pod.name
        sds = SdsFiles(pod_dir / "sds")
        sds.directory.mkdir(parents=True)
        if fault is Fault.EXPIRED_WORKLOAD_CERT:
            identity = self.ca.issue_expired(ns, spec.service_account)
        elif fault is Fault.WRONG_IDENTITY:
            identity = self.ca.issue(ns, f"{spec.service_account}-impostor")
        else:
            identity = self.ca.issue(ns, spec.service_account)
        expected = SpiffeId.for_workload(self._trust_domain, ns, spec.service_account)
        self.write_sds(sds, identity, fault)
        localhost_only = (
            spec.mode is MetricsMode.HARDENED and fault is not Fault.HARDENED_FLAG_MISSING
        )
        # a generated gateway's proxy takes its environment from Istio's deployment
        # controller, and the two localhost-only rules read different sources there
        stats_localhost = localhost_only if gateway is None else gateway.stats_localhost_only
        agent_localhost = localhost_only if gateway is None else gateway.agent_localhost_only
        # 0.0.0.0 inside the pod's own namespace, as Istio binds; never on the host
        wildcard = "0.0.0.0" if pod.netns else pod.ip  # noqa: S104
        virtual_inbound, inbound_log = None, None
        if objects is not None and spec.kind is WorkloadKind.SIDECAR:
            # what istiod and istio-init make of this pod's manifests
            virtual_inbound, inbound_log = capture.capture_sidecar(
                pod, objects, spec.name, sds, pod_dir / INBOUND_ACCESS_LOG, fault
            )
        bootstrap = build_bootstrap(
            spec,
            node_id=f"sidecar~{pod.ip}~{pod.name}.{ns}~{ns}.svc.cluster.local",
            loopback=pod.loopback,
            wildcard=wildcard,
            sds=sds,
            localhost_only=stats_localhost,
            fault=fault,
            secure_ports=gateway is None or gateway.opens_secure_ports,
            virtual_inbound=virtual_inbound,
        )
        envoy = Envoy(pod, pod_dir, bootstrap, ready_timeout=self.timeouts.rollout)
        servers: list[PodHTTPServer] = []
        workload = Workload(spec, ns, pod.name, pod.ip, expected)
        record = promconfig.PodRecord(
            name=pod.name,
            namespace=ns,
            ip=pod.ip,
            annotations=pod_annotations(spec, fault),
            labels={"app": spec.name, "security.istio.io/tlsMode": "istio"},
            container_ports=container_ports(spec),
        )
        runtime = WorkloadRuntime(
            workload, pod, envoy, servers, sds, identity, record, fault, inbound_log
        )
        try:
            envoy.start()
            if spec.kind is WorkloadKind.SIDECAR:
                servers.append(start_app(pod, wildcard))
            servers.append(
                start_agent(
                    pod,
                    wildcard,
                    app_port=APP_PORT if spec.kind is WorkloadKind.SIDECAR else None,
                    localhost_only=agent_localhost,
                )
            )
        except BaseException:
            # the caller only knows this pod once it is returned: a failure or a stop
            # signal (KeyboardInterrupt) in between must not orphan its Envoy
            self._stop_workload(runtime)
            raise
        return runtime

    def _publish_pods(self) -> None:
        with self._lock:
            pods = [[*r.workloads.values(), *r.retiring] for r in self._active.values()]
            promconfig.write_sd_file(self.sd_file, [w.record for ws in pods for w in ws])

    def _stop_workload(self, w: WorkloadRuntime) -> None:
        for server in w.servers:
            server.close()
        w.envoy.stop()
        self.network.remove_pod(w.pod.name)

    def teardown(self, deployment: Deployment) -> None:
        runtime = self._active.get(deployment.namespace)
        if runtime is None:
            return
        # forgotten once stopped: a teardown cut short (a stop signal) is finished by close()
        for w in [*runtime.workloads.values(), *runtime.retiring]:
            self._stop_workload(w)
        with self._lock:
            self._active.pop(deployment.namespace, None)
            self._publish_pods()

    # -- upgrade -----------------------------------------------------------------------

    def upgrade_versions(self) -> tuple[IstioVersion, IstioVersion]:
        """(from, to): ``upgrade_from``, or the minor before the version under test."""
        new = resolve(self.istio_version) if self.istio_version else DEFAULT_VERSION
        if self.upgrade_from:
            return upgrade_pair(self.upgrade_from, str(new))
        return previous_minor(new), new

    def upgrade(self, deployment: Deployment) -> Deployment:
        """Replace ``deployment``'s pods by pods with the new version's configuration.

        What a rollout restart does to a Deployment with surge: each new pod starts (and
        is discovered, as Kubernetes lists a pod once it has an address) while the old
        one still serves; the old pod is retired once Prometheus has scraped its
        successor UP in every job (a drain that outlasts discovery), or when the
        successor cannot be scraped (dropped by relabeling, or not UP within
        the named timeout ``target-up``), as a rollout does not wait for Prometheus. What that costs
        is the continuity measurement's to find.
        """
        runtime = self._active.get(deployment.namespace)
        if runtime is None:
            raise UsageError(f"{deployment.namespace} is not deployed on this backend")
        if runtime.retiring:
            raise UsageError(f"{deployment.namespace} is already being upgraded")
        _, new = self.upgrade_versions()
        native = capabilities(new).native_secure_ports
        old = dict(runtime.workloads)
        fresh: dict[str, WorkloadRuntime] = {}
        try:
            for name, w in old.items():
                fault = (
                    Fault.SECURE_PORT_ANNOTATION_MISSING
                    if w.fault is Fault.UPGRADE_DROPS_TARGETS
                    else w.fault
                )
                spec = upgraded_spec(w.workload.spec, native)
                fresh[name] = self._start_workload(spec, deployment.namespace, fault)
            with self._lock:
                runtime.workloads, runtime.retiring = fresh, list(old.values())
                self._publish_pods()
            for w in fresh.values():
                w.envoy.wait_ready()
        except BaseException:
            for w in fresh.values():
                self._stop_workload(w)
            with self._lock:
                runtime.workloads, runtime.retiring = old, []
                self._publish_pods()
            raise
        self._wait_successors_scraped(list(fresh.values()))
        with self._lock:
            retired, runtime.retiring = runtime.retiring, []
        for w in retired:
            self._stop_workload(w)
        self._publish_pods()
        runtime.deployment = Deployment(
            deployment.scenario,
            deployment.mtls_mode,
            deployment.namespace,
            tuple(w.workload for w in fresh.values()),
        )
        return runtime.deployment

    def _wait_successors_scraped(self, fresh: list[WorkloadRuntime]) -> None:
        # a rollout does not wait for Prometheus: on timeout the old pods retire anyway
        wait_scraped(
            self.prometheus(),
            [w.workload for w in fresh],
            "Prometheus to scrape the restarted pods UP before the old ones retire",
            missing=Missing.SKIP_DROPPED,
            timeout=self.timeouts.target_up,
        )

    def capture_diagnostics(self, deployment: Deployment | None, reason: str) -> Path | None:
        if deployment is None or not self._started:
            return None
        from securemetrics_e2e.local.diagnostics import capture

        variant = f"{deployment.scenario.name}-{deployment.mtls_mode.value.lower()}"
        server = self.prometheus_server
        return capture(
            deployment,
            reason,
            self.artifacts_dir / f"local-{self.run_id}" / variant,
            proxies={w.pod_name: self.runtime_of(w).envoy for w in deployment.workloads},
            api=self.prometheus(),
            scraper_files=(
                (self.sd_file, "pods-file-sd.json"),
                (server.config_path, "prometheus.yml"),
                (server.process.log_path, "prometheus.log"),
            ),
        )

    def runtime_of(self, workload: Workload) -> WorkloadRuntime:
        """The processes and files behind ``workload`` (for diagnostics and rotation)."""
        for runtime in list(self._active.values()):  # a window's thread may change it
            for w in list(runtime.workloads.values()):
                if w.workload == workload:
                    return w
        raise UsageError(f"workload {workload.name} is not deployed on this backend")

    def pod_annotations(self, workload: Workload) -> dict[str, str]:
        return dict(self.runtime_of(workload).record.annotations)

    def listeners(self, workload: Workload) -> list[Listener]:
        from securemetrics_e2e.configdump import listeners_from_config_dump

        return listeners_from_config_dump(self.runtime_of(workload).envoy.config_dump())

    def scrape(
        self,
        workload: Workload,
        port: int,
        path: str = "/stats/prometheus",
        credential: Credential = Credential.SCRAPER,
    ) -> ScrapeResult:
        url = workload.url(port, path)
        with self.client_certs(credential) as client:
            return self.scraper_pod.call(
                lambda: scrape_mtls(
                    url,
                    client=client,
                    mesh_root=self.ca.root_pem,
                    expected_spiffe=workload.spiffe_id,
                    timeout=self.timeouts.scrape_request,
                )
            )

    def plaintext(
        self, workload: Workload, port: int, origin: Origin, path: str = "/stats/prometheus"
    ) -> PlaintextResult:
        seconds = self.timeouts.plaintext_request
        if origin is Origin.INSIDE_POD:
            pod = self.runtime_of(workload).pod
            return pod.call(lambda: attempt_plaintext(pod.loopback, port, path, timeout=seconds))
        return self.scraper_pod.call(
            lambda: attempt_plaintext(workload.pod_ip, port, path, timeout=seconds)
        )

    def inbound_path(self, workload: Workload, port: int) -> str:
        """What the pod's virtualInbound access log says about connections to ``port``."""
        log = self.runtime_of(workload).inbound_log
        return "" if log is None else log.on_port(port)

    def prometheus(self) -> PrometheusAPI:
        if not self._started:
            raise UsageError("the local backend has no Prometheus before the first deploy")
        return self.prometheus_server.api
