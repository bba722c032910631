"""Capture + virtualInbound in real network namespaces, probed with the suite's own probe.

Each pod gets the rules istio-iptables would install (real iptables REDIRECT to 15006),
a real Envoy with the virtualInbound listener derived from the charts' manifests and the
bootstrap's static TLS-only secure listeners, and the agent on 15020. The scraper pod
probes it with ``scrape_mtls`` / ``attempt_plaintext``. Expected outcomes are
ISTIO-FACTS.md's ("Inbound capture and virtualInbound", "Legacy workaround").
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from securemetrics_e2e.catalog import SCENARIOS, MtlsMode, Scenario
from securemetrics_e2e.local.agent import start_agent
from securemetrics_e2e.local.app import start_app
from securemetrics_e2e.local.bootstrap import (
    SdsFiles,
    build_bootstrap,
    sds_secret_default,
    sds_secret_rootca,
)
from securemetrics_e2e.local.capture import install, installed_rules, unavailable_reason
from securemetrics_e2e.local.envoy import Envoy
from securemetrics_e2e.local.httpserver import PodHTTPServer
from securemetrics_e2e.local.inbound import pod_inbound
from securemetrics_e2e.local.netns import Pod, PodNetwork
from securemetrics_e2e.local.virtualinbound import inbound_clusters, virtual_inbound_listener
from securemetrics_e2e.manifests import scenario_manifests
from securemetrics_e2e.pki import MeshCA, OutputCerts
from securemetrics_e2e.probe import MtlsOutcome, PlaintextOutcome, attempt_plaintext, scrape_mtls

_WHY_NOT = PodNetwork.available() or unavailable_reason()
pytestmark = pytest.mark.skipif(
    _WHY_NOT is not None, reason=f"needs network namespaces and iptables: {_WHY_NOT}"
)

_BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass
class Target:
    pod: Pod
    envoy: Envoy
    agent: PodHTTPServer
    app: PodHTTPServer
    log: Path


@dataclass
class Mesh:
    network: PodNetwork
    ca: MeshCA
    scraper: Pod
    certs: OutputCerts
    targets: dict[str, Target]

    def scrape(self, name: str, port: int) -> MtlsOutcome:
        target = self.targets[name]
        url = f"https://{target.pod.ip}:{port}/stats/prometheus"
        result = self.scraper.call(
            lambda: scrape_mtls(
                url, client=self.certs, mesh_root=self.ca.root_pem, expected_spiffe=None
            )
        )
        return result.outcome

    def tls_get(self, name: str, port: int, alpn: list[str]) -> str:
        """GET /get over TLS with the scraper's certificate offering ``alpn``: the JSON
        body, or the error that ended the connection."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the identity is not what this test is about
        context.load_cert_chain(self.certs.cert_chain, self.certs.key)
        context.set_alpn_protocols(alpn)
        ip = self.targets[name].pod.ip

        def get() -> str:
            try:
                with (
                    socket.create_connection((ip, port), timeout=3) as raw,
                    context.wrap_socket(raw) as tls,
                ):
                    tls.sendall(b"GET /get HTTP/1.1\r\nHost: httpbin\r\n\r\n")
                    response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
                    response.begin()
                    return response.read().decode()
            except (OSError, http.client.HTTPException) as exc:
                return f"error: {type(exc).__name__}"

        return self.scraper.call(get)

    def plaintext(self, name: str, port: int) -> PlaintextOutcome:
        ip = self.targets[name].pod.ip
        return self.scraper.call(lambda: attempt_plaintext(ip, port)).outcome


CASES = {
    # name: (scenario, mode, variant)
    "native-permissive": ("native-sidecar", MtlsMode.PERMISSIVE, "as-documented"),
    "native-strict": ("native-sidecar", MtlsMode.STRICT, "as-documented"),
    "native-strict-excluded": ("native-sidecar", MtlsMode.STRICT, "exclude-capture"),
    "legacy-permissive": ("legacy-sidecar", MtlsMode.PERMISSIVE, None),
    "legacy-strict": ("legacy-sidecar", MtlsMode.STRICT, None),
    "native-strict-port-permissive": ("native-sidecar", MtlsMode.STRICT, "port-permissive"),
    "legacy-permissive-port-strict": ("legacy-sidecar", MtlsMode.PERMISSIVE, "port-strict"),
}


