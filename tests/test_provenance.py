"""A report says what actually ran, and a local run cannot pass for a distribution's result.

The local report here comes from a real local run (the CLI in a subprocess, shared with
tests/test_cli.py: tests/cliruns.py); the cluster
report is a plan-only report (nothing runs). Both are validated against the shipped schema.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from securemetrics_e2e.cli import main
from securemetrics_e2e.junit import build_junit
from securemetrics_e2e.matrix import REFERENCE, build_matrix, load_reports, render_markdown
from securemetrics_e2e.report import LOCAL_STATEMENT, ReportMeta, load_report, write_report
from securemetrics_e2e.results import CheckOutcome, RunResult, Status
from tests.cliruns import DIST, Run
from tests.localmesh import requires_local_mesh

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow


@pytest.fixture
def local_report(cli_runs: dict[str, Run]) -> tuple[Path, str]:
    """The report and output of tests/test_cli.py's clean run (tests/cliruns.py): a real
    local run of the CLI in a subprocess, naming a distribution."""
    run = cli_runs["good"]
    assert run.code == 0, run.stdout + run.stderr
    return run.cwd / "out" / "report.yaml", run.stdout


@requires_local_mesh
def test_a_local_report_records_the_binaries_that_stood_in(local_report: tuple[Path, str]) -> None:
    path, stdout = local_report
    doc = load_report(path)  # validated against schemas/report.schema.json
    prov = doc["provenance"]
    assert prov["subject"] == "reference-data-plane"
    assert prov["statement"] == LOCAL_STATEMENT
    assert prov["negativeControl"] is None
    assert prov["istioVersionReported"] is None  # no Istio control plane ran
    components = {c["name"]: c for c in prov["components"]}
    assert set(components) == {"envoy", "prometheus"}
    for c in components.values():
        assert Path(c["path"]).is_file()
        assert c["version"]
        assert not c["version"].startswith("unknown")
    assert re.search(r"\d+\.\d+\.\d+", components["prometheus"]["version"])
    entries = [e for p in doc["profiles"] for kind in ("passed", "skipped") for e in p[kind]]
    assert entries
    assert all(re.fullmatch(r"SMC\d{3}", e["code"]) for e in entries)
    assert "[local: Istio's reference data plane, not a distribution]" in stdout


@requires_local_mesh
def test_a_local_report_is_never_shown_as_the_distributions_result(
    local_report: tuple[Path, str],
) -> None:
    path, _ = local_report
    matrix = build_matrix(load_reports([path]))
    (column,) = matrix.columns
    assert REFERENCE in column.label
    assert "Example Mesh" not in column.label
    assert "Example Mesh" not in render_markdown(matrix)


def test_a_cluster_plan_report_carries_the_planned_istio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plan.json"
    argv = ["plan", "--backend", "kind", "--istio-version", "1.30", "--report", str(path)]
    assert main([*argv, *DIST]) == 0
    capsys.readouterr()
    doc = load_report(path)
    prov = doc["provenance"]
    assert prov["subject"] == "plan"
    assert prov["istioVersionReported"] == "1.30.5"
    images = {c["name"]: c["image"] for c in prov["components"]}
    assert images == {
        "istiod": "docker.io/istio/pilot:1.30.5",
        "proxy": "docker.io/istio/proxyv2:1.30.5",
        # which Prometheus judges: the chart runs v3 where the local backend runs Debian's 2.x
        "prometheus": "docker.io/prom/prometheus:v3.10.0",
    }
    assert doc["verdict"]["conformant"] is False
    assert doc["verdict"]["result"] == "skipped"
    matrix = build_matrix(load_reports([path]))
    assert "plan only (nothing ran)" in matrix.columns[0].label


def test_a_negative_control_is_marked_in_the_report_and_the_matrix(tmp_path: Path) -> None:
    failed = CheckOutcome(
        "native-sidecar", "PERMISSIVE", "foreign-ca-refused", Status.FAIL, "trusted", "SMC006"
    )
    meta = ReportMeta(backend="local", backend_details={"fault": "foreign-root-trusted"})
    doc = write_report(tmp_path / "nc.json", RunResult(outcomes=[failed]), meta)
    assert doc["provenance"]["negativeControl"] == {"fault": "foreign-root-trusted"}
    matrix = build_matrix(load_reports([tmp_path / "nc.json"]))
    assert "negative control (fault foreign-root-trusted)" in matrix.columns[0].label
    assert "FAIL (negative control)" in render_markdown(matrix)
    root = build_junit(RunResult(outcomes=[failed]), meta)
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["securemetrics.subject"] == "reference-data-plane"
    assert props["securemetrics.negative_control"] == "foreign-root-trusted"


def test_a_yaml_report_of_run_units_with_enum_variants_can_be_written(tmp_path: Path) -> None:
    # a known gap's outcome names its variant by VariantId (a str enum): the YAML writer
    # refused it and the run ended in a traceback after its verdict
    from securemetrics_e2e.catalog import VariantId

    outcome = CheckOutcome(
        "gateway-api", "PERMISSIVE", "mtls-scrape", Status.PASS, variant=VariantId.AS_DOCUMENTED
    )
    write_report(tmp_path / "r.yaml", RunResult(outcomes=[outcome]), ReportMeta(backend="local"))
    doc = load_report(tmp_path / "r.yaml")
    assert doc["profiles"][0]["passed"][0]["variant"] == "as-documented"
