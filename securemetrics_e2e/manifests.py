"""What the cluster backend applies for a scenario: objects rendered from the project's charts.

Every object comes out of a chart in ``charts/`` rendered by a real Helm engine
(:mod:`securemetrics_e2e.charts`); nothing here writes a manifest by hand. This module only
decides which charts, with which values, for a (scenario, mTLS mode, Istio version, variant).

Three kinds of output:

* :func:`scenario_manifests` -> ``list[dict]``: complete objects to create (server-side apply
  or create), ordered so that mesh configuration exists before the pods that read it at
  start (a ``ProxyConfig`` before the Gateway whose Deployment Istio generates from it).
* :func:`scenario_patches` -> ``list[Patch]``: changes to objects the suite does not own,
  i.e. the classic ``istio-ingressgateway`` Deployment installed with Istio. Each is a
  strategic-merge patch (``kubectl patch --type=strategic``; containers and env entries
  merge by name). The mesh-gateways chart publishes it in a ConfigMap (so the chart stays
  installable); that ConfigMap is not among the manifests, only the patch it carries.
  Undo one by restoring the Deployment's pod template as read before patching: Istio's
  gateway chart may already carry ``prometheus.io/path``, so deleting the patched keys is
  not a faithful undo.
* :func:`scraper_manifests` -> ``list[dict]``: the secure-metrics Prometheus (once per
  cluster, in ``istio-system`` by default).

Every run unit's configuration variant (:class:`securemetrics_e2e.catalog.Variant`) is
rendered here, as chart values:

* ``as-documented``: what istio.io shows (Gateway API: ``proxy.istio.io/config`` in
  ``spec.infrastructure.annotations``; servicemonitor: the app port declared ``http``);
* ``exclude-capture``: pod annotation ``traffic.sidecar.istio.io/excludeInboundPorts``
  lists both secure ports;
* ``port-permissive``: a workload PeerAuthentication, ``portLevelMtls`` PERMISSIVE on both
  secure ports; ``port-strict``: the same with ``{15091: STRICT}`` on the legacy Sidecar
  ingress port (a native workload has no such port: nothing is added);
* ``proxyconfig``: a ``ProxyConfig`` selecting the Gateway API gateway's pods sets
  ``environmentVariables``;
* ``tcp-app-port``: the application's Service port is named ``tcp``;
* ``podmonitor``: a PodMonitor on the secure merged port replaces the ServiceMonitors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import yaml

from securemetrics_e2e.catalog import (
    SECURE_ENVOY_PORT,
    SECURE_MERGED_PORT,
    MetricsMode,
    MtlsMode,
    Scenario,
    Variant,
    VariantId,
    WorkloadKind,
    WorkloadSpec,
)
from securemetrics_e2e.charts import render_chart
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.istionames import PROXY_CONFIG

if TYPE_CHECKING:
    from securemetrics_e2e.versions import Capabilities, IstioVersion

#: Release names, one per chart, so objects can be traced back to the chart that made them.
POLICY_RELEASE: Final = "securemetrics-policy"
WORKLOAD_RELEASE: Final = "securemetrics-workload"
GATEWAYS_RELEASE: Final = "securemetrics-gateways"
OPERATOR_RELEASE: Final = "securemetrics-prometheus-operator"
SCRAPER_RELEASE: Final = "securemetrics-scraper"

#: Suffix Istio appends to a Gateway API Gateway's name for its Deployment and ServiceAccount.
GENERATED_GATEWAY_SUFFIX: Final = "-istio"

#: The ``rotation`` scenario on a cluster: the lifetime the istio-agent asks istiod for
#: (proxy env ``SECRET_TTL``, istio/istio ``pilot/cmd/pilot-agent/options/options.go``,
#: default 24h; istiod caps it at ``MAX_WORKLOAD_CERT_TTL``, default 90 days, and sets no
#: minimum: ``security/pkg/pki/ca/ca.go``). The agent renews at about half the lifetime
#: (``SECRET_GRACE_PERIOD_RATIO`` 0.5, jitter 0.01; ``rotateTime`` in
#: ``security/pkg/nodeagent/cache/secretcache.go``): a renewal every ~2 minutes. Istio's
#: own ambient integration tests run ztunnel with ``SECRET_TTL: 5m``.
ROTATION_SCENARIO: Final = "rotation"
ROTATION_SECRET_TTL: Final = "240s"  # noqa: S105 (a lifetime, not a secret)
SECRET_TTL_ENV: Final = "SECRET_TTL"  # noqa: S105 (an env var name)
_PROXY_CONFIG: Final = PROXY_CONFIG

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def find_variant(scenario: Scenario, name: str | Variant | None) -> Variant:
    """The variant of ``scenario`` called ``name`` (``None``: its first, as-documented)."""
    if name is None:
        return scenario.variants[0]
    return scenario.variant(name.id if isinstance(name, Variant) else name)


@dataclass(frozen=True)
class Release:
    """One chart rendered with its values: what ``helm install`` would be given."""

    chart: str
    release: str
    namespace: str
    values: Mapping[str, Any] = field(default_factory=dict)

    def render(self) -> list[dict[str, Any]]:
        return render_chart(self.chart, self.values, release=self.release, namespace=self.namespace)


@dataclass(frozen=True)
class Patch:
    """A strategic-merge patch to an object the suite does not own.

    Apply ``body`` with ``Content-Type: application/strategic-merge-patch+json`` (the
    Kubernetes Python client's ``patch_namespaced_deployment``, or ``kubectl patch
    --type=strategic``).
    """

    api_version: str
    kind: str
    name: str
    namespace: str
    body: Mapping[str, Any]


def _capabilities(version: IstioVersion | str) -> Capabilities:
    # Imported here: versions.py is owned by another module and loads nothing heavy, but
    # keeping the import local keeps this module importable on its own.
    from securemetrics_e2e.versions import capabilities

    return capabilities(version)


def _check_namespace(option: str, value: str) -> None:
    if not isinstance(value, str) or not _DNS_LABEL.fullmatch(value) or len(value) > 63:
        raise UsageError(
            f"{option}={value!r} is not a Kubernetes namespace name "
            "(lower-case letters, digits and '-', at most 63 characters)"
        )


def _workload(scenario: Scenario) -> WorkloadSpec:
    if len(scenario.workloads) != 1:
        raise UsageError(
            f"scenario {scenario.name!r} declares {len(scenario.workloads)} workloads; "
            "the charts deploy exactly one per scenario"
        )
    return scenario.workloads[0]


def _policy_values(mode: MtlsMode, workload: WorkloadSpec, chosen: Variant) -> dict[str, Any]:
    """The namespace's PeerAuthentication, plus the workload one a port-* variant adds."""
    ports: dict[str, str] = {}
    if chosen.id is VariantId.PORT_PERMISSIVE:
        ports = {str(SECURE_ENVOY_PORT): "PERMISSIVE", str(SECURE_MERGED_PORT): "PERMISSIVE"}
    elif chosen.id is VariantId.PORT_STRICT and workload.mode is MetricsMode.LEGACY:
        # the Sidecar ingress port on 15091 (charts/httpbin metrics.legacy.port)
        ports = {str(SECURE_ENVOY_PORT): "STRICT"}
    values: dict[str, Any] = {"peerAuthentication": {"mode": mode.value}}
    if ports:
        values["workloadPolicy"] = {
            "enabled": True,
            "name": "secure-metrics-ports",
            "selector": {"app": workload.name},
            "portLevelMtls": ports,
        }
    return values


