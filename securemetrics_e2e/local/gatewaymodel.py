"""Istio's deployment controller for a Gateway API gateway, as a pure function.

Input: the objects the charts render for a scenario (the ``Gateway``, any ``ProxyConfig``).
Output: what Istio generates for that Gateway's pods, as far as the secure metrics ports
depend on it. Followed from istio/istio:

* ``pilot/pkg/config/kube/gatewaycommon/deploymentcontroller.go`` renders the Deployment
  from ``manifests/charts/istio-control/istio-discovery/files/kube-gateway.yaml`` with
  ``.ProxyConfig`` = ``GetProxyConfigOrDefault(namespace, {gateway-name: <name>}, nil, mesh)``:
  only ProxyConfigs selecting the ``gateway.networking.k8s.io/gateway-name`` label (or
  none: namespace-wide) count, the pod's annotations are not consulted.
* ``pilot/pkg/model/proxy_config.go``: a ProxyConfig's ``environmentVariables`` become
  ``proxyMetadata``; a selecting ProxyConfig wins over a namespace-wide one.
* kube-gateway.yaml: the istio-proxy container's ``env`` lists ``.ProxyConfig.ProxyMetadata``;
  ``spec.infrastructure.annotations`` are copied onto the pod template.
* ``pilot/cmd/pilot-agent/options/options.go``: ``ENVOY_SECURE_METRICS_PORT`` /
  ``ENVOY_SECURE_MERGED_METRICS_PORT`` are read from the agent's process environment only.
* ``pkg/bootstrap/option/instances.go`` (MetricsLocalhostAccessOnly): the 15090 bind follows
  the proxyMetadata of the agent's proxy config, which the agent also merges from the pod's
  ``proxy.istio.io/config`` annotation; ``pkg/features/telemetry.go`` with
  ``pilot/cmd/pilot-agent/status/server.go``: the 15020 403 rule reads the process env.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from securemetrics_e2e.catalog import RunUnit, WorkloadKind
from securemetrics_e2e.istionames import PROXY_CONFIG
from securemetrics_e2e.local.faults import select_nothing
from securemetrics_e2e.manifests import GENERATED_GATEWAY_SUFFIX, scenario_manifests

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
SECURE_PORT_ENV = "ENVOY_SECURE_METRICS_PORT"
SECURE_MERGED_PORT_ENV = "ENVOY_SECURE_MERGED_METRICS_PORT"
LOCALHOST_ONLY_ENV = "METRICS_LOCALHOST_ACCESS_ONLY"
#: infrastructure annotations kube-gateway.yaml does not copy
_OMITTED = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        "gateway.istio.io/name-override",
        "gateway.istio.io/service-account",
        "gateway.istio.io/controller-version",
    }
)


class NoSuchGateway(LookupError):
    """The rendered objects hold no Gateway API Gateway of that name."""


@dataclass(frozen=True)
class GeneratedGateway:
    """The proxy Istio generates for one Gateway: its pod annotations and environment."""

    name: str
    pod_annotations: Mapping[str, str]
    #: the istio-proxy container's env from ProxyConfig proxyMetadata (kube-gateway.yaml)
    env: Mapping[str, str]
    #: proxyMetadata of the pod's proxy.istio.io/config annotation (the agent merges it into
    #: its proxy config, not into its process environment)
    annotation_metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def deployment(self) -> str:
        """The generated Deployment's name: the catalog workload this gateway is."""
        return f"{self.name}{GENERATED_GATEWAY_SUFFIX}"

    def _port(self, variable: str) -> int | None:
        value = self.env.get(variable, "0")
        return int(value) if value.isdigit() and int(value) else None

    @property
    def secure_envoy_port(self) -> int | None:
        return self._port(SECURE_PORT_ENV)

    @property
    def secure_merged_port(self) -> int | None:
        return self._port(SECURE_MERGED_PORT_ENV)

    @property
    def opens_secure_ports(self) -> bool:
        """Whether the bootstrap renders the secure listeners (both variables non-zero)."""
        return self.secure_envoy_port is not None and self.secure_merged_port is not None

    @property
    def stats_localhost_only(self) -> bool:
        """15090 binds localhost: the flag in the agent's merged proxyMetadata."""
        merged = {**self.env, **self.annotation_metadata}
        return merged.get(LOCALHOST_ONLY_ENV, "").lower() == "true"

    @property
    def agent_localhost_only(self) -> bool:
        """15020 answers 403 to other pods: the flag in the process environment."""
        return self.env.get(LOCALHOST_ONLY_ENV, "").lower() == "true"


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _is_gateway_api(obj: Mapping[str, Any]) -> bool:
    return obj.get("kind") == "Gateway" and str(obj.get("apiVersion", "")).startswith(
        "gateway.networking.k8s.io/"
    )


