"""The probes of a cluster run: what the scraper pod sees, and what a verified
port-forward shows the project's own probe.

* mTLS: curl in the scraper's ``istio-proxy`` with ``/etc/istio-certs`` (the path
  Prometheus takes, and the istio.io task's verification), the server chain checked
  against the mesh root and the workload's SPIFFE ID; then the suite's probe through a
  ``kubectl port-forward`` verified to reach the pod's port, as a second opinion.
* plaintext: curl from inside the target pod (loopback) or from the scraper pod.
"""

from __future__ import annotations

import base64
import dataclasses
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from securemetrics_e2e.backend import Credential, Origin, Workload
from securemetrics_e2e.cluster.forward import PortForward
from securemetrics_e2e.cluster.incluster import (
    SCRAPER_CERTS,
    exec_timeout,
    mtls_curl,
    parse_mtls,
    parse_plaintext,
    plaintext_curl,
)
from securemetrics_e2e.cluster.istio import KubeTarget
from securemetrics_e2e.cluster.kube import KubeAPI
from securemetrics_e2e.cluster.layout import SCRAPER_SELECTOR, ScraperPlan
from securemetrics_e2e.cluster.resources import running_pods
from securemetrics_e2e.cluster.setup import Progress
from securemetrics_e2e.errors import SecureMetricsError
from securemetrics_e2e.istionames import PROXY_CONTAINER
from securemetrics_e2e.pki import KEY_MODE, MeshCA, OutputCerts, atomic_write
from securemetrics_e2e.probe import MtlsOutcome, PlaintextResult, ScrapeResult, scrape_mtls
from securemetrics_e2e.timeouts import CLUSTER

_CERT_FILES = ("root-cert.pem", "cert-chain.pem", "key.pem")
_CERTS_MAX_AGE = 300.0  # re-read the scraper's files: the agent rotates them


