"""`securemetrics-e2e audit`: coded findings on real configurations and manifests.

The project's own scrape configuration and every manifest its charts render (real Helm
engine) must come out clean, except where a scenario deploys the documented-but-doubtful
path on purpose; configurations built the ways users break them must be flagged with the
right code, file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from securemetrics_e2e.audit import RULES, Severity, audit, render_json, render_text
from securemetrics_e2e.catalog import SCENARIOS
from securemetrics_e2e.cli import main
from securemetrics_e2e.local.promconfig import chart_scrape_config_path
from securemetrics_e2e.manifests import scenario_manifests, scraper_manifests

# What users write: Istio's classic sample jobs, and secure jobs with a piece missing.
BAD_PROMETHEUS = """\
global:
  scrape_interval: 15s
scrape_configs:
  - job_name: kubernetes-pods            # line 4: the sample's annotation-driven job
    kubernetes_sd_configs:
      - role: pod
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_io_scrape]
        action: keep
        regex: "true"
      - source_labels: [__address__, __meta_kubernetes_pod_annotation_prometheus_io_port]
        action: replace
        regex: ([^:]+)(?::\\d+)?;(\\d+)
        replacement: $1:$2
        target_label: __address__
  - job_name: envoy-stats                # line 16: Istio's old 15090 job
    metrics_path: /stats/prometheus
    kubernetes_sd_configs:
      - role: pod
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_container_port_name]
        action: keep
        regex: '.*-envoy-prom'
  - job_name: sidecar-agent              # line 24: a fixed plaintext port
    static_configs:
      - targets: ["10.0.0.7:15020"]
  - job_name: secure-no-client-cert      # line 27
    scheme: https
    tls_config:
      ca_file: /etc/istio-certs/root-cert.pem
      insecure_skip_verify: true
    kubernetes_sd_configs:
      - role: pod
    relabel_configs:
      - source_labels: [__meta_kubernetes_pod_annotation_prometheus_istio_io_secure_port]
        action: keep
        regex: .+
  - job_name: secure-verifies-ip         # line 38
    scheme: https
    tls_config:
      ca_file: /etc/prom-certs/root-cert.pem
      cert_file: /etc/prom-certs/cert-chain.pem
      key_file: /etc/prom-certs/key.pem
    static_configs:
      - targets: ["10.0.0.7:15092"]
"""

BAD_MANIFESTS = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: prometheus, namespace: monitoring}
spec:
  selector: {matchLabels: {app: prometheus}}
  template:
    metadata:
      labels: {app: prometheus, sidecar.istio.io/inject: "true"}
      annotations:
        proxy.istio.io/config: |
          proxyMetadata:
            OUTPUT_CERTS: /etc/istio-output-certs
            INBOUND_CAPTURE_PORTS: ""
        sidecar.istio.io/userVolumeMount: >-
          [{"name": "istio-certs", "mountPath": "/etc/istio-output-certs"}]
    spec:
      containers:
        - name: prometheus-server
          image: prom/prometheus:v3.10.0
          volumeMounts:
            - {name: prom-certs, mountPath: /etc/prom-certs}
      volumes:
        - {name: istio-certs, emptyDir: {medium: Memory}}
        - name: prom-certs
          secret: {secretName: prometheus-client-cert}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: istio-ingressgateway, namespace: istio-system}
spec:
  selector: {matchLabels: {istio: ingressgateway}}
  template:
    metadata:
      labels: {istio: ingressgateway, sidecar.istio.io/inject: "false"}
    spec:
      containers:
        - name: istio-proxy
          image: docker.io/istio/proxyv2:1.31.1
          env:
            - {name: ENVOY_SECURE_METRICS_PORT, value: "15091"}
            - {name: ENVOY_SECURE_MERGED_METRICS_PORT, value: "15092"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {matchLabels: {app: reviews}}
  template:
    metadata:
      labels: {app: reviews}
      annotations:
        prometheus.istio.io/secure-port: "15093"
        proxy.istio.io/config: |
          proxyMetadata:
            ENVOY_SECURE_MERGED_METRICS_PORT: "15092"
    spec:
      containers: [{name: reviews, image: reviews:v1}]
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: mesh, namespace: monitoring}
spec:
  selector: {matchLabels: {app: reviews}}
  endpoints:
    - port: http-envoy-prom
      path: /stats/prometheus
    - port: https-merged
      scheme: https
      tlsConfig:
        ca: {secret: {name: istio-ca, key: root-cert.pem}}
        cert: {secret: {name: prometheus-client-cert, key: tls.crt}}
        keySecret: {name: prometheus-client-cert, key: tls.key}
        insecureSkipVerify: true
"""