def _httpbin_values(
    workload: WorkloadSpec, chosen: Variant, *, expose_merged: bool
) -> dict[str, Any]:
    return {
        "name": workload.name,
        "serviceAccount": {"name": workload.service_account},
        "service": {
            "exposeSecureMergedPort": expose_merged,
            "appProtocol": "tcp" if chosen.id is VariantId.TCP_APP_PORT else "http",
        },
        "metrics": {
            "mode": workload.mode.value,
            "envoyPort": SECURE_ENVOY_PORT,
            "mergedPort": SECURE_MERGED_PORT,
            "excludeSecurePortsFromCapture": chosen.id is VariantId.EXCLUDE_CAPTURE,
            "legacy": {"port": SECURE_ENVOY_PORT},
        },
    }


def _gateway_values(
    workload: WorkloadSpec, chosen: Variant, *, gateway_api: bool
) -> dict[str, Any]:
    ports = {"envoy": SECURE_ENVOY_PORT, "merged": SECURE_MERGED_PORT}
    if gateway_api:
        if not workload.name.endswith(GENERATED_GATEWAY_SUFFIX):
            raise UsageError(
                f"Gateway API workload {workload.name!r} must be named <gateway>"
                f"{GENERATED_GATEWAY_SUFFIX}, the Deployment Istio generates for a Gateway"
            )
        # The catalog names the generated Deployment; the chart takes the Gateway's name.
        path = "proxyConfig" if chosen.id is VariantId.PROXYCONFIG else "infrastructureAnnotations"
        return {
            "ports": ports,
            "gatewayApi": {
                "enabled": True,
                "name": workload.name.removesuffix(GENERATED_GATEWAY_SUFFIX),
                "mode": workload.mode.value,
                "path": path,
            },
        }
    return {
        "ports": ports,
        "ingressgateway": {
            "mode": workload.mode.value,
            "renderPatch": True,
            "deployment": workload.name,
            "legacy": {"port": SECURE_ENVOY_PORT},
        },
    }


