"""What Istio makes of a sidecar pod's inbound side, derived from the rendered manifests.

A pure model: from the Kubernetes objects the cluster backend would apply (the Deployment's
pod template, the Services selecting it, a Sidecar with ingress listeners, PeerAuthentications)
it computes the chain groups of the ``virtualInbound`` listener on 15006 and the ports the
pod's iptables capture redirects there. :mod:`securemetrics_e2e.local.virtualinbound` renders
the groups as Envoy configuration and :mod:`securemetrics_e2e.local.capture` the rules.

Istio sources followed (istio/istio master, 2026-08):

* ``pilot/pkg/networking/core/listener_inbound.go``: ``buildInboundChainConfigs`` (Service
  target ports, or ONLY the Sidecar's ingress ports when the Sidecar has any:
  ``PILOT_ALLOW_SIDECAR_SERVICE_INBOUND_LISTENER_MERGE`` defaults to false), one chain group
  per target port, the oldest Service wins a shared port; ``buildInboundPassthroughChains``
  (the port-less passthrough chains, plus per-port ones for ``portLevelMtls`` ports).
* ``pilot/pkg/model/context.go`` ``conflictWithReservedListener``: no chain group on the status
  port, the Prometheus port, the secure metrics ports (when set) or 15001/15006, for a Service
  port (bound to the wildcard) or an HTTP Sidecar ingress port without ``bind``.
* ``pilot/pkg/networking/plugin/authn/authentication.go`` ``ForPassthrough`` and
  ``needPerPortPassthroughFilterChain``; ``pilot/pkg/security/authn/policy_applier.go``
  ``ComposePeerAuthentication`` (PERMISSIVE by default; mesh, then namespace, then workload
  policy; ``portLevelMtls`` only on a workload policy, UNSET inheriting the workload mode).
* ``pilot/pkg/networking/core/filterchain_options.go`` ``getFilterChainMatchOptions`` and
  ``pilot/pkg/networking/core/listener.go`` (the ALPN lists).
* ``pkg/config/kube/conversion.go`` ``ConvertProtocol`` and
  ``pilot/pkg/networking/networking.go`` ``ModelProtocolToListenerProtocol`` (a port's protocol).
* ``pilot/pkg/networking/core/cluster.go`` ``buildInboundClustersFromSidecar`` (a Sidecar
  ingress ``defaultEndpoint`` becomes a STATIC ``inbound|<port>||`` cluster).
* ``manifests/charts/istio-control/istio-discovery/files/injection-template.yaml`` (the
  istio-iptables ``-b``/``-d`` arguments) and ``pkg/kube/inject/template.go``
  ``excludeInboundPort`` (the status port appended to the exclusions).

Not modelled: creation-time ordering between several policies of one level (the first in
the manifests wins), TLS on Sidecar ingress (``ENABLE_TLS_ON_SIDECAR_INGRESS`` is off by
default), HBONE/ambient, dual stack, ``bind`` addresses other than the wildcard.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from securemetrics_e2e.audit import proxy_metadata
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.istionames import EXCLUDE_INBOUND_PORTS, INCLUDE_INBOUND_PORTS, INJECT

#: ports of the proxy itself (pilot ``ProxyInboundListenPort``, ``ProxyListenPort``, the HBONE
#: tunnel port, the injector's default statusPort, Envoy's status and Prometheus ports)
INBOUND_CAPTURE_PORT: Final = 15006
OUTBOUND_CAPTURE_PORT: Final = 15001
TUNNEL_PORT: Final = 15008
AGENT_STATUS_PORT: Final = 15020
ENVOY_STATUS_PORT: Final = 15021
ENVOY_PROMETHEUS_PORT: Final = 15090

PASSTHROUGH_CLUSTER: Final = "InboundPassthroughCluster"  # pilot/pkg/networking/util/util.go
BLACKHOLE_CLUSTER: Final = "BlackHoleCluster"
#: the source Envoy binds for inbound ORIGINAL_DST clusters (listener_address.go
#: InboundPassthroughBindIpv4), which iptables' ISTIO_OUTPUT lets pass
PASSTHROUGH_BIND: Final = "127.0.0.6"

# listener.go: HTTP 1.0 is off (PILOT_HTTP10=false), so the plaintext HTTP ALPNs are these
PLAINTEXT_HTTP_ALPNS: Final = ("http/1.1", "h2c")
MTLS_HTTP_ALPNS: Final = ("istio-http/1.0", "istio-http/1.1", "istio-h2")
ALL_ISTIO_MTLS_ALPNS: Final = ("istio", "istio-peer-exchange", *MTLS_HTTP_ALPNS)
MTLS_TCP_WITH_MXC_ALPNS: Final = ("istio-peer-exchange", "istio")

_INJECT_LABEL: Final = INJECT
_EXCLUDE_INBOUND: Final = EXCLUDE_INBOUND_PORTS
_STATUS_PORT_ANNOTATION: Final = "status.sidecar.istio.io/port"


class Mtls(enum.StrEnum):
    """A port's effective PeerAuthentication mode (model.MutualTLSMode)."""

    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"


