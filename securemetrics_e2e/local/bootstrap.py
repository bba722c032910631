"""Envoy bootstrap in the layout Istio's pilot-agent generates for secure metrics.

Facts from ISTIO-FACTS.md (istio/istio tools/packaging/common/envoy_bootstrap.json and the
1.31 secure-metrics change): admin on localhost:15000; a plaintext stats listener on
15090 routing ``/stats/prometheus`` to the admin port; static listeners ``0.0.0.0_<port>``
for the secure ports with a ``tls_inspector`` listener filter and ONE filter chain that
matches ``transport_protocol: tls`` (so plaintext finds no chain and is closed); a
``DownstreamTlsContext`` requiring a client certificate, serving the SDS secret
``default`` and validating clients against the SDS secret ``ROOTCA``, with no SAN check
and no ALPN. The Envoy-only port routes ``/stats/prometheus`` to the admin port; the
merged port routes ``/stats/prometheus`` and ``/metrics`` to the agent on 15020.

Secrets come from files that Envoy watches (file-based SDS), so a rotated certificate
is served without a restart, as the agent's SDS server does in a pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securemetrics_e2e.catalog import (
    ADMIN_PORT,
    AGENT_PORT,
    ENVOY_STATS_PORT,
    MetricsMode,
    WorkloadKind,
    WorkloadSpec,
)
from securemetrics_e2e.local.faults import Fault

STATUS_PORT = 15021
_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
_FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"


@dataclass(frozen=True)
class SdsFiles:
    """Where the file-based SDS resources for a proxy live."""

    directory: Path  # watched by Envoy: secrets are replaced by atomic rename into it

    @property
    def default(self) -> Path:
        return self.directory / "default.yaml"

    @property
    def rootca(self) -> Path:
        return self.directory / "rootca.yaml"


def static_cluster(name: str, address: str, port: int) -> dict[str, Any]:
    """A STATIC cluster of one endpoint."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.250s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "protocol": "TCP",
                                        "address": address,
                                        "port_value": port,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def http_manager(stat_prefix: str, routes: list[tuple[str, str]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _HCM,
            "codec_type": "AUTO",
            "stat_prefix": stat_prefix,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "backend",
                        "domains": ["*"],
                        "routes": [
                            {"match": {"prefix": prefix}, "route": {"cluster": cluster}}
                            for prefix, cluster in routes
                        ],
                    }
                ]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}
            ],
        },
    }


def sds_secret_config(name: str, path: Path, watched: Path) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {"path": str(path), "watched_directory": {"path": str(watched)}},
            "resource_api_version": "V3",
        },
    }


def socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"protocol": "TCP", "address": address, "port_value": port}}


