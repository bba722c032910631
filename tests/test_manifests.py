"""What each scenario deploys, rendered by Helm and checked against the APIs' published schemas.

Every scenario, mTLS mode and variant is rendered for every supported Istio version, and every
object is validated against the Kubernetes schemas of each Kubernetes minor that Istio
version supports (kubernetes-validate, strict), the Istio and Prometheus Operator CRD models
(cloudcoil), and the Gateway API CRD schema of the release that Istio version expects.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from securemetrics_e2e import manifests, validation
from securemetrics_e2e.catalog import (
    ENVOY_JOB,
    MERGED_JOB,
    SCENARIOS,
    MtlsMode,
    Scenario,
    Variant,
    VariantId,
    WorkloadKind,
    scenario,
)
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.local.backend import injector_secure_port
from securemetrics_e2e.manifests import (
    find_variant,
    scenario_manifests,
    scenario_patches,
    scraper_manifests,
)
from securemetrics_e2e.versions import IstioVersion, capabilities, supported_versions

NS = "secure-metrics-test"
LATEST = supported_versions()[-1]
PRE_NATIVE = IstioVersion(1, 30, 5)

POD_CONFIG_KINDS = {"PeerAuthentication", "ProxyConfig", "Sidecar", "ServiceEntry"}
POD_MAKING_KINDS = {"Deployment", "Gateway", "Prometheus"}


def combos() -> Iterator[tuple[Scenario, MtlsMode, Variant]]:
    """Every run unit of every scenario."""
    for sc in SCENARIOS:
        for unit in sc.run_units():
            yield sc, unit.mtls_mode, unit.variant


def combo_id(value: object) -> str:
    """A stable test id: the run unit's own words, never a repr holding a frozenset
    (hash-randomised order makes xdist workers collect different ids)."""
    if isinstance(value, Scenario):
        return value.name
    if isinstance(value, Variant):
        return str(value.id)
    return str(value)


def render(
    name: str,
    mode: MtlsMode | None = None,
    version: IstioVersion = LATEST,
    variant: str | None = None,
) -> list[dict[str, Any]]:
    sc = scenario(name)
    return scenario_manifests(sc, mode or sc.mtls_modes[0], version, namespace=NS, variant=variant)


def one(objects: list[dict[str, Any]], kind: str, api_group: str = "") -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["apiVersion"].startswith(api_group)]
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_annotations(objects: list[dict[str, Any]]) -> dict[str, str]:
    annotations: dict[str, str] = one(objects, "Deployment")["spec"]["template"]["metadata"].get(
        "annotations", {}
    )
    return annotations


def proxy_metadata(annotations: dict[str, str]) -> dict[str, str]:
    config = yaml.safe_load(annotations["proxy.istio.io/config"])
    metadata: dict[str, str] = config["proxyMetadata"]
    return metadata


# --- every object validates ----------------------------------------------------------------


@pytest.mark.parametrize("version", supported_versions(), ids=str)
def test_every_object_validates_against_its_published_schema(version: IstioVersion) -> None:
    caps = capabilities(version)
    minors = caps.kubernetes_range.minors()
    assert minors, f"no Kubernetes minors for Istio {version}"
    rendered = [scraper_manifests(version=version)]
    rendered += [
        scenario_manifests(sc, mode, version, namespace=NS, variant=v) for sc, mode, v in combos()
    ]
    validators = set()
    for objects in rendered:
        assert objects
        for obj in objects:
            for minor in minors:
                validators.add(
                    validation.validate_object(
                        obj, kubernetes_version=minor, gateway_api_version=caps.gateway_api_version
                    )
                )
    # Each family of schemas was really used (a silent fallback would not show up here).
    joined = "\n".join(sorted(validators))
    for minor in minors:
        assert f"Kubernetes {minor} (kubernetes-validate" in joined
    assert f"Gateway API {caps.gateway_api_version} Gateway CRD schema" in joined
    assert "Sidecar schema (cloudcoil-models-istio" in joined
    assert "ServiceMonitor schema (cloudcoil-models-prometheus-operator" in joined


def test_every_patch_names_an_existing_gateway_deployment() -> None:
    for sc, mode, v in combos():
        for patch in scenario_patches(sc, mode, LATEST, namespace=NS, variant=v):
            assert (patch.api_version, patch.kind) == ("apps/v1", "Deployment")
            (workload,) = sc.workloads
            assert (patch.name, patch.namespace) == (workload.name, "istio-system")


@pytest.mark.parametrize(
    ("kind", "mutate", "problem"),
    [
        ("Deployment", lambda o: o["spec"].update(replica=2), "'replica' was unexpected"),
        (
            "Deployment",
            lambda o: o["spec"]["template"]["spec"]["containers"][0].update(ports=[{"port": 1}]),
            "'containerPort' is a required property",
        ),
        ("Sidecar", lambda o: o["spec"].update(ingres=[]), "spec.ingres: unknown field"),
        (
            "Sidecar",
            lambda o: o["spec"]["ingress"][0]["port"].update(number="15091"),
            "'15091' would be read as 15091",
        ),
        (
            "PeerAuthentication",
            lambda o: o["spec"]["mtls"].update(mode="STRICTLY"),
            "Input should be 'UNSET', 'DISABLE', 'PERMISSIVE' or 'STRICT'",
        ),
    ],
    ids=["k8s-unknown-field", "k8s-required", "istio-unknown", "istio-coerced", "istio-enum"],
)
def test_validation_rejects_broken_objects(kind: str, mutate: Any, problem: str) -> None:
    obj = copy.deepcopy(one(render("legacy-sidecar", MtlsMode.STRICT), kind))
    mutate(obj)
    with pytest.raises(validation.InvalidObject, match=problem):
        validation.validate_object(obj, kubernetes_version="1.33", gateway_api_version="v1.6.0")


def test_validation_rejects_broken_gateway_api_and_operator_objects() -> None:
    gateway = copy.deepcopy(one(render("gateway-api"), "Gateway", "gateway.networking.k8s.io"))
    gateway["spec"]["infrastructure"]["annotation"] = {}
    with pytest.raises(validation.InvalidObject, match="'annotation' was unexpected"):
        validation.validate_object(gateway, kubernetes_version="1.33", gateway_api_version="v1.6.0")
    gateway = copy.deepcopy(one(render("gateway-api"), "Gateway", "gateway.networking.k8s.io"))
    gateway["metadata"]["labels"] = {"team": 7}
    with pytest.raises(validation.InvalidObject, match=r"metadata\.labels\.team"):
        validation.validate_object(gateway, kubernetes_version="1.33", gateway_api_version="v1.4.1")
    monitor = copy.deepcopy(render("servicemonitor")[-1])
    assert monitor["kind"] == "ServiceMonitor"
    monitor["spec"]["endpoints"][0]["tlsconfig"] = monitor["spec"]["endpoints"][0].pop("tlsConfig")
    with pytest.raises(validation.InvalidObject, match="tlsconfig: unknown field"):
        validation.validate_object(monitor, kubernetes_version="1.33", gateway_api_version="v1.6.0")


def test_validation_refuses_kinds_no_schema_covers() -> None:
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    with pytest.raises(validation.InvalidObject, match="Couldn't find schema for kind Widget"):
        validation.validate_object(obj, kubernetes_version="1.33", gateway_api_version="v1.6.0")


# --- what each scenario deploys -------------------------------------------------------------


def announced_ports(sc: Scenario, objects: list[dict[str, Any]], patches: list[Any]) -> dict:
    """Scrape job -> port, as the scraper's relabelling will read it from the pods."""
    (workload,) = sc.workloads
    if workload.kind is WorkloadKind.SIDECAR:
        # as admitted: the injector adds secure-port from the proxy env it renders
        written = pod_annotations(objects)
        env = proxy_metadata(written) if "proxy.istio.io/config" in written else {}
        annotations = injector_secure_port(written, env)
    elif sc.name == "gateway-api":
        gateway = one(objects, "Gateway", "gateway.networking.k8s.io")
        annotations = gateway["spec"]["infrastructure"]["annotations"]
    else:
        (patch,) = patches
        annotations = patch.body["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/stats/prometheus"
    jobs = {
        MERGED_JOB: "prometheus.istio.io/secure-port",
        ENVOY_JOB: "prometheus.istio.io/secure-envoy-port",
    }
    return {job: int(annotations[key]) for job, key in jobs.items() if key in annotations}


@pytest.mark.parametrize(("sc", "mode", "variant"), list(combos()), ids=combo_id)
def test_pods_announce_exactly_the_ports_the_catalog_expects(
    sc: Scenario, mode: MtlsMode, variant: Variant
) -> None:
    objects = scenario_manifests(sc, mode, LATEST, namespace=NS, variant=variant)
    patches = scenario_patches(sc, mode, LATEST, namespace=NS, variant=variant)
    (workload,) = sc.workloads
    assert announced_ports(sc, objects, patches) == workload.jobs


@pytest.mark.parametrize(("sc", "mode", "variant"), list(combos()), ids=combo_id)
def test_peer_authentication_and_apply_order(
    sc: Scenario, mode: MtlsMode, variant: Variant
) -> None:
    objects = scenario_manifests(sc, mode, LATEST, namespace=NS, variant=variant)
    (policy,) = [
        o for o in objects if o["kind"] == "PeerAuthentication" and "selector" not in o["spec"]
    ]
    assert policy["metadata"] == {**policy["metadata"], "name": "default", "namespace": NS}
    assert "selector" not in policy["spec"]
    assert policy["spec"]["mtls"]["mode"] == mode.value
    kinds = [o["kind"] for o in objects]
    last_config = max(i for i, k in enumerate(kinds) if k in POD_CONFIG_KINDS)
    making = [i for i, k in enumerate(kinds) if k in POD_MAKING_KINDS]
    assert all(i > last_config for i in making), kinds


@pytest.mark.parametrize("name", ["native-sidecar", "hardened"])
def test_native_sidecar_sets_proxy_metadata_and_annotations(name: str) -> None:
    sc = scenario(name)
    (workload,) = sc.workloads
    objects = render(name, MtlsMode.STRICT, variant="as-documented")
    annotations = pod_annotations(objects)
    expected = {"ENVOY_SECURE_METRICS_PORT": "15091", "ENVOY_SECURE_MERGED_METRICS_PORT": "15092"}
    if name == "hardened":
        expected["METRICS_LOCALHOST_ACCESS_ONLY"] = "true"
    assert proxy_metadata(annotations) == expected
    assert "traffic.sidecar.istio.io/excludeInboundPorts" not in annotations
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == workload.service_account
    assert one(objects, "ServiceAccount")["metadata"]["name"] == workload.service_account
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "docker.io/mccutchen/go-httpbin:v2.15.0"
    assert deployment["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    service = one(objects, "Service")
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8000, 8080)]
    assert not [o for o in objects if o["kind"] == "Sidecar"]

    excluded = pod_annotations(render(name, MtlsMode.STRICT, variant="exclude-capture"))
    assert excluded["traffic.sidecar.istio.io/excludeInboundPorts"] == "15091,15092"


