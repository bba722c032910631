"""The local model of Istio's deployment controller for a Gateway API gateway.

Table from ISTIO-FACTS.md "Gateways", read against istio/istio
pilot/pkg/config/kube/gatewaycommon/deploymentcontroller.go, pilot/pkg/model/proxy_config.go
and manifests/charts/istio-control/istio-discovery/files/kube-gateway.yaml.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from securemetrics_e2e.catalog import MtlsMode, RunUnit, scenario
from securemetrics_e2e.charts import render_chart
from securemetrics_e2e.local.faults import select_nothing
from securemetrics_e2e.local.gatewaymodel import NoSuchGateway, generated_gateway, unit_gateway
from securemetrics_e2e.manifests import scenario_manifests

NS = "sm-gw"


def _rendered(variant: str) -> list[dict[str, Any]]:
    return scenario_manifests(
        scenario("gateway-api"), MtlsMode.PERMISSIVE, "1.31.1", namespace=NS, variant=variant
    )


def _hardened(path: str) -> list[dict[str, Any]]:
    values = {
        "gatewayApi": {"enabled": True, "name": "secure-gw", "mode": "hardened", "path": path}
    }
    return render_chart("mesh-gateways", values, release="gw", namespace=NS)


def test_documented_annotations_open_no_secure_port() -> None:
    gw = generated_gateway(_rendered("as-documented"), "secure-gw")
    assert not gw.opens_secure_ports
    assert gw.env == {}
    # the annotation is copied onto the pods, where the agent merges it into its proxy config
    assert gw.annotation_metadata["ENVOY_SECURE_METRICS_PORT"] == "15091"
    assert gw.pod_annotations["prometheus.istio.io/secure-port"] == "15092"


def test_a_proxyconfig_selecting_the_gateway_name_opens_both_ports() -> None:
    gw = generated_gateway(_rendered("proxyconfig"), "secure-gw")
    assert (gw.secure_envoy_port, gw.secure_merged_port) == (15091, 15092)
    assert gw.opens_secure_ports
    assert not gw.stats_localhost_only
    assert not gw.agent_localhost_only


def test_hardened_through_annotations_splits_the_two_localhost_rules() -> None:
    gw = generated_gateway(_hardened("infrastructureAnnotations"), "secure-gw")
    assert not gw.opens_secure_ports
    assert gw.stats_localhost_only  # bootstrap option from the merged proxyMetadata
    assert not gw.agent_localhost_only  # 403 rule reads the process env: 15020 stays open


def test_hardened_through_a_proxyconfig_closes_both() -> None:
    gw = generated_gateway(_hardened("proxyConfig"), "secure-gw")
    assert gw.opens_secure_ports
    assert gw.stats_localhost_only
    assert gw.agent_localhost_only


def test_a_proxyconfig_selecting_nothing_opens_nothing() -> None:
    objects = [
        select_nothing(o) if o["kind"] == "ProxyConfig" else o for o in _rendered("proxyconfig")
    ]
    assert not generated_gateway(objects, "secure-gw").opens_secure_ports


def test_namespace_wide_then_selecting_proxyconfig() -> None:
    objects = _rendered("proxyconfig")
    selecting = next(o for o in objects if o["kind"] == "ProxyConfig")
    wide = copy.deepcopy(selecting)
    del wide["spec"]["selector"]
    wide["metadata"]["name"] = "namespace-wide"
    wide["spec"]["environmentVariables"] = {"ENVOY_SECURE_METRICS_PORT": "1", "OTHER": "x"}
    gw = generated_gateway([wide, *objects], "secure-gw")
    assert gw.env["ENVOY_SECURE_METRICS_PORT"] == "15091"  # the selecting one wins
    assert gw.env["OTHER"] == "x"
    other_ns = copy.deepcopy(selecting)
    other_ns["metadata"]["namespace"] = "elsewhere"
    documented = _rendered("as-documented")
    assert not generated_gateway([other_ns, *documented], "secure-gw").opens_secure_ports


def test_omitted_infrastructure_annotations_are_not_copied() -> None:
    objects = _rendered("as-documented")
    gateway = next(o for o in objects if o["kind"] == "Gateway")
    gateway["spec"]["infrastructure"]["annotations"]["gateway.istio.io/service-account"] = "x"
    gw = generated_gateway(objects, "secure-gw")
    assert "gateway.istio.io/service-account" not in gw.pod_annotations


def test_no_such_gateway() -> None:
    with pytest.raises(NoSuchGateway, match="no Gateway API Gateway 'nope'"):
        generated_gateway(_rendered("proxyconfig"), "nope")


def test_unit_gateway_models_only_gateway_api_units() -> None:
    documented, fix = scenario("gateway-api").run_units()
    assert unit_gateway(RunUnit(scenario("native-gateway"), MtlsMode.PERMISSIVE), "1.31.1") is None
    gw = unit_gateway(fix, "1.31.1")
    assert gw is not None
    assert gw.deployment == "secure-gw-istio" == fix.scenario.workloads[0].name
    assert gw.opens_secure_ports
    broken = unit_gateway(fix, "1.31.1", broken_proxy_config=True)
    assert broken is not None
    assert not broken.opens_secure_ports
    documented_gw = unit_gateway(documented, "1.31.1")
    assert documented_gw is not None
    assert not documented_gw.opens_secure_ports