class Protocol(enum.StrEnum):
    """A listener protocol (networking.ListenerProtocol)."""

    HTTP = "HTTP"
    TCP = "TCP"
    AUTO = "AUTO"  # not declared: sniffed, split into HTTP and TCP chains


TLS: Final = "tls"
RAW: Final = "raw_buffer"


@dataclass(frozen=True)
class MatchOption:
    """One filter chain of a group (filterchain_options.go FilterChainMatchOptions)."""

    protocol: Protocol  # HTTP (an HTTP connection manager) or TCP (a tcp_proxy)
    transport: str  # "tls" or "raw_buffer"
    alpns: tuple[str, ...] = ()
    terminate: bool = False  # the chain terminates TLS with the mesh mTLS context


_H, _T = Protocol.HTTP, Protocol.TCP
# filterchain_options.go, variable for variable (the ...WithMxc ones are the PERMISSIVE ones)
_OPTIONS: Final[dict[tuple[Protocol, Mtls], tuple[MatchOption, ...]]] = {
    (_H, Mtls.STRICT): (MatchOption(_H, TLS, terminate=True),),
    (_H, Mtls.PERMISSIVE): (
        MatchOption(_H, TLS, ALL_ISTIO_MTLS_ALPNS, terminate=True),
        MatchOption(_H, RAW),
    ),
    (_H, Mtls.DISABLE): (MatchOption(_H, RAW),),
    (Protocol.AUTO, Mtls.STRICT): (
        MatchOption(_H, TLS, MTLS_HTTP_ALPNS, terminate=True),
        MatchOption(_T, TLS, terminate=True),
    ),
    (Protocol.AUTO, Mtls.PERMISSIVE): (
        MatchOption(_H, TLS, MTLS_HTTP_ALPNS, terminate=True),
        MatchOption(_H, RAW, PLAINTEXT_HTTP_ALPNS),
        MatchOption(_T, TLS, MTLS_TCP_WITH_MXC_ALPNS, terminate=True),
        MatchOption(_T, RAW),
        MatchOption(_T, TLS),  # one-way TLS of a client without a sidecar: passed through
    ),
    (Protocol.AUTO, Mtls.DISABLE): (
        MatchOption(_H, RAW, PLAINTEXT_HTTP_ALPNS),
        MatchOption(_T, RAW),
    ),
    (_T, Mtls.STRICT): (MatchOption(_T, TLS, terminate=True),),
    (_T, Mtls.PERMISSIVE): (
        MatchOption(_T, TLS, ALL_ISTIO_MTLS_ALPNS, terminate=True),
        MatchOption(_T, TLS),  # plain TLS: passed through untouched
        MatchOption(_T, RAW),
    ),
    (_T, Mtls.DISABLE): (MatchOption(_T, RAW),),
}


def chain_options(protocol: Protocol, mode: Mtls) -> tuple[MatchOption, ...]:
    """getFilterChainMatchOptions: the chains of a group of ``protocol`` under ``mode``."""
    return _OPTIONS[(protocol, mode)]


@dataclass(frozen=True)
class ChainGroup:
    """The filter chains virtualInbound holds for one destination port (0: any port)."""

    port: int
    protocol: Protocol
    mode: Mtls
    cluster: str
    passthrough: bool
    origin: str  # which object made it, for reports

    @property
    def options(self) -> tuple[MatchOption, ...]:
        return chain_options(self.protocol, self.mode)

    def chain_name(self, option: MatchOption) -> str:
        """inboundChainConfig.Name: fixed names for passthrough chains, else bind_port."""
        if self.passthrough:
            return "virtualInbound-catchall-http" if option.protocol is _H else "virtualInbound"
        return f"0.0.0.0_{self.port}"