def test_legacy_sidecar_terminates_istio_mutual_on_15091() -> None:
    objects = render("legacy-sidecar", MtlsMode.STRICT)
    sidecar = one(objects, "Sidecar")
    assert sidecar["spec"]["workloadSelector"] == {"labels": {"app": "httpbin"}}
    assert sidecar["spec"]["ingress"] == [
        {
            "port": {"number": 15091, "name": "https-metrics", "protocol": "HTTP"},
            "defaultEndpoint": "127.0.0.1:15020",
        }
    ]
    annotations = pod_annotations(objects)
    assert annotations["prometheus.istio.io/secure-port"] == "15091"
    assert "proxy.istio.io/config" not in annotations
    assert "prometheus.istio.io/secure-envoy-port" not in annotations


def test_native_gateway_is_a_patch_of_the_classic_ingressgateway() -> None:
    sc = scenario("native-gateway")
    objects = scenario_manifests(sc, MtlsMode.PERMISSIVE, LATEST, namespace=NS)
    assert [o["kind"] for o in objects] == ["PeerAuthentication"]
    (patch,) = scenario_patches(sc, MtlsMode.PERMISSIVE, LATEST, namespace=NS)
    assert patch.body["spec"]["template"]["spec"]["containers"] == [
        {
            "name": "istio-proxy",
            "env": [
                {"name": "ENVOY_SECURE_MERGED_METRICS_PORT", "value": "15092"},
                {"name": "ENVOY_SECURE_METRICS_PORT", "value": "15091"},
            ],
        }
    ]


