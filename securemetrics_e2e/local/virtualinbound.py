"""The ``virtualInbound`` listener and its clusters, rendered for a real Envoy.

From a :class:`~securemetrics_e2e.local.inbound.PodInbound` this builds what istiod sends a
sidecar for its inbound side (istio/istio ``pilot/pkg/networking/core/listener_inbound.go``
``inboundVirtualListener``, ``buildInboundListener``, ``populateListenerFilters``,
``inboundChainForOpts``, ``buildInboundBlackhole``; ``cluster_builder.go``
``buildInboundPassthroughCluster`` and ``buildInboundCluster``;
``pilot/pkg/security/authn/utils/utils.go`` ``BuildInboundTLS``):

* listener ``virtualInbound`` on 0.0.0.0:15006, no ``use_original_dst``, listener filters
  ``original_dst``, then ``tls_inspector`` and ``http_inspector`` switched off on the ports
  whose chains do not need them (``filter_disabled`` destination-port predicates);
* a blackhole chain for connections addressed to 15006 itself, then one group of chains
  per :class:`ChainGroup`, matched by ``destination_port`` (none for the passthrough group);
* terminating chains carry the mesh mTLS context: the workload certificate (SDS ``default``),
  client certificates required and validated against SDS ``ROOTCA`` (the same file SDS as
  the bootstrap), ALPN ``h2,http/1.1`` (HTTP) or ``istio-peer-exchange,h2,http/1.1`` (TCP),
  TLS 1.2-1.3 with Istio's cipher list;
* ``InboundPassthroughCluster`` (ORIGINAL_DST, source bound to 127.0.0.6), ORIGINAL_DST
  ``inbound|<port>||`` clusters for Service ports (same bind), STATIC ones for a Sidecar's
  ``defaultEndpoint``; ``BlackHoleCluster``.

Istio's own network filters (``istio.metadata_exchange``, ``istio.stats``, RBAC) are not in
upstream Envoy and carry no secure-metrics behaviour; they are left out. Every chain logs
``%FILTER_CHAIN_NAME%`` and the downstream TLS facts, so a run can say which chain a
connection took (the same access-log operators work in a cluster's Envoy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from securemetrics_e2e.local.bootstrap import (
    SdsFiles,
    downstream_tls,
    http_manager,
    socket_address,
    static_cluster,
)
from securemetrics_e2e.local.faults import Fault
from securemetrics_e2e.local.inbound import (
    BLACKHOLE_CLUSTER,
    INBOUND_CAPTURE_PORT,
    PASSTHROUGH_BIND,
    PASSTHROUGH_CLUSTER,
    PLAINTEXT_HTTP_ALPNS,
    RAW,
    TLS,
    Capture,
    ChainGroup,
    InboundCluster,
    MatchOption,
    Mtls,
    PodInbound,
    Protocol,
)
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

LISTENER_NAME: Final = "virtualInbound"
_TYPES: Final = "type.googleapis.com/envoy.extensions."
_TCP_PROXY: Final = _TYPES + "filters.network.tcp_proxy.v3.TcpProxy"
_ORIGINAL_DST: Final = _TYPES + "filters.listener.original_dst.v3.OriginalDst"
_TLS_INSPECTOR: Final = _TYPES + "filters.listener.tls_inspector.v3.TlsInspector"
_HTTP_INSPECTOR: Final = _TYPES + "filters.listener.http_inspector.v3.HttpInspector"
_FILE_LOG: Final = _TYPES + "access_loggers.file.v3.FileAccessLog"
# utils.go SupportedCiphers; TLS 1.2 minimum (the mesh default), 1.3 maximum
_CIPHERS: Final = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
)
_TLS_PARAMS: Final = {
    "cipher_suites": list(_CIPHERS),
    "tls_minimum_protocol_version": "TLSv1_2",
    "tls_maximum_protocol_version": "TLSv1_3",
}
ALPN_HTTP: Final = ("h2", "http/1.1")  # util.ALPNHttp
ALPN_TCP_WITH_MXC: Final = ("istio-peer-exchange", "h2", "http/1.1")  # util.ALPNDownstreamWithMxc
#: one line per connection: the chain it took and what TLS the sidecar terminated
ACCESS_LOG_FORMAT: Final = (
    "chain=%FILTER_CHAIN_NAME% port=%DOWNSTREAM_LOCAL_PORT% "
    "tls=%DOWNSTREAM_TLS_VERSION% peer=%DOWNSTREAM_PEER_URI_SAN% "
    "upstream=%UPSTREAM_HOST% flags=%RESPONSE_FLAGS%\n"
)


def _access_log(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": _FILE_LOG,
                "path": str(path),
                "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
            },
        }
    ]


def _tcp_proxy(stat_prefix: str, cluster: str, log: Path | None) -> dict[str, Any]:
    config: dict[str, Any] = {"@type": _TCP_PROXY, "stat_prefix": stat_prefix, "cluster": cluster}
    if log is not None:
        config["access_log"] = _access_log(log)
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": config}


def _http(stat_prefix: str, cluster: str, log: Path | None) -> dict[str, Any]:
    hcm = http_manager(stat_prefix, [("/", cluster)])
    if log is not None:
        hcm["typed_config"]["access_log"] = _access_log(log)
    return hcm


def _chain(
    group: ChainGroup, option: MatchOption, sds: SdsFiles, log: Path | None
) -> dict[str, Any]:
    match: dict[str, Any] = {"transport_protocol": option.transport}
    if group.port:
        match["destination_port"] = group.port
    if option.alpns:
        match["application_protocols"] = list(option.alpns)
    # StatPrefix: a passthrough chain uses its cluster name, for compatibility
    stat_prefix = group.cluster if group.passthrough else f"inbound_0.0.0.0_{group.port}"
    if option.protocol is Protocol.HTTP:
        filters = [_http(stat_prefix, group.cluster, log)]
    else:
        filters = [_tcp_proxy(group.cluster, group.cluster, log)]
    chain: dict[str, Any] = {
        "name": group.chain_name(option),
        "filter_chain_match": match,
        "filters": filters,
    }
    if option.terminate:
        alpn = ALPN_HTTP if option.protocol is Protocol.HTTP else ALPN_TCP_WITH_MXC
        chain["transport_socket"] = downstream_tls(sds, alpn=alpn, params=_TLS_PARAMS)
    return chain


def _options(group: ChainGroup, fault: Fault | None) -> tuple[MatchOption, ...]:
    options = group.options
    if fault is Fault.STRICT_CHAIN_ACCEPTS_PLAINTEXT and group.mode is Mtls.STRICT:
        # the broken control plane also gives STRICT groups a plaintext chain
        return (*options, MatchOption(Protocol.TCP, RAW))
    if fault is Fault.PASSTHROUGH_TERMINATES_TLS and group.mode is Mtls.PERMISSIVE:
        # ... or terminates the plain (non-Istio ALPN) TLS it should pass through
        return tuple(
            MatchOption(o.protocol, o.transport, o.alpns, terminate=True)
            if o.transport == TLS and not o.alpns
            else o
            for o in options
        )
    return options


def _blackhole() -> dict[str, Any]:
    return {
        "name": "virtualInbound-blackhole",
        "filter_chain_match": {"destination_port": INBOUND_CAPTURE_PORT},
        "filters": [_tcp_proxy(BLACKHOLE_CLUSTER, BLACKHOLE_CLUSTER, None)],
    }


def _port_range(port: int) -> dict[str, Any]:
    return {"destination_port_range": {"start": port, "end": port + 1}}


def _excluding(ports: list[int]) -> dict[str, Any]:
    """listenerPredicateExcludePorts: a predicate true for any of ``ports``."""
    rules = [_port_range(p) for p in sorted(ports)]
    return rules[0] if len(rules) == 1 else {"or_match": {"rules": rules}}


def _listener_filters(chains: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """populateListenerFilters: which inspector each destination port needs."""
    tls: dict[int, bool] = {}
    http: dict[int, bool] = {}
    for chain in chains:
        match = chain.get("filter_chain_match", {})
        port = int(match.get("destination_port", 0))
        alpns = match.get("application_protocols", [])
        tls[port] = tls.get(port, False) or match.get("transport_protocol") == TLS
        http[port] = http.get(port, False) or any(a in PLAINTEXT_HTTP_ALPNS for a in alpns)
    filters: list[dict[str, Any]] = [
        {"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": _ORIGINAL_DST}}
    ]
    if any(tls.values()):
        inspector: dict[str, Any] = {
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": _TLS_INSPECTOR, "initial_read_buffer_size": 512},
        }
        default_on = tls.get(0, False)
        # buildTLSInspector: opt ports out when the port-less chains need it, else opt in
        ports = [p for p, need in tls.items() if p and need != default_on]
        if ports:
            rule = _excluding(ports)
            inspector["filter_disabled"] = rule if default_on else {"not_match": rule}
        filters.append(inspector)
    if any(http.values()):
        inspector = {
            "name": "envoy.filters.listener.http_inspector",
            "typed_config": {"@type": _HTTP_INSPECTOR},
        }
        off = [p for p, need in http.items() if not need]  # buildHTTPInspector (port 0 too)
        if off:
            inspector["filter_disabled"] = _excluding(off)
        filters.append(inspector)
    return filters


def virtual_inbound_listener(
    inbound: PodInbound,
    sds: SdsFiles,
    *,
    access_log: Path | None = None,
    fault: Fault | None = None,
) -> dict[str, Any]:
    """The ``virtualInbound`` listener of ``inbound``'s sidecar."""
    chains = [_blackhole()]
    for group in inbound.groups:
        for option in _options(group, fault):
            chains.append(_chain(group, option, sds, access_log))
    return {
        "name": LISTENER_NAME,
        "address": socket_address("0.0.0.0", INBOUND_CAPTURE_PORT),  # noqa: S104 (pod netns)
        "traffic_direction": "INBOUND",
        "continue_on_listener_filters_timeout": True,
        "listener_filters_timeout": "0s",  # mesh protocolDetectionTimeout default: none
        "listener_filters": _listener_filters(chains),
        "filter_chains": chains,
        # setListenerAccessLog: connections no chain matched (flag NR) are logged too
        "access_log": _access_log(access_log),
    }