def findings_of(paths: list[Path]) -> set[tuple[str, str]]:
    return {(f.code, f.subject) for f in audit(paths).findings}


def test_project_scrape_config_is_clean() -> None:
    result = audit([chart_scrape_config_path()])
    assert result.prometheus_configs == 1
    assert result.findings == []
    assert result.exit_status() == 0


def _write(path: Path, objects: list[dict[str, object]]) -> Path:
    path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    return path


def test_rendered_project_manifests_are_clean(tmp_path: Path) -> None:
    """Every scenario rendered by the charts, audited as the deployment it is, with the scraper."""
    scraper = _write(tmp_path / "scraper.yaml", scraper_manifests(version="1.31.1"))
    flagged: dict[str, set[tuple[str, str]]] = {}
    checked = 0
    for s in SCENARIOS:
        for unit in s.run_units():
            mode, variant = unit.mtls_mode, unit.variant
            objects = scenario_manifests(
                s, mode, "1.31.1", namespace=f"sm-{s.name}", variant=variant
            )
            path = _write(tmp_path / f"{s.name}-{mode.value}-{variant.id}.yaml", objects)
            result = audit([scraper, path])
            checked += 1
            if result.findings:
                flagged[path.name] = {(f.code, f.subject) for f in result.findings}
    assert checked >= 15
    # The documented Gateway API path is deployed on purpose (the suite reports what Istio
    # does with it); the audit warns about exactly that and nothing else.
    assert flagged == {
        "gateway-api-PERMISSIVE-as-documented.yaml": {("SM011", "Gateway sm-gateway-api/secure-gw")}
    }


def test_configmap_embedded_scrape_config_is_audited(tmp_path: Path) -> None:
    objects = scraper_manifests(version="1.31.1")
    cm = next(o for o in objects if o["kind"] == "ConfigMap")
    result = audit([_write(tmp_path / "scraper.yaml", objects)])
    assert result.prometheus_configs == 1
    assert result.findings == []
    cm["data"]["prometheus.yml"] = BAD_PROMETHEUS
    result = audit([_write(tmp_path / "scraper.yaml", objects)])
    subjects = {f.subject for f in result.findings if f.code == "SM001"}
    ns = cm["metadata"]["namespace"]
    assert f"job 'envoy-stats' in ConfigMap {ns}/{cm['metadata']['name']} key prometheus.yml" in (
        subjects
    )


