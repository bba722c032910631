"""A local pod: what runs in it, and the annotations and ports a cluster would give it.

:class:`WorkloadRuntime` and :class:`DeploymentRuntime` record the processes and files
behind a deployed workload; :func:`pod_annotations` and :func:`container_ports` are what
the chart and the sidecar injector give the pod on a cluster, reproduced here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from securemetrics_e2e.backend import Deployment, Workload
from securemetrics_e2e.catalog import (
    APP_PORT,
    ENVOY_STATS_PORT,
    MetricsMode,
    RunUnit,
    WorkloadKind,
    WorkloadSpec,
)
from securemetrics_e2e.istionames import PROXY_CONTAINER, SECURE_ENVOY_PORT, SECURE_PORT
from securemetrics_e2e.local import promconfig
from securemetrics_e2e.local.bootstrap import (
    SdsFiles,
)
from securemetrics_e2e.local.envoy import Envoy
from securemetrics_e2e.local.faults import Fault
from securemetrics_e2e.local.httpserver import PodHTTPServer
from securemetrics_e2e.local.netns import Pod
from securemetrics_e2e.local.virtualinbound import InboundLog
from securemetrics_e2e.manifests import scenario_manifests
from securemetrics_e2e.pki import WorkloadIdentity

#: where the scraper runs on a cluster, and its service account (its SPIFFE identity)
SCRAPER_NAMESPACE = "istio-system"
SCRAPER_SERVICE_ACCOUNT = "prometheus"


@dataclass
class WorkloadRuntime:
    """The processes and files behind one deployed workload."""

    workload: Workload
    pod: Pod
    envoy: Envoy
    servers: list[PodHTTPServer]
    sds: SdsFiles
    identity: WorkloadIdentity
    record: promconfig.PodRecord
    fault: Fault | None = None
    #: a captured sidecar's virtualInbound access log
    inbound_log: InboundLog | None = None


@dataclass
class DeploymentRuntime:
    """A deployed run unit's workloads, and the pods an upgrade is retiring."""

    deployment: Deployment
    workloads: dict[str, WorkloadRuntime] = field(default_factory=dict)
    #: pods an upgrade is replacing: still running and discovered until retired
    retiring: list[WorkloadRuntime] = field(default_factory=list)


def injector_secure_port(
    annotations: Mapping[str, str], proxy_env: Mapping[str, str]
) -> dict[str, str]:
    """The injector's auto-annotation, as pkg/kube/inject/webhook.go
    applySecurePrometheusAnnotation does it: ``prometheus.istio.io/secure-port`` from the
    istio-proxy env ``ENVOY_SECURE_MERGED_METRICS_PORT`` (neither empty nor "0"), unless
    an annotation of that name (compared sanitized, as Istio's SanitizeLabelName does)
    is already set."""
    out = dict(annotations)
    taken = {re.sub(r"[^A-Za-z0-9_]", "_", k) for k in out}
    if "prometheus_istio_io_secure_port" in taken:
        return out
    value = proxy_env.get("ENVOY_SECURE_MERGED_METRICS_PORT", "")
    if value not in ("", "0"):
        out[SECURE_PORT] = value
    return out


def pod_annotations(spec: WorkloadSpec, fault: Fault | None) -> dict[str, str]:
    """The pod annotations the chart and the injector give this workload.

    As charts/httpbin renders them: native sidecars get only ``secure-envoy-port`` by
    hand (nothing in Istio sets it) and the env the injector reads; gateways and the
    legacy workaround set ``secure-port`` by hand. The injector then adds the
    prometheus.io merge annotations and, for sidecars, ``secure-port``.
    """
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "15020",
        "prometheus.io/path": "/stats/prometheus",
    }
    native = spec.mode in (MetricsMode.NATIVE, MetricsMode.HARDENED)
    if spec.secure_envoy_port is not None:
        annotations[SECURE_ENVOY_PORT] = str(spec.secure_envoy_port)
    if spec.kind is WorkloadKind.SIDECAR and native:
        env = {"ENVOY_SECURE_MERGED_METRICS_PORT": str(spec.secure_merged_port)}
        if fault is not Fault.INJECTOR_NO_SECURE_PORT:
            annotations = injector_secure_port(annotations, env)
    else:
        annotations[SECURE_PORT] = str(spec.secure_merged_port)
    if fault is Fault.SECURE_PORT_ANNOTATION_MISSING:
        annotations.pop(SECURE_PORT, None)
        annotations.pop(SECURE_ENVOY_PORT, None)
    return annotations


def container_ports(spec: WorkloadSpec) -> tuple[tuple[str, str, int], ...]:
    """(container, port name, port) of the pod's declared ports, as the chart renders them."""
    proxy = ((PROXY_CONTAINER, "http-envoy-prom", ENVOY_STATS_PORT),)
    if spec.kind is WorkloadKind.SIDECAR:
        return (("httpbin", "http", APP_PORT), *proxy)
    return ((PROXY_CONTAINER, "status-port", 15021), *proxy)


def unit_manifests(unit: RunUnit, version: str, *, captured: bool) -> list[dict[str, Any]] | None:
    """The objects the cluster backend would apply for ``unit``, when its sidecars are
    ``captured`` here: their inbound path is derived from them. Continuity scenarios
    replay the data-plane half of a change without capture.

    Rendered into a namespace of their own (the model relates objects of one
    namespace only; a local namespace name with its variant and fault may exceed a
    DNS label)."""
    scenario = unit.scenario
    if scenario.continuity or not captured:
        return None
    if not any(w.kind is WorkloadKind.SIDECAR for w in scenario.workloads):
        return None
    return scenario_manifests(
        scenario, unit.mtls_mode, version, namespace="smx-sidecar", variant=unit.variant
    )