def test_legacy_gateway_trio_and_annotation_patch() -> None:
    sc = scenario("legacy-gateway")
    objects = scenario_manifests(sc, MtlsMode.PERMISSIVE, LATEST, namespace=NS)
    gateway = one(objects, "Gateway", "networking.istio.io")
    entry = one(objects, "ServiceEntry")
    route = one(objects, "VirtualService")
    assert {o["metadata"]["namespace"] for o in (gateway, entry, route)} == {"istio-system"}
    assert gateway["spec"]["selector"] == {"istio": "ingressgateway"}
    assert gateway["spec"]["servers"] == [
        {
            "port": {"number": 15091, "name": "https-metrics", "protocol": "HTTPS"},
            "tls": {"mode": "ISTIO_MUTUAL"},
            "hosts": ["*"],
        }
    ]
    assert entry["spec"] == {
        "hosts": ["gateway-admin.local"],
        "exportTo": ["."],  # else every sidecar gets an outbound listener on 15020
        "location": "MESH_INTERNAL",
        "resolution": "STATIC",
        "ports": [{"number": 15020, "name": "http-metrics", "protocol": "HTTP"}],
        "endpoints": [{"address": "127.0.0.1"}],
    }
    assert route["spec"]["gateways"] == [gateway["metadata"]["name"]]
    (rule,) = route["spec"]["http"]
    assert rule["match"] == [{"uri": {"prefix": "/stats/prometheus"}}]
    assert rule["route"] == [
        {"destination": {"host": "gateway-admin.local", "port": {"number": 15020}}}
    ]
    (patch,) = scenario_patches(sc, MtlsMode.PERMISSIVE, LATEST, namespace=NS)
    assert "spec" not in patch.body["spec"]["template"]  # annotations only: no env vars