def test_bad_prometheus_config_is_flagged(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(BAD_PROMETHEUS)
    result = audit([config])
    got = {(f.code, f.subject, f.line) for f in result.findings}
    assert got == {
        ("SM002", "job 'kubernetes-pods'", 4),
        ("SM001", "job 'envoy-stats'", 16),
        ("SM001", "job 'sidecar-agent'", 24),
        ("SM009", "job 'secure-no-client-cert'", 27),
        ("SM010", "job 'secure-verifies-ip'", 38),
    }
    assert result.exit_status() == 3
    assert result.exit_status(Severity.ERROR) == 3


def test_bad_manifests_are_flagged_with_file_and_line(tmp_path: Path) -> None:
    manifests = tmp_path / "mesh.yaml"
    manifests.write_text(BAD_MANIFESTS)
    config = tmp_path / "prometheus.yml"
    config.write_text(BAD_PROMETHEUS)
    result = audit([tmp_path])
    got = {(f.code, f.subject) for f in result.findings if f.file == str(manifests)}
    assert got == {
        ("SM005", "Deployment monitoring/prometheus"),  # istio-certs only in istio-proxy
        ("SM006", "Deployment monitoring/prometheus"),  # INBOUND_CAPTURE_PORTS
        ("SM008", "Deployment monitoring/prometheus"),  # no includeInbound/Outbound
        ("SM003", "Deployment istio-system/istio-ingressgateway"),  # env, no annotation
        ("SM004", "Deployment istio-system/istio-ingressgateway"),
        ("SM003", "Deployment bookinfo/reviews"),  # annotation names the wrong port
        ("SM001", "ServiceMonitor monitoring/mesh"),  # http-envoy-prom over http
        ("SM007", "ServiceMonitor monitoring/mesh"),  # client cert from a Secret
    }
    # the config's secure job reads its client certificate from the Secret volume
    sm007 = [f for f in result.findings if f.code == "SM007" and f.file == str(config)]
    assert [f.subject for f in sm007] == ["job 'secure-verifies-ip'", "job 'secure-verifies-ip'"]
    assert "Secret prometheus-client-cert mounted by Deployment monitoring/prometheus" in (
        sm007[0].message
    )
    lines = {f.subject: f.line for f in result.findings if f.file == str(manifests)}
    assert lines["Deployment monitoring/prometheus"] == 1
    assert lines["Deployment istio-system/istio-ingressgateway"] == 27
    assert lines["ServiceMonitor monitoring/mesh"] == 59


def test_each_fix_removes_its_finding(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all(BAD_MANIFESTS))
    prom, gateway, reviews, _ = docs
    tpl = prom["spec"]["template"]
    tpl["metadata"]["annotations"].update(
        {
            "traffic.sidecar.istio.io/includeInboundPorts": "",
            "traffic.sidecar.istio.io/includeOutboundIPRanges": "",
            "proxy.istio.io/config": "proxyMetadata:\n  OUTPUT_CERTS: /etc/istio-output-certs\n",
        }
    )
    tpl["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "istio-certs", "mountPath": "/etc/prom-certs"}
    )
    gateway["spec"]["template"]["metadata"]["annotations"] = {
        "prometheus.istio.io/secure-port": "15092",
        "prometheus.istio.io/secure-envoy-port": "15091",
    }
    reviews["spec"]["template"]["metadata"]["annotations"]["prometheus.istio.io/secure-port"] = (
        "15092"
    )
    path = _write(tmp_path / "fixed.yaml", [prom, gateway, reviews])
    assert audit([path]).findings == []


def test_injected_sidecar_gets_the_annotation_automatically(tmp_path: Path) -> None:
    """The injector copies ENVOY_SECURE_MERGED_METRICS_PORT into the annotation: no finding."""
    docs = list(yaml.safe_load_all(BAD_MANIFESTS))
    reviews = docs[2]
    del reviews["spec"]["template"]["metadata"]["annotations"]["prometheus.istio.io/secure-port"]
    assert audit([_write(tmp_path / "r.yaml", [reviews])]).findings == []
    reviews["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    assert [f.code for f in audit([_write(tmp_path / "r.yaml", [reviews])]).findings] == ["SM003"]


def test_proxyconfig_opens_gateway_ports(tmp_path: Path) -> None:
    gateway = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "gw", "namespace": "edge"},
        "spec": {"gatewayClassName": "istio", "listeners": []},
    }
    proxy_config = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "ProxyConfig",
        "metadata": {"name": "gw-metrics", "namespace": "edge"},
        "spec": {
            "selector": {"matchLabels": {"gateway.networking.k8s.io/gateway-name": "gw"}},
            "environmentVariables": {"ENVOY_SECURE_MERGED_METRICS_PORT": "15092"},
        },
    }
    # ports opened by the ProxyConfig, but no annotation reaches the generated pods
    found = audit([_write(tmp_path / "gw.yaml", [gateway, proxy_config])]).findings
    assert [(f.code, f.subject) for f in found] == [("SM003", "Gateway edge/gw")]
    gateway["spec"]["infrastructure"] = {
        "annotations": {"prometheus.istio.io/secure-port": "15092"}
    }
    assert audit([_write(tmp_path / "gw.yaml", [gateway, proxy_config])]).findings == []