class Prober:
    """Runs the checks' probes on the cluster, from the scraper pod and the workload pods."""

    def __init__(
        self,
        *,
        api: KubeAPI,
        scraper: ScraperPlan,
        kubectl: str,
        target: KubeTarget,
        trust_domain: str,
        run_id: str,
        progress: Progress,
    ) -> None:
        self.api = api
        self.scraper = scraper
        self.kubectl = kubectl
        self.target = target
        self.trust_domain = trust_domain
        self.run_id = run_id
        self._workdir_path: Path | None = None
        self.progress = progress
        self._forwards: dict[tuple[str, str, int], PortForward | None] = {}
        self._certs: tuple[float, str, OutputCerts] | None = None
        self._foreign: OutputCerts | None = None

    def forget(self, namespace: str) -> None:
        """Stop the port-forwards into ``namespace`` (its pods are going away)."""
        for key in [k for k in self._forwards if k[0] == namespace]:
            fwd = self._forwards.pop(key)
            if fwd is not None:
                fwd.stop()

    def close(self) -> None:
        for fwd in self._forwards.values():
            if fwd is not None:
                fwd.stop()
        self._forwards.clear()
        if self._workdir_path is not None:
            shutil.rmtree(self._workdir_path, ignore_errors=True)
            self._workdir_path = None

    @property
    def _workdir(self) -> Path:
        """A private directory for certificate copies, made on first use (mode 0700)."""
        if self._workdir_path is None:
            self._workdir_path = Path(tempfile.mkdtemp(prefix="securemetrics-cluster-"))
        return self._workdir_path

    def scraper_pod(self) -> str:
        """The name of the scraper's running pod (looked up each time: it may restart)."""
        pods = running_pods(self.api, self.scraper.namespace, SCRAPER_SELECTOR)
        if not pods:
            raise SecureMetricsError(f"no running scraper pod in {self.scraper.namespace}")
        return str(pods[0]["metadata"]["name"])

    def _scraper_certs(self) -> tuple[str, OutputCerts]:
        """The scraper's pod, and its OUTPUT_CERTS files copied from it into a private
        directory."""
        pod = self.scraper_pod()
        if (
            self._certs is not None
            and self._certs[1] == pod
            and time.monotonic() - self._certs[0] < _CERTS_MAX_AGE
        ):
            return pod, self._certs[2]
        directory = self._workdir / "scraper-certs"
        directory.mkdir(mode=0o700, exist_ok=True)
        paths = []
        for name in _CERT_FILES:
            got = self.api.exec(
                self.scraper.namespace,
                pod,
                PROXY_CONTAINER,
                ["cat", f"{SCRAPER_CERTS}/{name}"],
                timeout=20,
            )
            if got.exit_code != 0 or "BEGIN" not in got.stdout:
                raise SecureMetricsError(
                    f"the scraper pod {pod} has no {SCRAPER_CERTS}/{name} "
                    f"({got.stderr.strip()[:200]}): is OUTPUT_CERTS set and the istio-certs "
                    "volume mounted in istio-proxy?"
                )
            paths.append(atomic_write(directory / name, got.stdout.encode(), KEY_MODE))
        certs = OutputCerts(directory, paths[0], paths[1], paths[2])
        self._certs = (time.monotonic(), pod, certs)
        return pod, certs

    def _foreign_certs(self) -> OutputCerts:
        if self._foreign is None:
            ca = MeshCA.create(self.trust_domain)
            identity = ca.issue(self.scraper.namespace, "prometheus")
            self._foreign = identity.write_output_certs(self._workdir / "foreign-certs")
        return self._foreign

    def _forward(self, namespace: str, pod: str, port: int) -> PortForward | None:
        """A verified forward to the pod's port, or None when that port is not served on
        the pod's loopback (e.g. a port only the sidecar's inbound capture serves)."""
        key = (namespace, pod, port)
        if key in self._forwards:
            fwd = self._forwards[key]
            if fwd is None or fwd.verified():
                return fwd
            fwd.stop()
        fwd = PortForward(self.kubectl, self.target.args(), namespace, pod, port)
        fwd.start()
        if not fwd.verified():
            self.progress(
                f"[cluster] note: port {port} of {namespace}/{pod} does not answer through a "
                f"port-forward ({fwd.stderr_tail() or 'no TLS reply'}); using the in-cluster "
                "probe alone"
            )
            fwd.stop()
            self._forwards[key] = None
            return None
        self._forwards[key] = fwd
        return fwd

    def scrape(
        self,
        workload: Workload,
        port: int,
        path: str = "/stats/prometheus",
        credential: Credential = Credential.SCRAPER,
        *,
        timeout: float = CLUSTER.scrape_request,
    ) -> ScrapeResult:
        url = workload.url(port, path)
        pod, mesh = self._scraper_certs()
        roots = [mesh.root()]
        staged: str | None = None
        if credential is Credential.FOREIGN_CA:
            staged = self._stage_in_pod(pod, self._foreign_certs(), mesh)
        certs_dir = staged or SCRAPER_CERTS
        call = mtls_curl(
            url,
            certs_dir=certs_dir,
            client_cert=None if credential is Credential.NONE else ("cert-chain.pem", "key.pem"),
            timeout=timeout,
        )
        started = time.monotonic()
        try:
            result = self.api.exec(
                self.scraper.namespace,
                pod,
                PROXY_CONTAINER,
                call.argv,
                timeout=exec_timeout(timeout),
            )
        finally:
            if staged is not None:
                self.api.exec(
                    self.scraper.namespace, pod, PROXY_CONTAINER, ["rm", "-rf", staged], timeout=20
                )
        in_cluster = parse_mtls(
            result,
            call,
            url,
            elapsed=time.monotonic() - started,
            roots=roots,
            intermediates=mesh.intermediates(),
            expected=workload.spiffe_id,
            presented_cert=credential is not Credential.NONE,
        )
        return self._corroborate(in_cluster, workload, port, path, credential, mesh, timeout)

    def _corroborate(
        self,
        in_cluster: ScrapeResult,
        workload: Workload,
        port: int,
        path: str,
        credential: Credential,
        mesh: OutputCerts,
        timeout: float,
    ) -> ScrapeResult:
        """Run the project's probe through a verified port-forward as a second opinion.

        The in-cluster result (the path Prometheus takes) decides; the probe adds the
        SPIFFE check when curl could not report the chain, and any disagreement is
        written into the detail.
        """
        fwd = self._forward(workload.namespace, workload.pod_name, port)
        if fwd is None or fwd.local_port is None:
            return in_cluster
        client = {
            Credential.SCRAPER: mesh,
            Credential.NONE: None,
            Credential.FOREIGN_CA: self._foreign_certs(),
        }[credential]
        probe = scrape_mtls(
            f"https://127.0.0.1:{fwd.local_port}{path}",
            client=client,
            mesh_root=mesh.root_cert,
            expected_spiffe=workload.spiffe_id,
            timeout=timeout,
        )
        if in_cluster.peer_spiffe_id is None and probe.peer_spiffe_id is not None:
            in_cluster = dataclasses.replace(in_cluster, peer_spiffe_id=probe.peer_spiffe_id)
            if in_cluster.outcome is MtlsOutcome.OK and probe.outcome is not MtlsOutcome.OK:
                return dataclasses.replace(
                    probe, url=in_cluster.url, detail=f"{probe.detail} (probe via port-forward)"
                )
        if probe.outcome is not in_cluster.outcome:
            return dataclasses.replace(
                in_cluster,
                detail=f"{in_cluster.detail}; through a verified port-forward to the pod's "
                f"loopback the probe saw {probe.outcome.value}: {probe.detail}",
            )
        return in_cluster

    def _stage_in_pod(self, pod: str, certs: OutputCerts, mesh: OutputCerts) -> str:
        """Copy client certificate files into the scraper's cert volume (the only writable
        place istio-proxy has); the caller removes them."""
        directory = f"{SCRAPER_CERTS}/.securemetrics-{self.run_id}"
        files = {
            "root-cert.pem": mesh.root_cert.read_bytes(),
            "cert-chain.pem": certs.cert_chain.read_bytes(),
            "key.pem": certs.key.read_bytes(),
        }
        script = [f"umask 077 && mkdir -p {shlex.quote(directory)}"]
        for name, data in files.items():
            encoded = base64.b64encode(data).decode()
            script.append(f"echo {encoded} | base64 -d > {shlex.quote(directory + '/' + name)}")
        done = self.api.exec(
            self.scraper.namespace,
            pod,
            PROXY_CONTAINER,
            ["sh", "-c", " && ".join(script)],
            timeout=20,
        )
        if done.exit_code != 0:
            raise SecureMetricsError(
                f"could not stage test certificates in the scraper pod {pod}: "
                f"{done.stderr.strip()[:200]}"
            )
        return directory

    def plaintext(
        self,
        workload: Workload,
        port: int,
        origin: Origin,
        path: str = "/stats/prometheus",
        *,
        timeout: float = CLUSTER.plaintext_request,
    ) -> PlaintextResult:
        if origin is Origin.INSIDE_POD:
            host, namespace, pod = "127.0.0.1", workload.namespace, workload.pod_name
        else:
            host, namespace, pod = workload.pod_ip, self.scraper.namespace, self.scraper_pod()
        url = (
            workload.url(port, path, scheme="http")
            if host != "127.0.0.1"
            else f"http://127.0.0.1:{port}{path}"
        )
        call = plaintext_curl(url, timeout=timeout)
        started = time.monotonic()
        result = self.api.exec(
            namespace, pod, PROXY_CONTAINER, call.argv, timeout=exec_timeout(timeout)
        )
        if result.exit_code in (126, 127):
            raise SecureMetricsError(
                f"curl could not run in {namespace}/{pod} ({PROXY_CONTAINER}): "
                f"{result.stderr.strip()[:200]}; distroless proxy images have no curl: use "
                "the default (debug) proxyv2 image"
            )
        return parse_plaintext(result, call, host, port, path, elapsed=time.monotonic() - started)
