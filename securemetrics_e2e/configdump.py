"""Turn an Envoy admin ``config_dump`` into :class:`~securemetrics_e2e.backend.Listener` facts.

Both backends read the same JSON: the local one from Envoy's admin ``/config_dump``, the
cluster one from ``pilot-agent request GET config_dump`` inside ``istio-proxy``. The
parser is a pure function so that what a check sees does not depend on where it ran.

Two shapes of listener matter for secure metrics:

* a real listener per port (Istio's bootstrap ``0.0.0.0_15091``/``0.0.0.0_15092``, a
  gateway's ``0.0.0.0_15091``);
* a sidecar's inbound ports, which Istio does not give listeners of their own: they are
  filter chains of ``virtualInbound`` (15006) matching ``destination_port``. For each
  such port this module also reports a listener of that port built from those chains
  only (named ``virtualInbound|<port>``), so a legacy ``Sidecar`` ingress on 15091 is
  judged exactly like a native 15091 listener, including a PERMISSIVE plaintext chain.
  Where a port has a listener of its own, no slice is reported for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from securemetrics_e2e.backend import Listener
from securemetrics_e2e.errors import SecureMetricsError

LISTENERS_DUMP = "type.googleapis.com/envoy.admin.v3.ListenersConfigDump"
ROUTES_DUMP = "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"
DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"

Json = Mapping[str, Any]
SLICE_SEPARATOR = "|"  # "virtualInbound|15091": the chains of virtualInbound for port 15091


class ConfigDumpError(SecureMetricsError):
    """The text given as a config_dump is not one (wrong JSON shape, no listeners section)."""


def listeners_from_config_dump(dump: Mapping[str, Any]) -> list[Listener]:
    """Every active listener in ``dump``, plus one per ``destination_port`` of a
    listener whose filter chains select by destination port (Istio's virtualInbound).

    Static listeners come first, then dynamic ones (``active_state`` only: a warming or
    failed listener serves nothing yet), each group in the dump's order.
    """
    configs = dump.get("configs")
    if not isinstance(configs, list):
        raise ConfigDumpError(
            "not an Envoy config_dump: no 'configs' list at the top level "
            f"(keys: {', '.join(sorted(map(str, dump))) or 'none'})"
        )
    listeners_dump = _section(configs, LISTENERS_DUMP)
    if listeners_dump is None:
        raise ConfigDumpError(
            "the config_dump has no listeners section "
            f"({LISTENERS_DUMP}); was it filtered with ?resource= or ?mask=?"
        )
    routes = _route_configs(_section(configs, ROUTES_DUMP) or {})
    result: list[Listener] = []
    for raw in _raw_listeners(listeners_dump):
        result.extend(_listeners_of(raw, routes))
    # A port with a listener of its own is served by it as far as configuration goes;
    # a virtualInbound slice for the same port would only shadow it in a by-port lookup.
    dedicated = {item.port for item in result if not _is_slice(item)}
    return [item for item in result if not (_is_slice(item) and item.port in dedicated)]


def listener_on_port(listeners: Iterable[Listener], port: int) -> Listener | None:
    """The listener serving ``port``: a dedicated one before a virtualInbound slice."""
    candidates = [item for item in listeners if item.port == port]
    dedicated = [item for item in candidates if not _is_slice(item)]
    chosen = dedicated or candidates
    return chosen[0] if chosen else None


def _is_slice(listener: Listener) -> bool:
    return SLICE_SEPARATOR in listener.name


# -- sections -------------------------------------------------------------------------


def _section(configs: list[Any], type_url: str) -> Json | None:
    for entry in configs:
        if isinstance(entry, Mapping) and entry.get("@type") == type_url:
            return entry
    return None


def _raw_listeners(section: Json) -> Iterator[Json]:
    for entry in section.get("static_listeners") or []:
        listener = entry.get("listener") if isinstance(entry, Mapping) else None
        if isinstance(listener, Mapping):
            yield listener
    for entry in section.get("dynamic_listeners") or []:
        state = entry.get("active_state") if isinstance(entry, Mapping) else None
        listener = state.get("listener") if isinstance(state, Mapping) else None
        if isinstance(listener, Mapping):
            yield listener


def _route_configs(section: Json) -> dict[str, Json]:
    found: dict[str, Json] = {}
    entries = list(section.get("static_route_configs") or []) + list(
        section.get("dynamic_route_configs") or []
    )
    for entry in entries:
        config = entry.get("route_config") if isinstance(entry, Mapping) else None
        if isinstance(config, Mapping) and isinstance(config.get("name"), str):
            found[config["name"]] = config
    return found


# -- one listener ---------------------------------------------------------------------


def _listeners_of(raw: Json, routes: Mapping[str, Json]) -> list[Listener]:
    name = str(raw.get("name", ""))
    address, port = _address(raw.get("address") or {})
    chains: list[Json] = [c for c in raw.get("filter_chains") or [] if isinstance(c, Mapping)]
    default_chain = raw.get("default_filter_chain")
    all_chains = chains + ([default_chain] if isinstance(default_chain, Mapping) else [])
    result = [_summarise(name, address, port, all_chains, routes)]

    by_port: dict[int, list[Json]] = {}
    for chain in chains:
        dest = (chain.get("filter_chain_match") or {}).get("destination_port")
        if isinstance(dest, int):
            by_port.setdefault(dest, []).append(chain)
    for dest, port_chains in sorted(by_port.items()):
        if dest != port:
            result.append(
                _summarise(f"{name}{SLICE_SEPARATOR}{dest}", address, dest, port_chains, routes)
            )
    return result


def _address(address: Json) -> tuple[str, int]:
    socket = address.get("socket_address")
    if isinstance(socket, Mapping):
        return str(socket.get("address", "")), int(socket.get("port_value", 0) or 0)
    internal = address.get("envoy_internal_address")
    if isinstance(internal, Mapping):
        return f"internal:{internal.get('server_listener_name', '')}", 0
    pipe = address.get("pipe")
    if isinstance(pipe, Mapping):
        return f"unix:{pipe.get('path', '')}", 0
    return "", 0


def _summarise(
    name: str, address: str, port: int, chains: list[Json], routes: Mapping[str, Json]
) -> Listener:
    tls_contexts = [ctx for ctx in (_tls_context(c) for c in chains) if ctx is not None]
    prefixes: list[str] = []
    clusters: list[str] = []
    for chain in chains:
        for filt in chain.get("filters") or []:
            config = filt.get("typed_config") if isinstance(filt, Mapping) else None
            if not isinstance(config, Mapping):
                continue
            if config.get("@type") == HCM:
                route_config = _route_config_of(config, routes)
                _collect_routes(route_config, prefixes, clusters)
            elif config.get("@type") == TCP_PROXY and isinstance(config.get("cluster"), str):
                clusters.append(config["cluster"])
    return Listener(
        name=name,
        address=address,
        port=port,
        tls_only=bool(chains) and all(_chain_is_tls(c) for c in chains),
        client_cert_required=bool(tls_contexts)
        and all(_truthy(ctx.get("require_client_certificate")) for ctx in tls_contexts),
        route_prefixes=tuple(dict.fromkeys(prefixes)),
        upstream_clusters=tuple(dict.fromkeys(clusters)),
    )


def _chain_is_tls(chain: Json) -> bool:
    """A chain only TLS reaches: it matches transport_protocol "tls", or it terminates
    TLS itself (a plaintext client then fails the handshake and gets nothing)."""
    match = chain.get("filter_chain_match") or {}
    return match.get("transport_protocol") == "tls" or _tls_context(chain) is not None


def _tls_context(chain: Json) -> Json | None:
    socket = chain.get("transport_socket")
    if not isinstance(socket, Mapping):
        return None
    config = socket.get("typed_config")
    if isinstance(config, Mapping) and config.get("@type") == DOWNSTREAM_TLS:
        return config
    return None


def _truthy(value: Any) -> bool:
    # proto3 BoolValue wrappers print as a bare JSON bool; older dumps as {"value": true}
    if isinstance(value, Mapping):
        return value.get("value") is True
    return value is True


def _route_config_of(hcm: Json, routes: Mapping[str, Json]) -> Json:
    inline = hcm.get("route_config")
    if isinstance(inline, Mapping):
        return inline
    rds = hcm.get("rds")
    if isinstance(rds, Mapping):
        return routes.get(str(rds.get("route_config_name", "")), {})
    return {}


def _collect_routes(route_config: Json, prefixes: list[str], clusters: list[str]) -> None:
    for vhost in route_config.get("virtual_hosts") or []:
        if not isinstance(vhost, Mapping):
            continue
        for route in vhost.get("routes") or []:
            if not isinstance(route, Mapping):
                continue
            match = route.get("match") or {}
            for key in ("prefix", "path", "path_separated_prefix"):
                if isinstance(match.get(key), str):
                    prefixes.append(match[key])
            action = route.get("route") or {}
            if isinstance(action.get("cluster"), str):
                clusters.append(action["cluster"])
            weighted = action.get("weighted_clusters") or {}
            for entry in weighted.get("clusters") or []:
                if isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                    clusters.append(entry["name"])