def test_gateway_api_renders_both_paths() -> None:
    sc = scenario("gateway-api")
    (workload,) = sc.workloads
    assert [v.id for v in sc.variants] == [VariantId.AS_DOCUMENTED, VariantId.PROXYCONFIG]
    env = {"ENVOY_SECURE_METRICS_PORT": "15091", "ENVOY_SECURE_MERGED_METRICS_PORT": "15092"}

    working = render("gateway-api", variant="proxyconfig")
    gateway = one(working, "Gateway", "gateway.networking.k8s.io")
    assert gateway["metadata"]["name"] + manifests.GENERATED_GATEWAY_SUFFIX == workload.name
    assert gateway["metadata"]["namespace"] == NS
    assert gateway["spec"]["gatewayClassName"] == "istio"
    assert "proxy.istio.io/config" not in gateway["spec"]["infrastructure"]["annotations"]
    proxy_config = one(working, "ProxyConfig")
    assert proxy_config["metadata"]["namespace"] == NS
    assert proxy_config["spec"] == {
        "selector": {
            "matchLabels": {"gateway.networking.k8s.io/gateway-name": gateway["metadata"]["name"]}
        },
        "environmentVariables": env,
    }

    documented = render("gateway-api", variant="as-documented")
    assert not [o for o in documented if o["kind"] == "ProxyConfig"]
    gateway = one(documented, "Gateway", "gateway.networking.k8s.io")
    assert proxy_metadata(gateway["spec"]["infrastructure"]["annotations"]) == env