def _secure_listener(
    port: int,
    wildcard: str,
    routes: list[tuple[str, str]],
    sds: SdsFiles,
    *,
    stat_prefix: str,
    fault: Fault | None,
) -> dict[str, Any]:
    if fault is Fault.STATS_ROUTE_MISSING:
        routes = [(p, c) for p, c in routes if p != "/stats/prometheus"]
    chain: dict[str, Any] = {"filters": [http_manager(stat_prefix, routes)]}
    if fault is Fault.STATS_ROUTE_EMPTY:
        hcm = chain["filters"][0]["typed_config"]
        for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
            if route["route"]["cluster"] == "prometheus_stats":
                route.pop("route")
                route["direct_response"] = {"status": 200}
    listener: dict[str, Any] = {
        "name": f"{wildcard}_{port}",
        "address": socket_address(wildcard, port),
        "filter_chains": [chain],
    }
    if fault is Fault.PLAINTEXT_SECURE_PORT:
        return listener
    listener["listener_filters"] = [
        {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": _INSPECTOR}}
    ]
    chain["filter_chain_match"] = {"transport_protocol": "tls"}
    chain["transport_socket"] = downstream_tls(
        sds, require_client_certificate=fault is not Fault.CLIENT_CERT_OPTIONAL
    )
    return listener


def downstream_tls(
    sds: SdsFiles,
    *,
    require_client_certificate: bool = True,
    alpn: tuple[str, ...] = (),
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A TLS transport socket serving SDS ``default``, validating clients against ``ROOTCA``."""
    common: dict[str, Any] = {
        "tls_certificate_sds_secret_configs": [
            sds_secret_config("default", sds.default, sds.directory)
        ],
        "validation_context_sds_secret_config": sds_secret_config(
            "ROOTCA", sds.rootca, sds.directory
        ),
    }
    if alpn:
        common["alpn_protocols"] = list(alpn)
    if params:
        common["tls_params"] = params
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS,
            "require_client_certificate": require_client_certificate,
            "common_tls_context": common,
        },
    }


def build_bootstrap(
    spec: WorkloadSpec,
    *,
    node_id: str,
    loopback: str,
    wildcard: str,
    sds: SdsFiles,
    localhost_only: bool,
    fault: Fault | None = None,
    secure_ports: bool = True,
    virtual_inbound: tuple[dict[str, Any], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """The bootstrap for ``spec``'s proxy.

    ``secure_ports`` False: ENVOY_SECURE_METRICS_PORT / ENVOY_SECURE_MERGED_METRICS_PORT
    are unset (0) in the agent's environment, so envoy_bootstrap.json renders no secure
    listener (a Gateway API gateway configured through its pod annotations).

    ``loopback`` is the pod's localhost (127.0.0.1 inside a namespace) and ``wildcard``
    the address listeners bind where Istio binds 0.0.0.0 (the pod's own address on the
    loopback fallback network, where 0.0.0.0 would be shared by every pod).

    ``virtual_inbound`` (the listener and its clusters, see
    :mod:`securemetrics_e2e.local.virtualinbound`) is what istiod adds for a captured
    sidecar. With it, the legacy Sidecar ingress is a chain group of that listener, as
    Istio builds it, instead of a listener of its own.
    """
    clusters = [
        static_cluster("prometheus_stats", loopback, ADMIN_PORT),
        static_cluster("agent", loopback, AGENT_PORT),
    ]
    if virtual_inbound is not None:
        clusters += virtual_inbound[1]
    stats_address = loopback if localhost_only else wildcard
    listeners: list[dict[str, Any]] = [
        {
            "name": f"{stats_address}_{ENVOY_STATS_PORT}",
            "address": socket_address(stats_address, ENVOY_STATS_PORT),
            "filter_chains": [
                {"filters": [http_manager("stats", [("/stats/prometheus", "prometheus_stats")])]}
            ],
        },
        {
            "name": f"{wildcard}_{STATUS_PORT}",
            "address": socket_address(wildcard, STATUS_PORT),
            "filter_chains": [{"filters": [http_manager("agent", [("/healthz/ready", "agent")])]}],
        },
    ]

    def secure(port: int, routes: list[tuple[str, str]], prefix: str) -> None:
        listeners.append(
            _secure_listener(port, wildcard, routes, sds, stat_prefix=prefix, fault=fault)
        )

    if virtual_inbound is not None:
        listeners.append(virtual_inbound[0])
    if not secure_ports:
        pass
    elif spec.mode is MetricsMode.LEGACY and spec.kind is WorkloadKind.SIDECAR:
        if virtual_inbound is None:
            # without capture: a listener of its own with defaultEndpoint 127.0.0.1:15020
            inbound = f"inbound|{spec.secure_merged_port}||"
            clusters.append(static_cluster(inbound, loopback, AGENT_PORT))
            secure(spec.secure_merged_port, [("/", inbound)], "inbound_secure_metrics")
        # with capture the Sidecar ingress port is one of virtualInbound's chain groups
    elif spec.mode is MetricsMode.LEGACY:
        # Gateway server HTTPS ISTIO_MUTUAL + VirtualService to ServiceEntry gateway-admin.local
        outbound = f"outbound|{AGENT_PORT}||gateway-admin.local"
        clusters.append(static_cluster(outbound, loopback, AGENT_PORT))
        secure(spec.secure_merged_port, [("/stats/prometheus", outbound)], "outbound_0.0.0.0_15091")
    else:
        assert spec.secure_envoy_port is not None
        envoy_routes = [("/stats/prometheus", "prometheus_stats")]
        if fault is Fault.ENVOY_PORT_ROUTES_ALL:
            envoy_routes.append(("/", "agent"))
        secure(spec.secure_envoy_port, envoy_routes, "secure_stats")
        secure(
            spec.secure_merged_port,
            [("/stats/prometheus", "agent"), ("/metrics", "agent")],
            "secure_merged_stats",
        )

    return {
        "node": {"id": node_id, "cluster": spec.name},
        "admin": {
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": _FILE_LOG,
                        "path": "/dev/null",
                    },
                }
            ],
            "address": socket_address(loopback, ADMIN_PORT),
        },
        "static_resources": {"clusters": clusters, "listeners": listeners},
        "stats_config": {"stats_matcher": {"inclusion_list": {"patterns": _STATS_INCLUSION}}},
    }


#: the stats a pilot-agent bootstrap keeps: envoy_bootstrap.json's stats_matcher inclusion
#: list as istio/istio pkg/bootstrap/config.go fills it by default (getStatsOptions: the
#: v2Prefixes "reporter=", requiredEnvoyStatsMatcherInclusionPrefixes, the v2Suffix
#: prefixes "component" and "istio", rbacEnvoyStatsMatcherInclusionSuffix, and
#: requiredEnvoyStatsMatcherInclusionRegexes; "downstream_cx_active" only with
#: EXIT_ON_ZERO_ACTIVE_CONNECTIONS). An Envoy without it renders every stat it has: ten
#: times the samples per scrape for Prometheus to ingest and the probes to parse.
_STATS_INCLUSION: list[dict[str, Any]] = [
    *(
        {"prefix": p}
        for p in (
            "reporter=",
            "cluster_manager",
            "listener_manager",
            "server",
            "cluster.xds-grpc",
            "wasm",
            "component",
            "istio",
        )
    ),
    *({"suffix": s} for s in ("rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied")),
    {"safe_regex": {"regex": r"vhost\.*\.route\.*"}},
]


def sds_secret_default(cert_chain_pem: bytes, key_pem: bytes) -> dict[str, Any]:
    """The SDS resource ``default``: the workload certificate and its key."""
    return {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "default",
                "tls_certificate": {
                    "certificate_chain": {"inline_string": cert_chain_pem.decode()},
                    "private_key": {"inline_string": key_pem.decode()},
                },
            }
        ]
    }


def sds_secret_rootca(roots_pem: bytes) -> dict[str, Any]:
    """The SDS resource ``ROOTCA``: the trust anchors client certificates must chain to."""
    return {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "ROOTCA",
                "validation_context": {"trusted_ca": {"inline_string": roots_pem.decode()}},
            }
        ]
    }
