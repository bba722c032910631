"""Names Istio gives things, defined once: the proxy container and the annotations.

The bottom layer, beside :mod:`.catalog`: anything that reads or writes a pod's
proxy container or an Istio annotation names it from here.

Sources (Istio's, not its documentation): the injector names the sidecar container
``istio-proxy`` (``manifests/charts/istio-control/istio-discovery/files/injection-template.yaml``)
and sets ``prometheus.istio.io/secure-port`` from ``ENVOY_SECURE_MERGED_METRICS_PORT``
(``pkg/kube/inject/webhook.go``); nothing in Istio sets ``prometheus.istio.io/secure-envoy-port``
(it is set by hand, ISTIO-FACTS.md "Injector"); the scraper chart's Prometheus jobs read
both. The ``sidecar.istio.io``,
``traffic.sidecar.istio.io`` and ``proxy.istio.io`` names are the annotations the injector
and istio-iptables read (``istio/api`` ``annotation/annotations.gen.go``).
"""

from __future__ import annotations

#: the sidecar (or gateway) container running pilot-agent and Envoy
PROXY_CONTAINER = "istio-proxy"

#: the port a scraper takes merged (agent + Envoy) metrics from over mTLS
SECURE_PORT = "prometheus.istio.io/secure-port"
#: the port a scraper takes Envoy-only metrics from over mTLS
SECURE_ENVOY_PORT = "prometheus.istio.io/secure-envoy-port"

#: per-pod ProxyConfig overrides (YAML), read by the injector
PROXY_CONFIG = "proxy.istio.io/config"
#: opt a pod in or out of sidecar injection
INJECT = "sidecar.istio.io/inject"
#: extra volume mounts for the proxy container (JSON), read by the injector
USER_VOLUME_MOUNT = "sidecar.istio.io/userVolumeMount"

#: inbound ports istio-iptables captures ("*": all)
INCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/includeInboundPorts"
#: inbound ports istio-iptables leaves uncaptured
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
#: outbound destinations istio-iptables captures
INCLUDE_OUTBOUND_IP_RANGES = "traffic.sidecar.istio.io/includeOutboundIPRanges"