def _start(network: PodNetwork, ca: MeshCA, workdir: Path, name: str) -> Target:
    scenario_name, mode, variant = CASES[name]
    scenario: Scenario = _BY_NAME[scenario_name]
    objects = scenario_manifests(scenario, mode, "1.31", namespace="demo", variant=variant)
    inbound = pod_inbound(objects, "httpbin")
    pod = network.add_pod(name)
    sds = SdsFiles(workdir / name / "sds")
    sds.directory.mkdir(parents=True)
    identity = ca.issue("demo", "httpbin")
    sds.default.write_text(
        json.dumps(sds_secret_default(identity.cert_chain_pem(), identity.key_pem()))
    )
    sds.rootca.write_text(json.dumps(sds_secret_rootca(ca.root_pem)))
    log = workdir / name / "inbound.log"
    listener = virtual_inbound_listener(inbound, sds, access_log=log)
    bootstrap = build_bootstrap(
        scenario.workloads[0],
        node_id=name,
        loopback=pod.loopback,
        wildcard="0.0.0.0",  # noqa: S104 (inside the pod's namespace)
        sds=sds,
        localhost_only=False,
        virtual_inbound=(listener, inbound_clusters(inbound, pod.ip)),
    )
    install(pod, inbound.capture)
    envoy = Envoy(pod, workdir / name, bootstrap)
    envoy.start()
    agent = start_agent(pod, "0.0.0.0", app_port=None, localhost_only=False)  # noqa: S104
    app = start_app(pod, "0.0.0.0")  # noqa: S104
    return Target(pod, envoy, agent, app, log)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("capture")
    network = PodNetwork(f"cap{abs(hash(workdir)) % 10000}")
    targets: dict[str, Target] = {}
    try:
        ca = MeshCA.create("cluster.local")
        scraper = network.add_pod("prometheus")
        certs = ca.issue("istio-system", "prometheus").write_output_certs(workdir / "certs")
        for name in CASES:
            targets[name] = _start(network, ca, workdir, name)
        for target in targets.values():
            target.envoy.wait_ready()
        yield Mesh(network, ca, scraper, certs, targets)
    finally:
        for target in targets.values():
            target.agent.close()
            target.app.close()
            target.envoy.stop()
        network.close()


def test_rules_are_installed_in_the_pod_namespace_only(mesh: Mesh) -> None:
    rules = installed_rules(mesh.targets["native-strict"].pod)
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15091 -j RETURN" not in rules
    excluded = installed_rules(mesh.targets["native-strict-excluded"].pod)
    assert "-A ISTIO_INBOUND -p tcp -m tcp --dport 15091 -j RETURN" in excluded
    assert installed_rules(mesh.scraper) == []


def test_permissive_passthrough_hands_tls_to_the_static_listener(mesh: Mesh) -> None:
    assert mesh.scrape("native-permissive", 15091) is MtlsOutcome.OK
    assert mesh.scrape("native-permissive", 15092) is MtlsOutcome.OK
    # plaintext is sniffed as HTTP and proxied to the TLS-only listener, which closes it:
    # Envoy's 503 "upstream connect error ... connection termination" (ISTIO-FACTS.md,
    # "Verification commands")
    assert mesh.plaintext("native-permissive", 15091) is PlaintextOutcome.REJECTED_BY_PROXY


def test_strict_terminates_then_the_static_listener_closes(mesh: Mesh) -> None:
    assert mesh.scrape("native-strict", 15091) is MtlsOutcome.CLOSED
    assert mesh.scrape("native-strict", 15092) is MtlsOutcome.CLOSED
    log = mesh.targets["native-strict"].log.read_text()
    assert "chain=virtualInbound port=15091 tls=TLSv1.3" in log


def test_excluded_ports_are_not_captured(mesh: Mesh) -> None:
    assert mesh.scrape("native-strict-excluded", 15091) is MtlsOutcome.OK
    assert mesh.scrape("native-strict-excluded", 15092) is MtlsOutcome.OK


def test_legacy_permissive_serves_plaintext_and_resets_tls(mesh: Mesh) -> None:
    assert mesh.plaintext("legacy-permissive", 15091) is PlaintextOutcome.SERVED
    assert mesh.scrape("legacy-permissive", 15091) is MtlsOutcome.HANDSHAKE_REJECTED


def test_legacy_strict_terminates_mesh_mtls(mesh: Mesh) -> None:
    assert mesh.scrape("legacy-strict", 15091) is MtlsOutcome.OK
    assert mesh.plaintext("legacy-strict", 15091) is PlaintextOutcome.CLOSED
    log = mesh.targets["legacy-strict"].log.read_text()
    assert (
        "chain=0.0.0.0_15091 port=15091 tls=TLSv1.3 peer=spiffe://cluster.local/ns/istio-system/sa/prometheus"
        in log
    )


def test_port_level_permissive_lets_the_scraper_through_in_strict(mesh: Mesh) -> None:
    assert mesh.scrape("native-strict-port-permissive", 15091) is MtlsOutcome.OK
    assert mesh.scrape("native-strict-port-permissive", 15092) is MtlsOutcome.OK


def test_port_level_strict_makes_the_legacy_port_work_in_permissive(mesh: Mesh) -> None:
    assert mesh.scrape("legacy-permissive-port-strict", 15091) is MtlsOutcome.OK
    assert mesh.plaintext("legacy-permissive-port-strict", 15091) is PlaintextOutcome.CLOSED


def test_the_application_port_takes_istio_mtls_through_its_chain(mesh: Mesh) -> None:
    """PERMISSIVE HTTP port: Istio-ALPN TLS is terminated and sent on from 127.0.0.6;
    a TLS client without an Istio ALPN is reset."""
    body = mesh.tls_get("native-permissive", 8080, ["istio-http/1.1"])
    assert json.loads(body)["origin"] == "127.0.0.6", body
    assert mesh.tls_get("native-permissive", 8080, ["http/1.1"]).startswith("error")
    # STRICT: any TLS client with a mesh certificate is terminated
    body = mesh.tls_get("native-strict", 8080, ["http/1.1"])
    assert json.loads(body)["origin"] == "127.0.0.6", body


def test_threads_asking_at_once_whether_capture_works_all_hear_yes() -> None:
    # three meshes started side by side each ask; the probe namespace is each call's own
    unavailable_reason.cache_clear()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda _: unavailable_reason(), range(6)))
    finally:
        unavailable_reason.cache_clear()
    assert answers == [None] * 6