def _original_dst(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        "upstream_bind_config": {"source_address": {"address": PASSTHROUGH_BIND, "port_value": 0}},
    }


def _cluster(cluster: InboundCluster, pod_ip: str) -> dict[str, Any]:
    if cluster.endpoint is None:
        return _original_dst(cluster.name)
    host, port = cluster.endpoint
    # cluster.go: 0.0.0.0 in defaultEndpoint means the pod's own address
    return static_cluster(cluster.name, pod_ip if host == "0.0.0.0" else host, port)  # noqa: S104


def inbound_clusters(inbound: PodInbound, pod_ip: str) -> list[dict[str, Any]]:
    """The clusters ``virtualInbound``'s chains route to."""
    blackhole = {"name": BLACKHOLE_CLUSTER, "type": "STATIC", "connect_timeout": "10s"}
    return [
        blackhole,
        _original_dst(PASSTHROUGH_CLUSTER),
        *(_cluster(c, pod_ip) for c in inbound.clusters),
    ]


@dataclass(frozen=True)
class InboundConnection:
    """One line of the virtualInbound access log (:data:`ACCESS_LOG_FORMAT`)."""

    chain: str
    port: int
    tls: str  # the TLS version the sidecar terminated, "" when it did not
    peer: str  # the client certificate's URI SAN, when the sidecar terminated mTLS
    upstream: str
    flags: str

    def describe(self) -> str:
        if self.chain == "-":
            return f"no virtualInbound chain matched, the connection was closed ({self.flags})"
        if self.tls:
            how = f"the sidecar terminated {self.tls}" + (f" from {self.peer}" if self.peer else "")
        else:
            how = "the sidecar did not terminate TLS"
        upstream = f", forwarded to {self.upstream}" if self.upstream else ", not forwarded"
        flags = f" ({self.flags})" if self.flags else ""
        return f"virtualInbound chain {self.chain!r}: {how}{upstream}{flags}"


