"""The Helm engine behind securemetrics_e2e.charts, and the scraper chart's configuration.

Everything renders with Helm's real library (helm-python-sdk); promtool is Debian's real
binary. No Helm behaviour is simulated.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from securemetrics_e2e import charts
from securemetrics_e2e.catalog import SCENARIOS
from securemetrics_e2e.errors import EnvironmentProblem, UsageError
from securemetrics_e2e.local.promconfig import local_scrape_config
from securemetrics_e2e.manifests import find_variant, scenario_releases, scraper_release
from securemetrics_e2e.versions import supported_versions

REPO = Path(__file__).resolve().parent.parent
SCRAPE_FILE = REPO / "charts" / "secure-metrics-prometheus" / "files" / "prometheus.yml"
CHARTS = ("httpbin", "mesh-gateways", "mesh-policy", "prometheus-operator-scrape",
          "secure-metrics-prometheus")  # fmt: skip


def _configmap_text(objects: list[dict[str, Any]]) -> str:
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    text: str = cm["data"]["prometheus.yml"]
    return text


def test_charts_dir_is_the_source_tree_charts() -> None:
    assert charts.CHARTS_DIR == REPO / "charts"
    assert charts.chart_names() == CHARTS


def test_charts_dir_is_found_inside_an_installed_wheel(tmp_path: Path) -> None:
    # Build the real wheel (pyproject force-includes charts/ as securemetrics_e2e/_data/charts),
    # unpack it as an installer would, and import the package from there, not the checkout.
    dist = tmp_path / "dist"
    try:
        import hatchling  # noqa: F401 - the build backend, when the environment has it

        build = [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(dist)]
    except ImportError:  # pip fetches the backend into an isolated build environment
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), "."]
    subprocess.run(build, cwd=REPO, check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import json, securemetrics_e2e.charts as c, securemetrics_e2e.manifests as m\n"
        "from securemetrics_e2e import validation as v\n"
        "objs = m.scraper_manifests()\n"
        "gw = {'apiVersion': 'gateway.networking.k8s.io/v1', 'kind': 'Gateway',\n"
        "      'metadata': {'name': 'g', 'namespace': 'n'},\n"
        "      'spec': {'gatewayClassName': 'istio',\n"
        "               'listeners': [{'name': 'http', 'port': 80, 'protocol': 'HTTP'}]}}\n"
        "print(json.dumps([c.__file__, str(c.CHARTS_DIR), [o['kind'] for o in objs],\n"
        "                  v.validate_object(gw, kubernetes_version='1.33',\n"
        "                                    gateway_api_version='v1.6.0')]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd=tmp_path,  # not the checkout: "-c" puts the working directory first on sys.path
        capture_output=True,
        text=True,
        check=True,
    )
    module_file, charts_dir, kinds, validator = yaml.safe_load(out.stdout)
    assert Path(module_file).is_relative_to(site)
    assert Path(charts_dir) == site / "securemetrics_e2e" / "_data" / "charts"
    assert kinds == ["ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding",
                     "Service", "Deployment"]  # fmt: skip
    assert validator.startswith("Gateway API v1.6.0 Gateway CRD schema")


def test_engine_is_helm_library_in_process() -> None:
    assert charts.engine_description().startswith("helm-python-sdk ")
    assert "Helm v4" in charts.engine_description()


def test_objects_come_in_helm_install_order() -> None:
    objects = charts.render_chart("secure-metrics-prometheus", {}, release="r", namespace="ns")
    assert [o["kind"] for o in objects] == [
        "ServiceAccount", "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"
    ]  # fmt: skip
    assert {o["metadata"].get("namespace", "ns") for o in objects} == {"ns"}


def test_renders_are_cached_and_callers_get_their_own_copy() -> None:
    values = {"metrics": {"mode": "hardened"}}
    first = charts.render_chart("httpbin", values, release="cache", namespace="ns")
    hits = charts._render_cached.cache_info().hits
    first[0]["metadata"]["name"] = "changed by the caller"
    second = charts.render_chart("httpbin", values, release="cache", namespace="ns")
    assert charts._render_cached.cache_info().hits == hits + 1
    assert second[0]["metadata"]["name"] == "httpbin"


def test_unknown_chart_lists_the_known_ones() -> None:
    with pytest.raises(
        UsageError, match=r"unknown chart 'nginx'; known charts: httpbin, mesh-gateways"
    ):
        charts.render_chart("nginx", {}, release="r", namespace="ns")


def test_a_directory_without_chart_yaml_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a Helm chart directory"):
        charts.render_chart(tmp_path, {}, release="r", namespace="ns")


def test_values_must_be_plain_data() -> None:
    with pytest.raises(UsageError, match="values for chart 'httpbin' are not plain JSON data"):
        charts.render_chart(
            "httpbin", {"metrics": {"mode": {"native"}}}, release="r", namespace="n"
        )


def test_without_any_helm_engine_the_error_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As on a platform without the wheel and without Helm: the import fails, PATH has no helm.
    charts._engine.cache_clear()
    charts.clear_cache()
    monkeypatch.setitem(sys.modules, "helm_python", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    try:
        with pytest.raises(EnvironmentProblem) as info:
            charts.render_chart("mesh-policy", {}, release="none", namespace="ns")
    finally:
        charts._engine.cache_clear()
    message = str(info.value)
    assert "helm-python-sdk wheel is not installed" in message
    assert "no `helm` on PATH" in message
    assert "pip install helm-python-sdk" in message


@pytest.mark.skipif(shutil.which("helm") is None, reason="no helm binary on PATH")
@pytest.mark.parametrize("chart", CHARTS)
def test_helm_cli_renders_what_the_library_renders(chart: str) -> None:
    cli = charts._CliEngine(shutil.which("helm") or "helm")
    path = charts.chart_path(chart)
    cli_docs = [
        doc
        for _, text in cli.render(path, {}, "r", "ns")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    expected = charts.render_chart(chart, {}, release="r", namespace="ns")
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(cli_docs, key=key) == sorted(expected, key=key)


def _lint_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = {(chart, "{}"): (chart, {}) for chart in CHARTS}
    for version in supported_versions():
        for scenario in SCENARIOS:
            for unit in scenario.run_units():
                for rel in scenario_releases(
                    scenario, unit.mtls_mode, version, namespace="lint", variant=unit.variant
                ):
                    cases[(rel.chart, repr(rel.values))] = (rel.chart, dict(rel.values))
    rel = scraper_release(version=supported_versions()[0])
    cases[(rel.chart, repr(rel.values))] = (rel.chart, dict(rel.values))
    return list(cases.values())


@pytest.mark.parametrize(("chart", "values"), _lint_cases())
def test_helm_lint_strict_is_clean(chart: str, values: dict[str, Any]) -> None:
    assert charts.lint_chart(chart, values, namespace="lint") == []


def test_helm_lint_reports_a_broken_chart(tmp_path: Path) -> None:
    broken = tmp_path / "mesh-policy"
    shutil.copytree(charts.chart_path("mesh-policy"), broken)
    template = broken / "templates" / "peerauthentication.yaml"
    template.write_text(template.read_text().replace("mode: {{", "mode: {{ .Values.nope.x"))
    findings = charts.lint_chart(broken)
    assert findings, "lint accepted a template that dereferences a missing value"


def test_configmap_is_the_scrape_file_byte_for_byte() -> None:
    objects = charts.render_chart("secure-metrics-prometheus", {}, release="r", namespace="ns")
    assert _configmap_text(objects).encode() == SCRAPE_FILE.read_bytes()


@pytest.mark.parametrize(
    "text",
    [
        "global: {}\n",
        "global: {}",  # no final newline
        "global: {}\n\n\n",  # several
        "  # indented first line\nglobal: {}\n",
        "global:\n\tscrape_interval: 15s\n",  # a tab
        "global: {}\r\nscrape_configs: []\r\n",  # CRLF
        "# <&> 'quotes' \"double\" \\ unicode ✓\nglobal: {}\n",
    ],
    ids=["plain", "no-newline", "blank-tail", "indented", "tab", "crlf", "specials"],
)
def test_configmap_stays_exact_whatever_the_file_looks_like(tmp_path: Path, text: str) -> None:
    chart = tmp_path / "secure-metrics-prometheus"
    shutil.copytree(charts.chart_path("secure-metrics-prometheus"), chart)
    (chart / "files" / "prometheus.yml").write_bytes(text.encode())
    objects = charts.render_chart(chart, {}, release="r", namespace="ns")
    assert _configmap_text(objects) == text


def test_chart_refuses_to_render_without_the_scrape_file(tmp_path: Path) -> None:
    chart = tmp_path / "secure-metrics-prometheus"
    shutil.copytree(charts.chart_path("secure-metrics-prometheus"), chart)
    (chart / "files" / "prometheus.yml").unlink()
    with pytest.raises(UsageError, match=r"files/prometheus\.yml is missing or empty"):
        charts.render_chart(chart, {}, release="r", namespace="ns")


# --- promtool --------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="no promtool on PATH")


def _promtool(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL or "promtool", "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _checkable(text: str, tmp_path: Path) -> Path:
    """The config as promtool on this machine can check it, with the files it references."""
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("root-cert.pem", "cert-chain.pem", "key.pem"):
        (certs / name).write_text("")
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    probe = _promtool(config)
    if "kubernetes_sd_configs not found" in probe.stdout + probe.stderr:
        # Debian's promtool is built without Kubernetes discovery: check the same file with
        # discovery swapped for file_sd, exactly as the local backend runs it.
        sd_file = tmp_path / "targets.json"
        sd_file.write_text("[]")
        config.write_text(
            local_scrape_config(text, sd_file=sd_file, certs_dir=certs, scrape_interval="15s")
        )
    else:
        # A full promtool checks the file as the chart ships it; point it at files that exist.
        config.write_text(text.replace("/etc/istio-certs/", f"{certs}/"))
    return config


@needs_promtool
def test_promtool_accepts_the_rendered_scrape_config(tmp_path: Path) -> None:
    objects = charts.render_chart("secure-metrics-prometheus", {}, release="r", namespace="ns")
    result = _promtool(_checkable(_configmap_text(objects), tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@needs_promtool
def test_promtool_rejects_a_broken_scrape_config(tmp_path: Path) -> None:
    objects = charts.render_chart("secure-metrics-prometheus", {}, release="r", namespace="ns")
    broken = _configmap_text(objects).replace("action: keep", "action: kept", 1)
    result = _promtool(_checkable(broken, tmp_path))
    assert result.returncode != 0
    assert "kept" in result.stdout + result.stderr


def test_every_scenario_variant_name_is_found() -> None:
    for scenario in SCENARIOS:
        for v in scenario.variants:
            assert find_variant(scenario, v.id) is v
            assert find_variant(scenario, v.id.value) is v


def test_cli_fallback_coalesces_values_as_helm_does() -> None:
    # The CLI path computes merged values itself (for error messages): same result as Helm's.
    path = charts.chart_path("httpbin")
    defaults = yaml.safe_load((path / "values.yaml").read_text())
    sdk = charts._SdkEngine()
    for values in (
        {},
        {"metrics": {"mode": "legacy", "legacy": {"port": 15093}}},
        {"service": None, "name": "web"},
        {"image": {"tag": "v2"}, "metrics": {"legacy": None}},
    ):
        assert charts._coalesce(defaults, values) == sdk.merged_values(path, values)


def test_a_broken_template_is_a_chart_error_not_a_usage_error(tmp_path: Path) -> None:
    chart = tmp_path / "mesh-policy"
    shutil.copytree(charts.chart_path("mesh-policy"), chart)
    template = chart / "templates" / "peerauthentication.yaml"
    template.write_text(template.read_text().replace("mode: {{", "mode: {{ .Values.nope.x"))
    with pytest.raises(charts.ChartRenderError, match="nil pointer evaluating"):
        charts.render_chart(chart, {}, release="r", namespace="ns")