def test_servicemonitor_scrapes_app_port_and_merged_port_on_131() -> None:
    objects = render("servicemonitor", MtlsMode.STRICT, LATEST)
    prometheus = one(objects, "Prometheus")
    spec = prometheus["spec"]
    annotations = spec["podMetadata"]["annotations"]
    assert annotations["traffic.sidecar.istio.io/includeInboundPorts"] == ""
    assert annotations["traffic.sidecar.istio.io/includeOutboundIPRanges"] == ""
    output = yaml.safe_load(annotations["proxy.istio.io/config"])["proxyMetadata"]["OUTPUT_CERTS"]
    assert yaml.safe_load(annotations["sidecar.istio.io/userVolumeMount"]) == [
        {"name": "istio-certs", "mountPath": output}
    ]
    assert spec["volumes"] == [{"name": "istio-certs", "emptyDir": {"medium": "Memory"}}]
    (mount,) = spec["volumeMounts"]
    assert mount["name"] == "istio-certs"
    assert spec["image"] == capabilities(LATEST).prometheus_image

    monitors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"httpbin-app-port", "httpbin-merged-port"}
    for monitor in monitors.values():
        labels = monitor["metadata"]["labels"]
        assert spec["serviceMonitorSelector"]["matchLabels"].items() <= labels.items()
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["scheme"] == "https"
        assert endpoint["tlsConfig"] == {
            "caFile": f"{mount['mountPath']}/root-cert.pem",
            "certFile": f"{mount['mountPath']}/cert-chain.pem",
            "keyFile": f"{mount['mountPath']}/key.pem",
            "insecureSkipVerify": True,
        }
    service_ports = {p["name"]: p for p in one(objects, "Service")["spec"]["ports"]}
    merged = monitors["httpbin-merged-port"]["spec"]["endpoints"][0]
    assert service_ports[merged["port"]]["targetPort"] == 15092
    app = monitors["httpbin-app-port"]["spec"]["endpoints"][0]
    assert service_ports[app["port"]]["targetPort"] == 8080


def test_servicemonitor_before_131_scrapes_the_app_port_only() -> None:
    objects = render("servicemonitor", MtlsMode.STRICT, PRE_NATIVE)
    monitors = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceMonitor"]
    assert monitors == ["httpbin-app-port"]
    assert [p["name"] for p in one(objects, "Service")["spec"]["ports"]] == ["http"]
    assert one(objects, "Prometheus")["spec"]["image"] == capabilities(PRE_NATIVE).prometheus_image


def test_scraper_manifests() -> None:
    objects = scraper_manifests(namespace="monitoring", version="1.28")
    deployment = one(objects, "Deployment")
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"]["sidecar.istio.io/inject"] == "true"
    annotations = template["metadata"]["annotations"]
    assert yaml.safe_load(annotations["proxy.istio.io/config"])["proxyMetadata"] == {
        "OUTPUT_CERTS": "/etc/istio-certs"
    }
    assert yaml.safe_load(annotations["sidecar.istio.io/userVolumeMount"]) == [
        {"name": "istio-certs", "mountPath": "/etc/istio-certs"}
    ]
    assert annotations["traffic.sidecar.istio.io/includeInboundPorts"] == ""
    assert annotations["traffic.sidecar.istio.io/includeOutboundIPRanges"] == ""
    assert "INBOUND_CAPTURE_PORTS" not in annotations["proxy.istio.io/config"]
    (container,) = template["spec"]["containers"]
    assert container["image"] == capabilities("1.28").prometheus_image
    assert {"name": "istio-certs", "mountPath": "/etc/istio-certs", "readOnly": True} in container[
        "volumeMounts"
    ]
    assert {"name": "istio-certs", "emptyDir": {"medium": "Memory"}} in template["spec"]["volumes"]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "prometheus", "namespace": "monitoring"}
    ]
    default_image = one(scraper_manifests(), "Deployment")["spec"]["template"]["spec"]
    assert default_image["containers"][0]["image"] == "docker.io/prom/prometheus:v3.10.0"


# --- bad input ------------------------------------------------------------------------------


def test_scenario_namespace_must_be_its_own() -> None:
    sc = scenario("native-sidecar")
    with pytest.raises(UsageError, match="namespace='istio-system' is also the scraper_namespace"):
        scenario_manifests(sc, MtlsMode.STRICT, LATEST, namespace="istio-system")
    with pytest.raises(UsageError, match="namespace='mesh' is also the gateway_namespace"):
        scenario_manifests(sc, MtlsMode.STRICT, LATEST, namespace="mesh", gateway_namespace="mesh")
    with pytest.raises(UsageError, match="namespace='Demo_1' is not a Kubernetes namespace"):
        scenario_manifests(sc, MtlsMode.STRICT, LATEST, namespace="Demo_1")


def test_mode_the_scenario_does_not_run_in() -> None:
    with pytest.raises(UsageError, match="does not run in mTLS mode STRICT; its modes: PERMISSIVE"):
        scenario_manifests(scenario("native-gateway"), MtlsMode.STRICT, LATEST, namespace=NS)


def test_unknown_variant_lists_the_scenario_variants() -> None:
    with pytest.raises(UsageError, match="its variants: as-documented, proxyconfig"):
        find_variant(scenario("gateway-api"), "helm-values")