def _selects(proxy_config: Mapping[str, Any], labels: Mapping[str, str]) -> bool | None:
    """True: selects these labels; None: namespace-wide (no selector); False: does not."""
    selector = (proxy_config.get("spec") or {}).get("selector")
    if not selector:
        return None
    wanted = selector.get("matchLabels") or {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def _proxy_metadata(
    objects: Iterable[Mapping[str, Any]], namespace: str, name: str
) -> dict[str, str]:
    """EffectiveProxyConfig (pilot/pkg/model/proxy_config.go) for the gateway-name label: the
    first namespace-wide ProxyConfig, overridden key by key by the first selecting one (the
    rendered order stands for creation order)."""
    labels = {GATEWAY_NAME_LABEL: name}
    namespace_wide: dict[str, str] | None = None
    selecting: dict[str, str] | None = None
    for obj in objects:
        if obj.get("kind") != "ProxyConfig" or _meta(obj).get("namespace") != namespace:
            continue
        spec = obj.get("spec") or {}
        env = {str(k): str(v) for k, v in (spec.get("environmentVariables") or {}).items()}
        chosen = _selects(obj, labels)
        if chosen is None and namespace_wide is None:
            namespace_wide = env
        elif chosen and selecting is None:
            selecting = env
    return {**(namespace_wide or {}), **(selecting or {})}


def generated_gateway(objects: Iterable[Mapping[str, Any]], name: str) -> GeneratedGateway:
    """What Istio generates for the Gateway API Gateway ``name`` among ``objects``."""
    objects = list(objects)
    gateway = next(
        (o for o in objects if _is_gateway_api(o) and _meta(o).get("name") == name), None
    )
    if gateway is None:
        raise NoSuchGateway(f"no Gateway API Gateway {name!r} among the rendered objects")
    namespace = str(_meta(gateway).get("namespace", ""))
    infrastructure = (gateway.get("spec") or {}).get("infrastructure") or {}
    annotations = {
        str(k): str(v)
        for k, v in (infrastructure.get("annotations") or {}).items()
        if k not in _OMITTED
    }
    config = yaml.safe_load(annotations.get(PROXY_CONFIG, "")) or {}
    annotation_metadata = {str(k): str(v) for k, v in (config.get("proxyMetadata") or {}).items()}
    return GeneratedGateway(
        name=name,
        pod_annotations=annotations,
        env=_proxy_metadata(objects, namespace, name),
        annotation_metadata=annotation_metadata,
    )


def unit_gateway(
    unit: RunUnit, version: str, *, broken_proxy_config: bool = False
) -> GeneratedGateway | None:
    """For a Gateway API run unit: the gateway Istio would generate from the objects the
    charts render for it (None for any other unit). ``broken_proxy_config``: the negative
    control whose ProxyConfig selects nothing (local/faults.py)."""
    workload = next((w for w in unit.scenario.workloads if w.kind is WorkloadKind.GATEWAY), None)
    if unit.scenario.name != "gateway-api" or workload is None:
        return None
    # rendered into a namespace of its own: the model only relates objects of one namespace
    objects = scenario_manifests(
        unit.scenario, unit.mtls_mode, version, namespace="smx-gateway", variant=unit.variant
    )
    if broken_proxy_config:
        objects = [select_nothing(o) if o.get("kind") == "ProxyConfig" else o for o in objects]
    return generated_gateway(objects, workload.name.removesuffix(GENERATED_GATEWAY_SUFFIX))