@dataclass(frozen=True)
class InboundCluster:
    """An inbound cluster: STATIC to ``endpoint``, or ORIGINAL_DST bound to 127.0.0.6."""

    name: str
    endpoint: tuple[str, int] | None = None


@dataclass(frozen=True)
class Capture:
    """The istio-iptables inbound arguments: ``-b`` include and ``-d`` exclude."""

    include: str  # "*", "" (capture nothing) or a comma-separated list of ports
    exclude: tuple[int, ...]

    def redirects(self, port: int) -> bool:
        """Whether the rules istio-iptables installs for these arguments send a
        connection to ``port`` to virtualInbound (capture.iptables_rules, as rules)."""
        if port == TUNNEL_PORT or self.include == "":
            return False
        if self.include == "*":
            return port not in self.exclude
        return str(port) in {p.strip() for p in self.include.split(",")}


@dataclass(frozen=True)
class PodInbound:
    """Everything the inbound path of one sidecar pod is made of."""

    namespace: str
    workload: str
    groups: tuple[ChainGroup, ...]  # passthrough groups first, then by port
    clusters: tuple[InboundCluster, ...]
    capture: Capture

    def group_for(self, port: int) -> ChainGroup:
        """The group Envoy selects for a connection to ``port`` (most specific port wins;
        it never falls back to the port-less group)."""
        for group in self.groups:
            if group.port == port:
                return group
        return next(g for g in self.groups if g.port == 0)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("spec") or {}