def test_unsupported_istio_version_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"Istio version '1\.19\.0' is in minor 1\.19"):
        scenario_manifests(scenario("legacy-sidecar"), MtlsMode.STRICT, "1.19.0", namespace=NS)


# --- configuration variants -----------------------------------------------------------------


def _workload_policies(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == "PeerAuthentication" and "selector" in o["spec"]]


@pytest.mark.parametrize("name", ["native-sidecar", "hardened"])
def test_port_permissive_sets_both_secure_ports_permissive_for_the_workload(name: str) -> None:
    objects = render(name, MtlsMode.STRICT, variant="port-permissive")
    (policy,) = _workload_policies(objects)
    assert policy["spec"] == {
        "selector": {"matchLabels": {"app": "httpbin"}},
        "portLevelMtls": {"15091": {"mode": "PERMISSIVE"}, "15092": {"mode": "PERMISSIVE"}},
    }
    assert "traffic.sidecar.istio.io/excludeInboundPorts" not in pod_annotations(objects)
    assert not _workload_policies(render(name, MtlsMode.STRICT, variant="as-documented"))


def test_port_strict_sets_the_legacy_sidecar_port_strict() -> None:
    objects = render("legacy-sidecar", MtlsMode.PERMISSIVE, variant="port-strict")
    (policy,) = _workload_policies(objects)
    assert policy["spec"]["portLevelMtls"] == {"15091": {"mode": "STRICT"}}
    assert one(objects, "Sidecar")["spec"]["ingress"][0]["port"]["number"] == 15091
    assert not _workload_policies(render("legacy-sidecar", MtlsMode.PERMISSIVE))


def test_upgrade_starts_from_the_working_legacy_configuration() -> None:
    (unit,) = scenario("upgrade").run_units()
    assert unit.variant.id is VariantId.PORT_STRICT
    objects = render("upgrade", MtlsMode.PERMISSIVE, PRE_NATIVE)
    (policy,) = _workload_policies(objects)
    assert policy["spec"]["portLevelMtls"] == {"15091": {"mode": "STRICT"}}


def test_fix_variants_render_only_in_the_modes_they_run_in() -> None:
    with pytest.raises(UsageError, match=r"variant exclude-capture .* does not run in mTLS mode"):
        render("native-sidecar", MtlsMode.PERMISSIVE, variant="exclude-capture")


def test_tcp_app_port_names_the_app_port_tcp_and_the_servicemonitor_follows() -> None:
    objects = render("servicemonitor", MtlsMode.PERMISSIVE, variant="tcp-app-port")
    ports = {p["name"]: p["port"] for p in one(objects, "Service")["spec"]["ports"]}
    assert ports == {"tcp": 8000, "https-merged": 15092}
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert sorted(m["spec"]["endpoints"][0]["port"] for m in monitors) == ["https-merged", "tcp"]
    documented = render("servicemonitor", MtlsMode.PERMISSIVE)
    assert "http" in {p["name"] for p in one(documented, "Service")["spec"]["ports"]}


def test_podmonitor_scrapes_the_secure_merged_port_like_istios_operator_sample() -> None:
    objects = render("servicemonitor", MtlsMode.STRICT, variant="podmonitor")
    assert not [o for o in objects if o["kind"] == "ServiceMonitor"]
    monitor = one(objects, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https"
    # a PodMonitor cannot name files (prometheus-operator#3922): its scrape class does
    assert "tlsConfig" not in endpoint
    (scrape_class,) = one(objects, "Prometheus")["spec"]["scrapeClasses"]
    assert monitor["spec"]["scrapeClass"] == scrape_class["name"]
    assert scrape_class["tlsConfig"]["certFile"] == "/etc/prom-certs/cert-chain.pem"
    assert scrape_class["tlsConfig"]["insecureSkipVerify"] is True
    address = endpoint["relabelings"][-1]
    assert address["targetLabel"] == "__address__"
    assert address["sourceLabels"][-1] == (
        "__meta_kubernetes_pod_annotation_prometheus_istio_io_secure_port"
    )
    prometheus = one(objects, "Prometheus")
    assert prometheus["spec"]["podMonitorSelector"] == prometheus["spec"]["serviceMonitorSelector"]