def test_text_and_json_output_and_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifests = tmp_path / "mesh.yaml"
    manifests.write_text(BAD_MANIFESTS)
    assert main(["audit", str(manifests)]) == 3
    out = capsys.readouterr().out
    assert f"{manifests}:27: error SM003 Deployment istio-system/istio-ingressgateway:" in out
    assert f"    hint: {RULES['SM003'].hint}" in out
    assert out.splitlines()[-1].startswith("securemetrics-e2e audit: 4 errors, 4 warnings, 0 info")

    assert main(["audit", str(manifests), "--format", "json"]) == 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["error"] == 4
    assert doc["summary"]["warning"] == 4
    assert doc["exitStatus"] == 3
    assert {f["code"] for f in doc["findings"]} == {
        "SM001", "SM003", "SM004", "SM005", "SM006", "SM007", "SM008"
    }  # fmt: skip
    assert all(f["hint"] == RULES[f["code"]].hint for f in doc["findings"])

    warnings_only = tmp_path / "w.yaml"
    warnings_only.write_text(BAD_MANIFESTS.split("---")[1])  # the gateway: SM003 + SM004
    assert main(["audit", str(warnings_only), "--fail-on", "error"]) == 3
    gateway_docs = list(yaml.safe_load_all(BAD_MANIFESTS))[1]
    gateway_docs["spec"]["template"]["metadata"]["annotations"] = {
        "prometheus.istio.io/secure-port": "15092"
    }
    _write(warnings_only, [gateway_docs])  # only SM004 (warning) is left
    assert main(["audit", str(warnings_only)]) == 1
    assert main(["audit", str(warnings_only), "--fail-on", "error"]) == 0
    assert main(["audit", str(chart_scrape_config_path())]) == 0
    capsys.readouterr()


def test_unrendered_helm_templates_are_skipped_and_named(tmp_path: Path) -> None:
    from securemetrics_e2e.charts import CHARTS_DIR

    result = audit([CHARTS_DIR / "secure-metrics-prometheus"])
    assert result.findings == []
    assert result.prometheus_configs == 1  # files/prometheus.yml
    assert any(t.endswith("templates/deployment.yaml") for t in result.templates)
    assert "unrendered Helm template" in render_text(result)
    assert json.loads(render_json(result))["summary"]["skippedTemplates"] == result.templates


def test_unreadable_inputs_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("scrape_configs:\n  - job_name: [unclosed\n")
    assert main(["audit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err
    assert "not valid YAML" in err
    assert main(["audit", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err


def test_every_rule_is_documented() -> None:
    import securemetrics_e2e.audit as module

    assert list(RULES) == [f"SM{n:03d}" for n in range(1, len(RULES) + 1)]
    for code, rule in RULES.items():
        assert code in (module.__doc__ or "")
        assert rule.hint
        assert rule.title


@pytest.mark.parametrize(
    ("name", "content"),
    [("empty.yaml", ""), ("foo.yaml", "foo: bar\n"), ("emptydir", None), ("list.json", "[]")],
)
def test_auditing_nothing_is_exit_2_naming_what_was_given(
    name: str, content: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / name
    if content is None:
        target.mkdir()
    else:
        target.write_text(content)
    assert main(["audit", str(target)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"securemetrics-e2e: error: nothing to audit in {target}: ")


def test_the_same_file_given_twice_is_audited_once(tmp_path: Path) -> None:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "scrape_configs:\n- job_name: plain\n  static_configs:\n  - targets: ['10.0.0.1:15090']\n"
    )
    once = audit([config])
    twice = audit([config, tmp_path, tmp_path / "." / "prometheus.yml"])
    assert [f.code for f in once.findings] == ["SM001"]
    assert [f.code for f in twice.findings] == ["SM001"]
    assert twice.files == 1


def test_hints_name_a_command_a_pip_user_has(capsys: pytest.CaptureFixture[str]) -> None:
    assert all("charts/" not in rule.hint for rule in RULES.values())
    assert "`securemetrics-e2e scrape-config`" in RULES["SM001"].hint
    assert main(["scrape-config"]) == 0
    printed = capsys.readouterr().out
    assert printed == chart_scrape_config_path().read_text()
    assert "istio-secure-merged-metrics" in printed