def _operator_values(caps: Capabilities, workload: WorkloadSpec, chosen: Variant) -> dict[str, Any]:
    image = caps.prometheus_image
    pod_monitor = chosen.id is VariantId.PODMONITOR
    return {
        "prometheus": {"image": image, "version": image.rsplit(":", 1)[-1]},
        "target": {
            "app": workload.name,
            # seed 001's ServiceMonitor on the application port, named by its protocol
            "appPort": {
                "enabled": not pod_monitor,
                "portName": "tcp" if chosen.id is VariantId.TCP_APP_PORT else "http",
            },
            # The merged-port monitors need the native secure port (Istio >= 1.31).
            "mergedPort": {"enabled": caps.native_secure_ports and not pod_monitor},
            "podMonitor": {"enabled": caps.native_secure_ports and pod_monitor},
        },
    }


def scenario_releases(
    scenario: Scenario,
    mtls_mode: MtlsMode,
    version: IstioVersion | str,
    *,
    namespace: str,
    scraper_namespace: str = "istio-system",
    gateway_namespace: str = "istio-system",
    variant: str | Variant | None = None,
) -> list[Release]:
    """The chart releases behind :func:`scenario_manifests` and :func:`scenario_patches`.

    Raises :class:`UsageError` for a namespace that is not a DNS label, a scenario
    namespace shared with the scraper or the gateway (its PeerAuthentication would apply
    there too; in the root namespace, to the whole mesh), a mode the scenario does not run
    in, or an unknown variant; and the versions module's error for an unsupported version.
    """
    _check_namespace("namespace", namespace)
    _check_namespace("scraper_namespace", scraper_namespace)
    _check_namespace("gateway_namespace", gateway_namespace)
    for option, other in (
        ("scraper_namespace", scraper_namespace),
        ("gateway_namespace", gateway_namespace),
    ):
        if namespace == other:
            raise UsageError(
                f"namespace={namespace!r} is also the {option}: a scenario needs a namespace "
                "of its own, since its PeerAuthentication governs the whole namespace"
            )
    if mtls_mode not in scenario.mtls_modes:
        modes = ", ".join(m.value for m in scenario.mtls_modes)
        raise UsageError(
            f"scenario {scenario.name!r} does not run in mTLS mode {mtls_mode!s}; "
            f"its modes: {modes}"
        )
    caps = _capabilities(version)
    chosen = find_variant(scenario, variant)
    if chosen.mtls_modes is not None and mtls_mode not in chosen.mtls_modes:
        modes = ", ".join(m.value for m in chosen.mtls_modes)
        raise UsageError(
            f"variant {chosen.id} of scenario {scenario.name!r} does not run in mTLS mode "
            f"{mtls_mode!s}; its modes: {modes}"
        )
    workload = _workload(scenario)

    releases = [
        Release(
            "mesh-policy", POLICY_RELEASE, namespace, _policy_values(mtls_mode, workload, chosen)
        )
    ]
    if workload.kind is WorkloadKind.SIDECAR:
        operator = scenario.name == "servicemonitor"
        releases.append(
            Release(
                "httpbin",
                WORKLOAD_RELEASE,
                namespace,
                _httpbin_values(
                    workload, chosen, expose_merged=operator and caps.native_secure_ports
                ),
            )
        )
        if operator:
            releases.append(
                Release(
                    "prometheus-operator-scrape",
                    OPERATOR_RELEASE,
                    namespace,
                    _operator_values(caps, workload, chosen),
                )
            )
    else:
        gateway_api = scenario.name == "gateway-api"
        values = _gateway_values(workload, chosen, gateway_api=gateway_api)
        # A generated (Gateway API) gateway lives in the scenario namespace; the classic one
        # is Istio's own, in its namespace.
        gw_namespace = namespace if gateway_api else gateway_namespace
        releases.append(Release("mesh-gateways", GATEWAYS_RELEASE, gw_namespace, values))
    return releases


