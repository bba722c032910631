"""Each chart's values.schema.json, enforced by Helm's real engine, and its README.

Valid values reach the rendered annotations and env exactly; invalid ones are refused with
a UsageError naming the chart, the value and what it must be.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from securemetrics_e2e import charts
from securemetrics_e2e.errors import UsageError

RESERVED = (15000, 15001, 15006, 15020, 15021, 15090)
APP_PORT = 8080
LISTENER_PORT = 80
CHARTS = charts.chart_names()

# Ports a chart accepts for a secure metrics port: in range, not reserved.
ok_ports = st.integers(1, 65535).filter(lambda p: p not in RESERVED)
# A DNS-1123 label (ServiceAccount, namespace) and a DNS-1035 label (Service name).
dns_label = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")
dns1035 = st.from_regex(r"\A[a-z]([-a-z0-9]{0,20}[a-z0-9])?\Z")


def render(chart: str, values: dict[str, Any], namespace: str = "ns") -> list[dict[str, Any]]:
    return charts.render_chart(chart, values, release="schema", namespace=namespace)


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def proxy_metadata(annotations: dict[str, str]) -> dict[str, str]:
    metadata: dict[str, str] = yaml.safe_load(annotations["proxy.istio.io/config"])["proxyMetadata"]
    return metadata


# --- valid values arrive exactly ------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    ports=st.tuples(ok_ports, ok_ports).filter(lambda p: p[0] != p[1] and APP_PORT not in p),
    name=dns1035,
    account=dns_label,
    namespace=dns_label,
    mode=st.sampled_from(["native", "hardened"]),
    exclude=st.booleans(),
)
def test_httpbin_carries_any_valid_ports_and_identity_exactly(
    ports: tuple[int, int],
    name: str,
    account: str,
    namespace: str,
    mode: str,
    exclude: bool,
) -> None:
    envoy, merged = ports
    objects = render(
        "httpbin",
        {
            "name": name,
            "serviceAccount": {"name": account},
            "service": {"exposeSecureMergedPort": True},
            "metrics": {
                "mode": mode,
                "envoyPort": envoy,
                "mergedPort": merged,
                "excludeSecurePortsFromCapture": exclude,
            },
        },
        namespace,
    )
    assert {o["metadata"]["namespace"] for o in objects} == {namespace}
    assert one(objects, "ServiceAccount")["metadata"]["name"] == account
    deployment = one(objects, "Deployment")
    template = deployment["spec"]["template"]
    assert deployment["metadata"]["name"] == name
    assert template["spec"]["serviceAccountName"] == account
    assert template["metadata"]["labels"]["app"] == name
    annotations = template["metadata"]["annotations"]
    expected = {
        "ENVOY_SECURE_METRICS_PORT": str(envoy),
        "ENVOY_SECURE_MERGED_METRICS_PORT": str(merged),
    }
    if mode == "hardened":
        expected["METRICS_LOCALHOST_ACCESS_ONLY"] = "true"
    assert proxy_metadata(annotations) == expected
    assert "prometheus.istio.io/secure-port" not in annotations  # the injector's to set
    assert annotations["prometheus.istio.io/secure-envoy-port"] == str(envoy)
    if exclude:
        assert annotations["traffic.sidecar.istio.io/excludeInboundPorts"] == f"{envoy},{merged}"
    else:
        assert "traffic.sidecar.istio.io/excludeInboundPorts" not in annotations
    service = one(objects, "Service")
    assert service["metadata"]["name"] == name
    assert service["spec"]["selector"] == {"app": name}
    assert {"name": "https-merged", "port": merged, "targetPort": merged, "protocol": "TCP"} in (
        service["spec"]["ports"]
    )


@settings(max_examples=60, deadline=None)
@given(
    ports=st.tuples(ok_ports, ok_ports).filter(lambda p: p[0] != p[1] and LISTENER_PORT not in p),
    gateway=dns_label,
    deployment=dns_label,
    namespace=dns_label,
    path=st.sampled_from(["proxyConfig", "infrastructureAnnotations"]),
)
def test_gateways_carry_any_valid_ports_exactly(
    ports: tuple[int, int], gateway: str, deployment: str, namespace: str, path: str
) -> None:
    envoy, merged = ports
    env = {"ENVOY_SECURE_METRICS_PORT": str(envoy), "ENVOY_SECURE_MERGED_METRICS_PORT": str(merged)}
    objects = render(
        "mesh-gateways",
        {
            "ports": {"envoy": envoy, "merged": merged},
            "ingressgateway": {"mode": "native", "renderPatch": True, "deployment": deployment},
            "gatewayApi": {"enabled": True, "name": gateway, "path": path},
        },
        namespace,
    )
    assert {o["metadata"]["namespace"] for o in objects} == {namespace}
    published = one(objects, "ConfigMap")["data"]
    assert published["name"] == deployment
    patch = yaml.safe_load(published["patch.yaml"])["spec"]["template"]
    (container,) = patch["spec"]["containers"]
    assert {e["name"]: e["value"] for e in container["env"]} == env
    assert patch["metadata"]["annotations"]["prometheus.istio.io/secure-port"] == str(merged)
    assert patch["metadata"]["annotations"]["prometheus.istio.io/secure-envoy-port"] == str(envoy)

    (gw,) = [o for o in objects if o["apiVersion"] == "gateway.networking.k8s.io/v1"]
    assert gw["metadata"]["name"] == gateway
    infra = gw["spec"]["infrastructure"]["annotations"]
    assert infra["prometheus.istio.io/secure-port"] == str(merged)
    assert infra["prometheus.istio.io/secure-envoy-port"] == str(envoy)
    proxy_configs = [o for o in objects if o["kind"] == "ProxyConfig"]
    if path == "proxyConfig":
        (pc,) = proxy_configs
        assert pc["spec"]["environmentVariables"] == env
        assert pc["spec"]["selector"]["matchLabels"] == {
            "gateway.networking.k8s.io/gateway-name": gateway
        }
        assert "proxy.istio.io/config" not in infra
    else:
        assert proxy_configs == []
        assert proxy_metadata(infra) == env


@settings(max_examples=40, deadline=None)
@given(port=ok_ports.filter(lambda p: p != APP_PORT), backend=st.sampled_from([15020, 15090]))
def test_legacy_sidecar_carries_any_valid_port_exactly(port: int, backend: int) -> None:
    objects = render(
        "httpbin", {"metrics": {"mode": "legacy", "legacy": {"port": port, "backendPort": backend}}}
    )
    (ingress,) = one(objects, "Sidecar")["spec"]["ingress"]
    assert ingress["port"]["number"] == port
    assert ingress["defaultEndpoint"] == f"127.0.0.1:{backend}"
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.istio.io/secure-port"] == str(port)


# --- invalid values are refused ---------------------------------------------------------------

out_of_range = st.one_of(st.integers(max_value=0), st.integers(min_value=65536))
bad_port = st.one_of(out_of_range, st.sampled_from(RESERVED))


@settings(max_examples=60, deadline=None)
@given(
    port=bad_port,
    where=st.sampled_from(
        [
            ("httpbin", ("metrics", "envoyPort")),
            ("httpbin", ("metrics", "mergedPort")),
            ("httpbin", ("metrics", "legacy", "port")),
            ("mesh-gateways", ("ports", "envoy")),
            ("mesh-gateways", ("ports", "merged")),
            ("mesh-gateways", ("ingressgateway", "legacy", "port")),
            ("mesh-gateways", ("gatewayApi", "listenerPort")),
            ("secure-metrics-prometheus", ("port",)),
        ]
    ),
)
def test_ports_out_of_range_or_reserved_are_refused(
    port: int, where: tuple[str, tuple[str, ...]]
) -> None:
    chart, keys = where
    values: dict[str, Any] = {}
    node = values
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = port
    with pytest.raises(UsageError) as info:
        render(chart, values)
    message = str(info.value)
    assert f"chart {chart!r} rejects its values" in message
    assert f"{'.'.join(keys)} = {port}" in message
    if port in RESERVED:
        assert "reserved ports 15000, 15001, 15006, 15020, 15021, 15090" in message
    else:
        assert re.search(r"(minimum|maximum): got", message), message


@settings(max_examples=40, deadline=None)
@given(port=ok_ports.filter(lambda p: p not in (APP_PORT, LISTENER_PORT)))
def test_the_same_port_twice_is_refused(port: int) -> None:
    with pytest.raises(UsageError, match=rf"envoyPort and metrics\.mergedPort are both {port}\b"):
        render("httpbin", {"metrics": {"envoyPort": port, "mergedPort": port}})
    with pytest.raises(UsageError, match=rf"ports\.envoy and ports\.merged are both {port}\b"):
        render(
            "mesh-gateways",
            {"ports": {"envoy": port, "merged": port}, "gatewayApi": {"enabled": True}},
        )


@pytest.mark.parametrize(
    ("chart", "values", "message"),
    [
        (
            "httpbin",
            {"metrics": {"envoyPort": APP_PORT}},
            "metrics.envoyPort is 8080, the application port",
        ),
        (
            "httpbin",
            {"metrics": {"mode": "legacy", "legacy": {"port": APP_PORT}}},
            "metrics.legacy.port is 8080",
        ),
        (
            "mesh-gateways",
            {"gatewayApi": {"enabled": True, "listenerPort": 15092}},
            "ports.merged is 15092, the Gateway's listener port",
        ),
        (
            "httpbin",
            {"metrics": {"mode": "strict"}},
            "metrics.mode = \"strict\": value must be one of 'off', 'native', 'hardened', 'legacy'",
        ),
        (
            "mesh-gateways",
            {"ingressgateway": {"mode": "sidecar"}},
            'ingressgateway.mode = "sidecar": value must be one of',
        ),
        (
            "mesh-gateways",
            {"gatewayApi": {"path": "annotations"}},
            "gatewayApi.path = \"annotations\": value must be one of 'proxyConfig', "
            "'infrastructureAnnotations'",
        ),
        (
            "mesh-gateways",
            {"gatewayApi": {"mode": "legacy"}},
            "gatewayApi.mode = \"legacy\": value must be one of 'native', 'hardened'",
        ),
        (
            "mesh-policy",
            {"peerAuthentication": {"mode": "DISABLE"}},
            "peerAuthentication.mode = \"DISABLE\": value must be one of 'STRICT', 'PERMISSIVE'",
        ),
        (
            "httpbin",
            {"metrics": {"legacy": {"backendPort": 15000}}},
            "metrics.legacy.backendPort = 15000: value must be one of 15020, 15090",
        ),
        (
            "httpbin",
            {"metrics": {"envoyPort": "15091"}},
            'metrics.envoyPort = "15091": got string, want integer',
        ),
        (
            "httpbin",
            {"metrics": {"mdoe": "native"}},
            "metrics: additional properties 'mdoe' not allowed",
        ),
        ("httpbin", {"serviceAccount": {"name": "Http_Bin"}}, 'serviceAccount.name = "Http_Bin"'),
        ("mesh-gateways", {"gatewayApi": {"name": "g" * 58}}, "Istio appends -istio"),
        (
            "secure-metrics-prometheus",
            {"retention": "forever"},
            "a Prometheus duration such as 6h or 1d",
        ),
        (
            "prometheus-operator-scrape",
            {"target": {"appPort": {"portName": "https-merged-metrics"}}},
            "at most 15",
        ),
        (
            "prometheus-operator-scrape",
            {"serviceMonitorLabel": {"team": 5}},
            "serviceMonitorLabel.team = 5: got number, want string",
        ),
        (
            # null deletes a key in Helm: the Prometheus would then select every ServiceMonitor
            "prometheus-operator-scrape",
            {"serviceMonitorLabel": None},
            "missing property 'serviceMonitorLabel'",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_bad_values_are_refused_with_a_message_naming_them(
    chart: str, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError) as info:
        render(chart, values)
    assert f"chart {chart!r} rejects its values" in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("chart", CHARTS)
def test_every_chart_has_a_strict_schema(chart: str) -> None:
    schema = json.loads((charts.CHARTS_DIR / chart / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    with pytest.raises(UsageError, match=r"additional properties 'typo' not allowed"):
        render(chart, {"typo": True})


# --- READMEs --------------------------------------------------------------------------------


def _documented_keys(schema: dict[str, Any], values: Any, prefix: str = "") -> list[str]:
    """Every settable key of values.yaml: recurse where the schema lists the properties."""
    node = schema
    while "$ref" in node:
        node = _resolve(node["$ref"])
    if "properties" not in node or not isinstance(values, dict):
        return [prefix]
    keys = []
    for key, value in values.items():
        keys += _documented_keys(node["properties"][key], value, f"{prefix}{key}.")
    return keys


_SCHEMA: dict[str, Any] = {}


def _resolve(ref: str) -> dict[str, Any]:
    node: Any = _SCHEMA
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    resolved: dict[str, Any] = node
    return resolved


@pytest.mark.parametrize("chart", CHARTS)
def test_readme_tables_every_value(chart: str) -> None:
    folder: Path = charts.CHARTS_DIR / chart
    _SCHEMA.clear()
    _SCHEMA.update(json.loads((folder / "values.schema.json").read_text()))
    values = yaml.safe_load((folder / "values.yaml").read_text())
    readme = (folder / "README.md").read_text()
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `"))
    missing = [
        key.rstrip(".")
        for key in _documented_keys(_SCHEMA, values)
        if f"`{key.rstrip('.')}`" not in table
    ]
    assert missing == [], f"{chart}/README.md has no values-table row for {missing}"