def parse_access_log(text: str) -> list[InboundConnection]:
    """The connections an access log written with :data:`ACCESS_LOG_FORMAT` records."""
    found = []
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "chain" not in fields or not fields.get("port", "").isdigit():
            continue
        found.append(
            InboundConnection(
                chain=fields["chain"],
                port=int(fields["port"]),
                tls="" if fields.get("tls") == "-" else fields.get("tls", ""),
                peer="" if fields.get("peer") == "-" else fields.get("peer", ""),
                upstream="" if fields.get("upstream") == "-" else fields.get("upstream", ""),
                flags="" if fields.get("flags") == "-" else fields.get("flags", ""),
            )
        )
    return found


#: how long to wait for a line about a port virtualInbound does receive: Envoy writes it
#: when a connection closes (the probe's, or a keep-alive one of Prometheus' that may stay
#: open for minutes) and flushes the file every 100 ms (envoy.py,
#: --file-flush-interval-msec); the annotation is evidence, not worth a long wait
FLUSH_WAIT_S: Final = 1.0


@dataclass(frozen=True)
class InboundLog:
    """A captured sidecar's virtualInbound access log, and the capture that feeds it."""

    path: Path
    capture: Capture | None  # None: the rules were never installed (a failed istio-init)

    def on_port(self, port: int) -> str:
        """What the log says of connections to ``port``, as one line. A port the pod's
        rules do not redirect is said to be so at once: waiting for a line that cannot
        come would only make "not captured" a guess about Envoy's flush."""
        if self.capture is None or not self.capture.redirects(port):
            return f"no connection to port {port} went through virtualInbound (not captured)"
        return connections_on_port(self.path, port)


def connections_on_port(log: Path, port: int, timeout: float = FLUSH_WAIT_S) -> str:
    """What ``log`` records for connections to ``port`` (waiting up to ``timeout`` for
    Envoy to write and flush it), as one line."""

    def lines() -> list[InboundConnection]:
        text = log.read_text() if log.exists() else ""
        found = [c for c in parse_access_log(text) if c.port == port]
        if not found:
            raise NotYet(f"no line for port {port} in {log}")
        return found

    try:
        found = wait_for(f"virtualInbound access log for port {port}", lines, timeout=timeout)
    except WaitTimeout:
        return f"no line for port {port} in virtualInbound's access log after {timeout:g}s"
    return "; ".join(dict.fromkeys(c.describe() for c in found))