_PATCH_LABEL: Final = "securemetrics-e2e.io/patch"


def _is_patch(release: Release, obj: Mapping[str, Any]) -> bool:
    # The mesh-gateways chart publishes the classic ingress gateway's patch in a ConfigMap
    # (templates/ingressgateway-patch.yaml): the patch is what the backend applies.
    labels = obj.get("metadata", {}).get("labels") or {}
    return (
        release.chart == "mesh-gateways"
        and obj.get("kind") == "ConfigMap"
        and labels.get(_PATCH_LABEL) == "strategic-merge"
    )


def _patch(obj: Mapping[str, Any]) -> Patch:
    data = obj["data"]
    return Patch(
        api_version=data["apiVersion"],
        kind=data["kind"],
        name=data["name"],
        namespace=obj["metadata"]["namespace"],
        body=yaml.safe_load(data["patch.yaml"]),
    )


# Objects read by istiod or by a proxy at start go first, then identities and services, then
# what creates pods, then what selects them.
_PHASES: Final[dict[str, int]] = {
    "PeerAuthentication": 0,
    "ProxyConfig": 0,
    "Sidecar": 0,
    "ServiceEntry": 0,
    "DestinationRule": 0,
    "ServiceAccount": 1,
    "Role": 1,
    "RoleBinding": 1,
    "ClusterRole": 1,
    "ClusterRoleBinding": 1,
    "ConfigMap": 1,
    "Secret": 1,
    "Service": 1,
    "ServiceMonitor": 3,
    "PodMonitor": 3,
}


def _phase(obj: Mapping[str, Any]) -> int:
    return _PHASES.get(str(obj.get("kind")), 2)


def scenario_manifests(
    scenario: Scenario,
    mtls_mode: MtlsMode,
    version: IstioVersion | str,
    *,
    namespace: str,
    scraper_namespace: str = "istio-system",
    gateway_namespace: str = "istio-system",
    variant: str | Variant | None = None,
) -> list[dict[str, Any]]:
    """Every complete object the cluster backend creates for the scenario, in apply order.

    ``namespace`` is the scenario's own namespace (PeerAuthentication, workloads, a Gateway
    API gateway, the Prometheus Operator objects); the classic ingress gateway's legacy
    Gateway/ServiceEntry/VirtualService go to ``gateway_namespace``. The scraper is not
    included (:func:`scraper_manifests`), nor are patches (:func:`scenario_patches`).
    Scenario feature gating (e.g. native ports need Istio 1.31) is the catalog's business:
    every scenario renders for every supported version.
    """
    releases = scenario_releases(
        scenario,
        mtls_mode,
        version,
        namespace=namespace,
        scraper_namespace=scraper_namespace,
        gateway_namespace=gateway_namespace,
        variant=variant,
    )
    objects = [
        obj for release in releases for obj in release.render() if not _is_patch(release, obj)
    ]
    if scenario.name == ROTATION_SCENARIO:
        objects = [_with_secret_ttl(o) if o.get("kind") == "Deployment" else o for o in objects]
    return sorted(objects, key=_phase)  # stable: Helm's order within a phase


def _pod_annotations(deployment: Mapping[str, Any]) -> dict[str, Any]:
    template = (deployment.get("spec") or {}).get("template") or {}
    return dict((template.get("metadata") or {}).get("annotations") or {})


def add_proxy_metadata(deployment: Mapping[str, Any], extra: Mapping[str, str]) -> dict[str, Any]:
    """A copy of ``deployment`` whose ``proxy.istio.io/config`` also sets ``extra`` proxyMetadata.

    The injector turns ``proxyMetadata`` into the istio-proxy container's environment,
    where the agent reads ``SECRET_TTL``. Raises :class:`UsageError` when the pod template
    has no such annotation (the chart did not render a sidecar workload).
    """
    import copy

    obj = copy.deepcopy(dict(deployment))
    annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
    if _PROXY_CONFIG not in annotations:
        name = (obj.get("metadata") or {}).get("name")
        raise UsageError(
            f"Deployment {name!r} has no {_PROXY_CONFIG} pod annotation to add "
            f"{', '.join(extra)} to; render it with a metrics mode that sets one"
        )
    config = yaml.safe_load(annotations[_PROXY_CONFIG]) or {}
    config["proxyMetadata"] = {**(config.get("proxyMetadata") or {}), **dict(extra)}
    annotations[_PROXY_CONFIG] = yaml.safe_dump(config, sort_keys=False)
    obj["spec"]["template"]["metadata"]["annotations"] = annotations
    return obj


