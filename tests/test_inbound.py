"""The inbound model (local/inbound.py, local/virtualinbound.py) against ISTIO-FACTS.md.

The expected chains are written from ISTIO-FACTS.md "Inbound capture and virtualInbound"
(istio/istio pilot/pkg/networking/core/filterchain_options.go, listener_inbound.go), not
from the model: per (mTLS mode, port protocol) which TLS a chain matches, whether it needs
an Istio ALPN, and whether the sidecar terminates it. A real Envoy then loads every
generated configuration.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.catalog import SCENARIOS, WorkloadKind
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.local.bootstrap import (
    SdsFiles,
    build_bootstrap,
    sds_secret_default,
    sds_secret_rootca,
)
from securemetrics_e2e.local.capture import iptables_rules
from securemetrics_e2e.local.envoy import envoy_binary
from securemetrics_e2e.local.faults import Fault
from securemetrics_e2e.local.inbound import (
    ALL_ISTIO_MTLS_ALPNS,
    MTLS_HTTP_ALPNS,
    PASSTHROUGH_CLUSTER,
    PodInbound,
    pod_inbound,
)
from securemetrics_e2e.local.virtualinbound import (
    InboundLog,
    connections_on_port,
    inbound_clusters,
    virtual_inbound_listener,
)
from securemetrics_e2e.manifests import scenario_manifests
from securemetrics_e2e.pki import MeshCA

NS = "demo"
LABELS = {"app": "httpbin", "version": "v1", "sidecar.istio.io/inject": "true"}

# ---- the table, from ISTIO-FACTS.md ---------------------------------------------------------
# Each chain: (transport, alpn, terminated). alpn "istio" = Istio's ALPNs only, "plain-http" =
# http/1.1 or h2c (sniffed plaintext HTTP), "" = no ALPN condition.
ISTIO, HTTPALPN, ANY = "istio", "plain-http", ""
FACTS: dict[tuple[str, str], set[tuple[str, str, bool]]] = {
    # PERMISSIVE, HTTP port: Istio-ALPN TLS terminated; plaintext HTTP. Nothing else.
    ("PERMISSIVE", "http"): {("tls", ISTIO, True), ("raw_buffer", ANY, False)},
    # PERMISSIVE, TCP port: additionally plain TLS without Istio ALPN passed through.
    ("PERMISSIVE", "tcp"): {
        ("tls", ISTIO, True),
        ("tls", ANY, False),
        ("raw_buffer", ANY, False),
    },
    # PERMISSIVE, undeclared protocol (and the passthrough chains): Istio ALPNs terminated
    # (HTTP and TCP flavours), sniffed plaintext HTTP, raw TCP, plain TLS passed through.
    ("PERMISSIVE", "auto"): {
        ("tls", ISTIO, True),
        ("raw_buffer", HTTPALPN, False),
        ("raw_buffer", ANY, False),
        ("tls", ANY, False),
    },
    # STRICT: TLS only, always terminated with the mesh mTLS context.
    ("STRICT", "http"): {("tls", ANY, True)},
    ("STRICT", "tcp"): {("tls", ANY, True)},
    ("STRICT", "auto"): {("tls", ISTIO, True), ("tls", ANY, True)},
    # DISABLE: plaintext only.
    ("DISABLE", "http"): {("raw_buffer", ANY, False)},
    ("DISABLE", "tcp"): {("raw_buffer", ANY, False)},
    ("DISABLE", "auto"): {("raw_buffer", HTTPALPN, False), ("raw_buffer", ANY, False)},
}
PORT_NAMES = {"http": "http", "tcp": "tcp-app", "auto": "app"}


def _alpn_kind(alpns: list[str]) -> str:
    if not alpns:
        return ANY
    if all(a in ALL_ISTIO_MTLS_ALPNS for a in alpns):
        return ISTIO
    assert set(alpns) <= {"http/1.1", "h2c"}, alpns
    return HTTPALPN


def _chains(listener: dict[str, Any], port: int) -> set[tuple[str, str, bool]]:
    found = set()
    for chain in listener["filter_chains"]:
        match = chain.get("filter_chain_match", {})
        if match.get("destination_port", 0) != port:
            continue
        found.add(
            (
                match["transport_protocol"],
                _alpn_kind(match.get("application_protocols", [])),
                "transport_socket" in chain,
            )
        )
    return found


def deployment(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "httpbin", "namespace": NS},
        "spec": {
            "template": {
                "metadata": {"labels": dict(LABELS), "annotations": dict(annotations or {})},
                "spec": {
                    "containers": [
                        {"name": "httpbin", "ports": [{"name": "http", "containerPort": 8080}]}
                    ]
                },
            }
        },
    }


def service(port_name: str, target: int | str = 8080) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": NS},
        "spec": {
            "selector": {"app": "httpbin"},
            "ports": [{"name": port_name, "port": 8000, "targetPort": target, "protocol": "TCP"}],
        },
    }


def peer_auth(mode: str, port_level: dict[int, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if port_level is not None:
        spec["selector"] = {"matchLabels": {"app": "httpbin"}}
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in port_level.items()}
    return {"kind": "PeerAuthentication", "metadata": {"name": "pa", "namespace": NS}, "spec": spec}


def sidecar(protocol: str = "HTTP") -> dict[str, Any]:
    return {
        "kind": "Sidecar",
        "metadata": {"name": "httpbin-secure-metrics", "namespace": NS},
        "spec": {
            "workloadSelector": {"labels": {"app": "httpbin"}},
            "ingress": [
                {
                    "port": {"number": 15091, "name": "https-metrics", "protocol": protocol},
                    "defaultEndpoint": "127.0.0.1:15020",
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def sds(tmp_path_factory: pytest.TempPathFactory) -> SdsFiles:
    """Real SDS files (Envoy's validate mode insists the watched paths exist)."""
    files = SdsFiles(tmp_path_factory.mktemp("sds"))
    ca = MeshCA.create("cluster.local")
    identity = ca.issue(NS, "httpbin")
    default = sds_secret_default(identity.cert_chain_pem(), identity.key_pem())
    files.default.write_text(json.dumps(default))
    files.rootca.write_text(json.dumps(sds_secret_rootca(ca.root_pem)))
    return files


def listener_of(objects: list[dict[str, Any]], sds: SdsFiles) -> tuple[PodInbound, dict[str, Any]]:
    inbound = pod_inbound(objects, "httpbin")
    return inbound, virtual_inbound_listener(inbound, sds)


@pytest.mark.parametrize(("mode", "proto"), sorted({k for k in FACTS}))
def test_service_port_chains_follow_the_facts(mode: str, proto: str, sds: SdsFiles) -> None:
    objects = [peer_auth(mode), deployment(), service(PORT_NAMES[proto])]
    inbound, listener = listener_of(objects, sds)
    assert _chains(listener, 8080) == FACTS[(mode, proto)]
    # the passthrough chains (no destination port) are the "auto" chains of the mode
    assert _chains(listener, 0) == FACTS[(mode, "auto")]
    assert inbound.group_for(8080).origin == "Service httpbin port " + PORT_NAMES[proto]


@pytest.mark.parametrize("mode", ["PERMISSIVE", "STRICT", "DISABLE"])
def test_sidecar_ingress_is_an_http_chain_group_under_the_ports_mode(
    mode: str, sds: SdsFiles
) -> None:
    objects = [peer_auth(mode), deployment(), service("http"), sidecar()]
    inbound, listener = listener_of(objects, sds)
    assert _chains(listener, 15091) == FACTS[(mode, "http")]
    # a Sidecar with ingress listeners replaces the Service ports (no merge by default)
    assert _chains(listener, 8080) == set()
    group = inbound.group_for(15091)
    assert group.cluster == "inbound|15091||"
    assert not group.passthrough
    clusters = {c["name"]: c for c in inbound_clusters(inbound, "10.0.0.9")}
    endpoint = clusters["inbound|15091||"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert endpoint["endpoint"]["address"]["socket_address"]["port_value"] == 15020


def test_port_level_strict_on_the_sidecar_port() -> None:
    objects = [peer_auth("PERMISSIVE", {15091: "STRICT"}), deployment(), sidecar()]
    inbound = pod_inbound(objects, "httpbin")
    assert inbound.group_for(15091).mode == "STRICT"
    # the port is the Sidecar's: no extra per-port passthrough group for it
    assert [g.port for g in inbound.groups if g.passthrough] == [0]


def test_port_level_permissive_gives_secure_ports_passthrough_groups(sds: SdsFiles) -> None:
    objects = [
        peer_auth("STRICT", {15091: "PERMISSIVE", 15092: "PERMISSIVE"}),
        deployment(),
        service("http"),
    ]
    inbound, listener = listener_of(objects, sds)
    for port in (15091, 15092):
        group = inbound.group_for(port)
        assert group.passthrough
        assert group.mode == "PERMISSIVE"
        assert group.cluster == PASSTHROUGH_CLUSTER
        assert _chains(listener, port) == FACTS[("PERMISSIVE", "auto")]
    assert inbound.group_for(8080).mode == "STRICT"


def test_a_port_group_never_falls_back_to_the_portless_chains(sds: SdsFiles) -> None:
    """A TLS client without an Istio ALPN finds nothing on a PERMISSIVE HTTP port, although
    the port-less passthrough chains would take it: Envoy does not fall back."""
    objects = [peer_auth("PERMISSIVE"), deployment(), service("http")]
    inbound, listener = listener_of(objects, sds)
    assert ("tls", ANY, False) in _chains(listener, 0)
    assert not any(t == "tls" and a == ANY for t, a, _ in _chains(listener, 8080))
    assert inbound.group_for(8080).port == 8080
    assert inbound.group_for(15091).port == 0


def test_secure_metrics_ports_get_no_service_chain() -> None:
    """conflictWithReservedListener: a Service port on a secure metrics port is skipped."""
    annotations = {
        "proxy.istio.io/config": "proxyMetadata:\n  ENVOY_SECURE_MERGED_METRICS_PORT: '15092'\n"
    }
    objects = [peer_auth("STRICT"), deployment(annotations), service("https-merged", 15092)]
    inbound = pod_inbound(objects, "httpbin")
    assert inbound.group_for(15092).passthrough


def test_mtls_alpn_lists_are_istios() -> None:
    # listener.go
    assert MTLS_HTTP_ALPNS == ("istio-http/1.0", "istio-http/1.1", "istio-h2")
    assert ALL_ISTIO_MTLS_ALPNS == (
        "istio",
        "istio-peer-exchange",
        "istio-http/1.0",
        "istio-http/1.1",
        "istio-h2",
    )


def test_passthrough_cluster_binds_127_0_0_6(sds: SdsFiles) -> None:
    inbound = pod_inbound([peer_auth("STRICT"), deployment(), service("http")], "httpbin")
    clusters = {c["name"]: c for c in inbound_clusters(inbound, "10.0.0.9")}
    for name in (PASSTHROUGH_CLUSTER, "inbound|8080||"):
        assert clusters[name]["type"] == "ORIGINAL_DST"
        bind = clusters[name]["upstream_bind_config"]["source_address"]
        assert bind["address"] == "127.0.0.6"


def test_listener_filters() -> None:
    inbound = pod_inbound([peer_auth("PERMISSIVE"), deployment(), service("http")], "httpbin")
    listener = virtual_inbound_listener(inbound, SdsFiles(Path("/nonexistent")))
    names = [f["name"] for f in listener["listener_filters"]]
    assert names == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
        "envoy.filters.listener.http_inspector",
    ]
    assert listener["address"]["socket_address"]["port_value"] == 15006
    assert "use_original_dst" not in listener


# ---- capture --------------------------------------------------------------------------------


def _redirected(rules: list[str], port: int) -> bool:
    """Walk ISTIO_INBOUND as iptables would for a TCP connection to ``port``."""
    if "-A PREROUTING -p tcp -j ISTIO_INBOUND" not in rules:
        return False
    for rule in rules:
        if not rule.startswith("-A ISTIO_INBOUND"):
            continue
        if "--dport" in rule and f"--dport {port} " not in rule:
            continue
        return rule.endswith("ISTIO_IN_REDIRECT")
    return False


@pytest.mark.parametrize(
    ("annotations", "captured", "excluded"),
    [
        ({}, [8080, 15091, 15092, 15006], [15090, 15021, 15020, 15008]),
        (
            {"traffic.sidecar.istio.io/excludeInboundPorts": "15091,15092"},
            [8080],
            [15091, 15092, 15090, 15021, 15020],
        ),
        ({"traffic.sidecar.istio.io/includeInboundPorts": ""}, [], [8080, 15091, 15092]),
        ({"traffic.sidecar.istio.io/includeInboundPorts": "8080"}, [8080], [15091, 15092]),
    ],
)
def test_capture_rules(
    annotations: dict[str, str], captured: list[int], excluded: list[int]
) -> None:
    inbound = pod_inbound([deployment(annotations)], "httpbin")
    rules = iptables_rules(inbound.capture)
    assert "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules
    assert [p for p in captured if _redirected(rules, p)] == captured
    assert [p for p in excluded if _redirected(rules, p)] == []
    # the predicate the diagnostics use says what the rules do
    assert [p for p in captured + excluded if inbound.capture.redirects(p)] == captured


def test_an_inbound_log_says_not_captured_at_once_and_waits_only_for_redirected_ports(
    tmp_path: Path,
) -> None:
    log = tmp_path / "inbound-access.log"  # nothing written: no connection went through
    capture = pod_inbound([deployment()], "httpbin").capture
    assert "(not captured)" in InboundLog(log, capture).on_port(15090)  # excluded: no wait
    assert "(not captured)" in InboundLog(log, None).on_port(15091)  # rules never installed
    # a redirected port whose line has not come is said to be so, never "not captured"
    said = connections_on_port(log, 15091, timeout=0.2)
    assert said == "no line for port 15091 in virtualInbound's access log after 0.2s"


def test_gateways_are_not_captured() -> None:
    gw = deployment()
    gw["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    rules = iptables_rules(pod_inbound([gw], "httpbin").capture)
    assert not _redirected(rules, 15091)


def test_bad_exclusion_is_one_clear_error() -> None:
    annotations = {"traffic.sidecar.istio.io/excludeInboundPorts": "15091,metrics"}
    with pytest.raises(UsageError, match="excludeInboundPorts entry 'metrics'"):
        pod_inbound([deployment(annotations)], "httpbin")


# ---- a real Envoy loads every generated configuration ---------------------------------------

_SIDECARS = [s for s in SCENARIOS if s.workloads[0].kind is WorkloadKind.SIDECAR]
_RENDERED = [unit for s in _SIDECARS for unit in s.run_units()]
_SYNTHETIC = list(
    itertools.product(["PERMISSIVE", "STRICT", "DISABLE"], ["http", "tcp", "auto"], [False, True])
)
_FAULTS = [None, Fault.STRICT_CHAIN_ACCEPTS_PLAINTEXT, Fault.PASSTHROUGH_TERMINATES_TLS]


def _validate(bootstraps: list[dict[str, Any]], tmp_path: Path) -> None:
    for i, bootstrap in enumerate(bootstraps):
        path = tmp_path / f"bootstrap-{i}.json"
        path.write_text(json.dumps(bootstrap))
        done = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, f"{path}: {done.stdout[-1500:]}"


def _bootstrap(objects: list[dict[str, Any]], sds: SdsFiles, fault: Fault | None) -> dict[str, Any]:
    inbound = pod_inbound(objects, "httpbin")
    listener = virtual_inbound_listener(
        inbound, sds, access_log=sds.directory / "x.log", fault=fault
    )
    spec = _SIDECARS[0].workloads[0]
    return build_bootstrap(
        spec,
        node_id="sidecar~10.0.0.9~httpbin.demo~demo.svc.cluster.local",
        loopback="127.0.0.1",
        wildcard="0.0.0.0",  # noqa: S104
        sds=sds,
        localhost_only=False,
        virtual_inbound=(listener, inbound_clusters(inbound, "10.0.0.9")),
    )


def test_envoy_loads_every_rendered_configuration(sds: SdsFiles, tmp_path: Path) -> None:
    bootstraps = []
    for unit in _RENDERED:
        objects = scenario_manifests(
            unit.scenario, unit.mtls_mode, "1.31", namespace=NS, variant=unit.variant
        )
        bootstraps.append(_bootstrap(objects, sds, None))
    _validate(bootstraps, tmp_path)


def test_envoy_loads_every_synthetic_combination(sds: SdsFiles, tmp_path: Path) -> None:
    bootstraps = []
    for (mode, proto, with_sidecar), fault in itertools.product(_SYNTHETIC, _FAULTS):
        objects = [peer_auth(mode, {15092: "PERMISSIVE"}), deployment(), service(PORT_NAMES[proto])]
        if with_sidecar:
            objects.append(sidecar())
        bootstraps.append(_bootstrap(objects, sds, fault))
    _validate(bootstraps, tmp_path)


def test_port_level_mode_misses_a_secure_port_that_is_also_a_service_port() -> None:
    """needPerPortPassthroughFilterChain skips a port any Service targets, and
    conflictWithReservedListener skips that Service chain: portLevelMtls PERMISSIVE on
    15092 then changes nothing, the port-less STRICT passthrough takes it."""
    annotations = {
        "proxy.istio.io/config": "proxyMetadata:\n  ENVOY_SECURE_MERGED_METRICS_PORT: '15092'\n"
    }
    objects = [
        peer_auth("STRICT", {15091: "PERMISSIVE", 15092: "PERMISSIVE"}),
        deployment(annotations),
        service("https-merged", 15092),
    ]
    inbound = pod_inbound(objects, "httpbin")
    assert inbound.group_for(15091).mode == "PERMISSIVE"
    merged = inbound.group_for(15092)
    assert merged.port == 0
    assert merged.mode == "STRICT"