def _selects(match: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    return all(labels.get(str(k)) == str(v) for k, v in (match or {}).items())


def port_protocol(port: int, name: str, k8s_protocol: str = "TCP", app: str | None = None) -> str:
    """ConvertProtocol: the Istio protocol of a Service port (appProtocol, else name prefix)."""
    if k8s_protocol.upper() == "UDP":
        return "UDP"
    label = app if app is not None else name
    special = {
        "kubernetes.io/h2c": "HTTP2",
        "kubernetes.io/ws": "HTTP",
        "kubernetes.io/wss": "HTTPS",
    }
    if app is not None and app in special:
        return special[app]
    if label.lower().startswith("grpc-web"):
        return "GRPC-Web"
    parsed = _parse_protocol(label.split("-", 1)[0])
    if parsed == "UnsupportedProtocol" and port in (25, 53, 3306, 27017):
        return "TCP"  # conversion.go wellKnownPorts
    return parsed


def _parse_protocol(name: str) -> str:
    # pkg/config/protocol/instance.go Parse (case-insensitive)
    known = {
        "tcp": "TCP",
        "udp": "UDP",
        "grpc": "GRPC",
        "grpc-web": "GRPC-Web",
        "http": "HTTP",
        "http_proxy": "HTTP_PROXY",
        "http2": "HTTP2",
        "https": "HTTPS",
        "tls": "TLS",
        "mongo": "Mongo",
        "redis": "Redis",
        "mysql": "MySQL",
    }
    return known.get(name.lower(), "UnsupportedProtocol")


def listener_protocol(protocol: str) -> Protocol | None:
    """ModelProtocolToListenerProtocol (None for UDP: no inbound chain)."""
    if protocol in ("HTTP", "HTTP2", "HTTP_PROXY", "GRPC", "GRPC-Web"):
        return _H
    if protocol in ("TCP", "HTTPS", "TLS", "Mongo", "Redis", "MySQL"):
        return _T
    if protocol == "UDP":
        return None
    return Protocol.AUTO


def _mode(value: Any) -> Mtls | None:
    """A PeerAuthentication ``mtls`` block's mode; None when UNSET or absent."""
    mode = str((value or {}).get("mode") or "UNSET").upper()
    if mode == "UNSET":
        return None
    try:
        return Mtls(mode)
    except ValueError:
        raise UsageError(
            f"PeerAuthentication mtls mode {mode!r} is not STRICT, PERMISSIVE, DISABLE or UNSET"
        ) from None


@dataclass(frozen=True)
class PeerPolicy:
    """ComposePeerAuthentication's result: the workload mode and its per-port overrides."""

    mode: Mtls
    per_port: Mapping[int, Mtls]

    def for_port(self, port: int) -> Mtls:
        return self.per_port.get(port, self.mode)


def compose_peer_authentication(
    policies: Sequence[Mapping[str, Any]],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = "istio-system",
) -> PeerPolicy:
    """The effective mTLS settings of a workload (policy_applier.go)."""
    mesh = ns = workload = None
    for obj in policies:
        where = _meta(obj).get("namespace")
        selector = (_spec(obj).get("selector") or {}).get("matchLabels")
        if not selector:
            if where == root_namespace:
                mesh = mesh or obj
            elif where == namespace:
                ns = ns or obj
        elif where == namespace and where != root_namespace and _selects(selector, labels):
            workload = workload or obj
    mode = Mtls.PERMISSIVE
    for level in (mesh, ns, workload):
        if level is not None:
            mode = _mode(_spec(level).get("mtls")) or mode
    per_port: dict[int, Mtls] = {}
    for port, setting in ((_spec(workload).get("portLevelMtls") or {}) if workload else {}).items():
        per_port[int(port)] = _mode(setting) or mode
    return PeerPolicy(mode, per_port)


def _static_listener_ports(annotations: Mapping[str, str]) -> set[int]:
    """conflictWithReservedListener: the ports of the bootstrap's static listeners."""
    meta = proxy_metadata(annotations)
    reserved = {ENVOY_STATUS_PORT, ENVOY_PROMETHEUS_PORT}
    for key in ("ENVOY_SECURE_METRICS_PORT", "ENVOY_SECURE_MERGED_METRICS_PORT"):
        value = meta.get(key, "0")
        if value.isdigit() and int(value):
            reserved.add(int(value))
    return reserved


def _endpoint(default_endpoint: str) -> tuple[str, int] | None:
    """A Sidecar ingress ``defaultEndpoint`` (cluster.go): 127.0.0.1:P or 0.0.0.0:P."""
    if not default_endpoint:
        return None
    host, _, port = default_endpoint.rpartition(":")
    if host not in ("127.0.0.1", "0.0.0.0") or not port.isdigit():  # noqa: S104
        raise UsageError(
            f"Sidecar defaultEndpoint {default_endpoint!r} is not 127.0.0.1:<port> or "
            "0.0.0.0:<port>; the local backend models only those"
        )
    return host, int(port)


def _target_port(port: Mapping[str, Any], container_ports: Mapping[str, int]) -> int:
    target = port.get("targetPort", port["port"])
    if isinstance(target, str) and not target.isdigit():
        if target not in container_ports:
            raise UsageError(f"Service targetPort {target!r} names no container port of the pod")
        return container_ports[target]
    return int(target)


def _template(objects: Sequence[Mapping[str, Any]], workload: str) -> Mapping[str, Any]:
    for obj in objects:
        if obj.get("kind") == "Deployment" and _meta(obj).get("name") == workload:
            return obj
    names = [_meta(o).get("name") for o in objects if o.get("kind") == "Deployment"]
    raise UsageError(f"no Deployment {workload!r} among the rendered objects (found {names})")


def is_captured(labels: Mapping[str, str], annotations: Mapping[str, str]) -> bool:
    """Whether the injector gives this pod an istio-init (gateways have none: their
    generated pods carry ``sidecar.istio.io/inject: "false"``)."""
    return labels.get(_INJECT_LABEL, annotations.get(_INJECT_LABEL, "true")) != "false"


def capture_of(annotations: Mapping[str, str]) -> Capture:
    """The istio-iptables ``-b`` and ``-d`` the injection template passes for this pod."""
    include = annotations.get(INCLUDE_INBOUND_PORTS, "*")
    exclude = [p.strip() for p in annotations.get(_EXCLUDE_INBOUND, "").split(",") if p.strip()]
    status = annotations.get(_STATUS_PORT_ANNOTATION, str(AGENT_STATUS_PORT)).strip()
    if status and status != "0" and status not in exclude:
        exclude.append(status)  # template.go excludeInboundPort
    ports: list[int] = []
    for text in ("15090", "15021", *exclude):
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise UsageError(f"{_EXCLUDE_INBOUND} entry {text!r} is not a port number")
        ports.append(int(text))
    for text in include.split(",") if include not in ("*", "") else ():
        if not text.strip().isdigit():
            raise UsageError(f"{INCLUDE_INBOUND_PORTS} entry {text!r} is not a port number or '*'")
    return Capture(include, tuple(ports))


def pod_inbound(
    objects: Sequence[Mapping[str, Any]],
    workload: str,
    *,
    root_namespace: str = "istio-system",
    mesh_policies: Sequence[Mapping[str, Any]] = (),
) -> PodInbound:
    """The inbound path of the pods of Deployment ``workload`` among ``objects``.

    ``objects`` are the manifests of the workload's run unit (its namespace); mesh-wide
    PeerAuthentications live in ``root_namespace`` and may be given as ``mesh_policies``.
    """
    deployment = _template(objects, workload)
    namespace = str(_meta(deployment).get("namespace") or "default")
    template = _spec(deployment).get("template") or {}
    labels = {str(k): str(v) for k, v in (_meta(template).get("labels") or {}).items()}
    annotations = {str(k): str(v) for k, v in (_meta(template).get("annotations") or {}).items()}
    container_ports = {
        str(p["name"]): int(p["containerPort"])
        for c in (_spec(template).get("containers") or [])
        for p in (c.get("ports") or [])
        if "name" in p
    }
    in_namespace = [o for o in objects if _meta(o).get("namespace", namespace) == namespace]
    policy = compose_peer_authentication(
        [*mesh_policies, *(o for o in in_namespace if o.get("kind") == "PeerAuthentication")],
        namespace,
        labels,
        root_namespace,
    )
    static = _static_listener_ports(annotations)
    # a Service port binds the wildcard: the virtual listeners' ports conflict too (a
    # Sidecar ingress is checked without a push context, so only against static ones)
    reserved = static | {INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT}
    sidecar = _sidecar_for(in_namespace, labels)
    groups: dict[int, ChainGroup] = {}
    clusters: list[InboundCluster] = []
    service_ports: set[int] = set()
    ingress = list(_spec(sidecar).get("ingress") or []) if sidecar else []
    sidecar_name = _meta(sidecar).get("name") if sidecar else None
    if not ingress:
        for svc in in_namespace:
            if svc.get("kind") != "Service" or not _spec(svc).get("selector"):
                continue
            if not _selects(_spec(svc).get("selector"), labels):
                continue
            for port in _spec(svc).get("ports") or []:
                target = _target_port(port, container_ports)
                service_ports.add(target)  # ServiceTargets, skipped or not
                proto = port_protocol(
                    target,
                    str(port.get("name", "")),
                    port.get("protocol", "TCP"),
                    port.get("appProtocol"),
                )
                lp = listener_protocol(proto)
                if lp is None or target in reserved or target in groups:
                    continue  # UDP; conflictWithReservedListener; the oldest Service wins
                cluster = f"inbound|{target}||"
                origin = f"Service {_meta(svc).get('name')} port {port.get('name', target)}"
                groups[target] = ChainGroup(
                    target, lp, policy.for_port(target), cluster, False, origin
                )
                clusters.append(InboundCluster(cluster))
    for item in ingress:
        port = item.get("port") or {}
        number = int(port["number"])
        proto = _parse_protocol(str(port.get("protocol", "")))
        lp = listener_protocol(proto)
        # bind "" with an HTTP protocol conflicts like the wildcard; other protocols do not
        if lp is None or (lp is _H and number in static) or number in groups:
            continue
        cluster = f"inbound|{number}||"
        origin = f"Sidecar {sidecar_name} ingress {port.get('name', number)}"
        groups[number] = ChainGroup(number, lp, policy.for_port(number), cluster, False, origin)
        clusters.append(InboundCluster(cluster, _endpoint(str(item.get("defaultEndpoint", "")))))
    passthrough = [
        ChainGroup(0, Protocol.AUTO, policy.mode, PASSTHROUGH_CLUSTER, True, "passthrough")
    ]
    handled = {int(i["port"]["number"]) for i in ingress} if ingress else service_ports
    for port, mode in sorted(policy.per_port.items()):
        if port not in handled:  # needPerPortPassthroughFilterChain
            origin = f"passthrough (portLevelMtls {port})"
            passthrough.append(
                ChainGroup(port, Protocol.AUTO, mode, PASSTHROUGH_CLUSTER, True, origin)
            )
    return PodInbound(
        namespace=namespace,
        workload=workload,
        groups=(*passthrough, *(groups[p] for p in sorted(groups))),
        clusters=tuple(clusters),
        capture=capture_of(annotations) if is_captured(labels, annotations) else Capture("", ()),
    )


def _sidecar_for(
    objects: Sequence[Mapping[str, Any]], labels: Mapping[str, str]
) -> Mapping[str, Any] | None:
    """The Sidecar that applies: one selecting the workload, else the namespace default."""
    fallback = None
    for obj in objects:
        if obj.get("kind") != "Sidecar":
            continue
        selector = (_spec(obj).get("workloadSelector") or {}).get("labels")
        if not selector:
            fallback = fallback or obj
        elif _selects(selector, labels):
            return obj
    return fallback