def proxy_metadata_of(deployment: Mapping[str, Any]) -> dict[str, str]:
    """The ``proxyMetadata`` a Deployment's pods ask the injector for ({} when none)."""
    from securemetrics_e2e.audit import proxy_metadata

    return proxy_metadata(_pod_annotations(deployment))


def _with_secret_ttl(deployment: Mapping[str, Any]) -> dict[str, Any]:
    return add_proxy_metadata(deployment, {SECRET_TTL_ENV: ROTATION_SECRET_TTL})


def scraper_secret_ttl_patch(
    *, namespace: str, version: IstioVersion | str | None = None, ttl: str = ROTATION_SECRET_TTL
) -> Patch:
    """A strategic-merge patch giving the scraper's sidecar certificates of lifetime ``ttl``.

    Only the ``rotation`` scenario on a cluster applies it (and undoes it by restoring the
    pod template): its Prometheus must see its OUTPUT_CERTS files renewed several times.
    Annotations merge by key, so the patch carries the whole ``proxy.istio.io/config``
    the chart renders (OUTPUT_CERTS kept) plus ``SECRET_TTL``.
    """
    rendered = scraper_manifests(namespace=namespace, version=version)
    deployment = next(o for o in rendered if o.get("kind") == "Deployment")
    patched = add_proxy_metadata(deployment, {SECRET_TTL_ENV: ttl})
    annotation = patched["spec"]["template"]["metadata"]["annotations"][_PROXY_CONFIG]
    return Patch(
        api_version="apps/v1",
        kind="Deployment",
        name=str(deployment["metadata"]["name"]),
        namespace=namespace,
        body={"spec": {"template": {"metadata": {"annotations": {_PROXY_CONFIG: annotation}}}}},
    )


def scenario_patches(
    scenario: Scenario,
    mtls_mode: MtlsMode,
    version: IstioVersion | str,
    *,
    namespace: str,
    scraper_namespace: str = "istio-system",
    gateway_namespace: str = "istio-system",
    variant: str | Variant | None = None,
) -> list[Patch]:
    """Strategic-merge patches to existing objects (the classic ``istio-ingressgateway``).

    ``native-gateway`` patches in the secure-port env vars and the Prometheus annotations;
    ``legacy-gateway`` only the annotation naming the legacy port. Other scenarios: none.
    """
    releases = scenario_releases(
        scenario,
        mtls_mode,
        version,
        namespace=namespace,
        scraper_namespace=scraper_namespace,
        gateway_namespace=gateway_namespace,
        variant=variant,
    )
    patches = []
    for release in releases:
        for obj in release.render():
            if _is_patch(release, obj):
                patches.append(_patch(obj))
    return patches


def scraper_release(
    *, namespace: str = "istio-system", version: IstioVersion | str | None = None
) -> Release:
    """The secure-metrics Prometheus release; with ``version``, that minor's sample image."""
    _check_namespace("namespace", namespace)
    values: dict[str, Any] = {}
    if version is not None:
        repository, tag = _capabilities(version).prometheus_image.rsplit(":", 1)
        values["image"] = {"repository": repository, "tag": tag}
    return Release("secure-metrics-prometheus", SCRAPER_RELEASE, namespace, values)


def scraper_manifests(
    *, namespace: str = "istio-system", version: IstioVersion | str | None = None
) -> list[dict[str, Any]]:
    """The scraper: ServiceAccount, ClusterRole(Binding), ConfigMap, Service, Deployment.

    Its Deployment is named ``prometheus`` and its pods are labelled
    ``app.kubernetes.io/name: prometheus``; the scrape configuration is
    ``charts/secure-metrics-prometheus/files/prometheus.yml`` byte for byte.
    """
    return scraper_release(namespace=namespace, version=version).render()
