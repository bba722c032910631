"""The `securemetrics-e2e` command: run (exit codes, progress, report, JUnit), plan, list.

Two real local runs, started side by side in subprocesses exactly as a user starts the
command: a clean mesh (exit 0) and one with a seeded fault (exit 1), once per session
(tests/cliruns.py; tests/test_provenance.py reads the clean one too). Usage and
environment errors (exit 2) are checked in-process: they must stop before anything runs.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from securemetrics_e2e import __version__
from securemetrics_e2e.catalog import scenario
from securemetrics_e2e.checks import CHECKS
from securemetrics_e2e.cli import main
from securemetrics_e2e.commands import applicability
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.progress import Phase, Progress, emit, timed, verdict_line
from securemetrics_e2e.report import load_report
from securemetrics_e2e.results import CheckOutcome, RunResult, Status
from tests.cliruns import SCENARIOS, Run, command, ours
from tests.localmesh import requires_local_mesh

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow

#: whether this machine captures sidecars' inbound traffic (pod namespaces and iptables)
CAPTURED = LocalBackend().capture_unavailable_reason() is None


@requires_local_mesh
def test_conformant_run_exits_0_with_progress_and_verdict(cli_runs: dict[str, Run]) -> None:
    run = cli_runs["good"]
    assert run.code == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"securemetrics-e2e {__version__}: backend local, Istio 1.31.1")
    phases = run.phases()
    assert any(phase == "deploy" and status == "PASS" for _, phase, status in phases)
    for variant in (
        "native-sidecar[PERMISSIVE/as-documented]",
        "hardened[PERMISSIVE/as-documented]",
    ):
        assert (variant, "probe", "PASS") in phases
        assert (variant, "verify", "PASS") in phases
    skipped = [line for line in lines if line.startswith("[") and " SKIP " in line]
    verdict = next(line for line in lines if line.startswith("securemetrics-e2e verdict:"))
    if CAPTURED:  # STRICT runs through Istio's inbound path: its known gap shows
        assert skipped == []
        counts = r"72 passed, 0 failed, 8 known gaps, 0 fixed, 0 skipped checks"
    else:
        assert len(skipped) == 6  # STRICT x {as-documented, exclude-capture, port-permissive} x 2
        assert all("cannot provide inbound-capture" in line for line in skipped)
        counts = r"20 passed, 0 failed, 0 known gaps, 0 fixed, 60 skipped checks"
    assert re.match(
        rf"securemetrics-e2e verdict: CONFORMANT \({counts}; "
        r"backend local, Istio 1\.31\.1, [\d.]+s\) "
        r"\[local: Istio's reference data plane, not a distribution\]$",
        verdict,
    )
    assert lines[-2:] == ["report: out/report.yaml", "junit: out/junit.xml"]
    assert run.stderr == ""


@requires_local_mesh
def test_conformant_run_report_and_junit(cli_runs: dict[str, Run]) -> None:
    run = cli_runs["good"]
    doc = load_report(run.cwd / "out" / "report.yaml")  # schema-validated
    assert doc["verdict"]["conformant"] is True
    # without inbound capture the STRICT variants skip on this backend
    assert doc["verdict"]["result"] == ("success" if CAPTURED else "partial")
    assert doc["distribution"]["project"] == "Example Mesh"
    assert doc["distribution"]["contact"] == ["mesh@example.com"]
    assert doc["backend"]["name"] == "local"
    assert doc["backend"]["details"]["network"] in ("netns", "loopback")
    assert doc["istio"]["version"] == "1.31.1"
    assert doc["selection"]["scenarios"] == ["native-sidecar", "hardened"]
    (core,) = [p for p in doc["profiles"] if p["name"] == "core"]
    named = {
        e["check"] for e in core["passed"] if e["id"] == "native-sidecar[PERMISSIVE/as-documented]"
    }
    applies = {c.id for c in CHECKS if c.applies_to(scenario("native-sidecar"))}
    assert applies
    assert not any(a.startswith("hardened") for a in applies)
    assert named == applies  # every passed check named, not just counted
    assert all(e["reason"] for e in core["skipped"])

    root = ET.parse(run.cwd / "out" / "junit.xml").getroot()  # noqa: S314 - written by the run
    assert int(root.get("tests", "0")) == sum(doc["verdict"]["statistics"].values())
    assert root.get("failures") == "0"
    classnames = {c.get("classname") for c in root.iter("testcase")}
    assert "hardened[PERMISSIVE/as-documented]" in classnames


@requires_local_mesh
def test_fault_makes_the_run_exit_1_naming_the_check(cli_runs: dict[str, Run]) -> None:
    run = cli_runs["bad"]
    assert run.code == 1, run.stdout + run.stderr
    assert ("native-sidecar[PERMISSIVE/as-documented]", "probe", "FAIL") in run.phases()
    verdict = next(line for line in run.stdout.splitlines() if "verdict:" in line)
    assert verdict.startswith("securemetrics-e2e verdict: NOT CONFORMANT (")
    assert verdict.endswith(
        "[negative control: fault foreign-root-trusted, a FAIL is the expected outcome]"
    )
    deploys = [p for p in run.phases() if p[1] == "deploy"]
    assert len(deploys) == 1, run.stdout  # one deploy, one line
    assert "SMC006 foreign-ca-refused: httpbin:" in run.stdout
    assert "a TLS handshake with a client certificate from a foreign CA" in run.stdout
    assert " — hint: the proxy trusts another CA" in run.stdout
    doc = load_report(run.cwd / "report.json")
    failed = [e for p in doc["profiles"] for e in p["failed"]]
    expected = {
        (f"{s}[{unit}]", "SMC006", "foreign-ca-refused")
        for s in ("native-sidecar", "hardened")
        # STRICT as documented terminates the foreign certificate in virtualInbound, then
        # the TLS-only listener closes the plaintext: refused either way
        for unit in ("PERMISSIVE/as-documented", "STRICT/exclude-capture", "STRICT/port-permissive")
        if CAPTURED or unit.startswith("PERMISSIVE")
    }
    assert {(e["id"], e["code"], e["check"]) for e in failed} == expected
    assert doc["backend"]["details"]["fault"] == "foreign-root-trusted"
    assert doc["provenance"]["negativeControl"] == {"fault": "foreign-root-trusted"}
    root = ET.parse(run.cwd / "junit.xml").getroot()  # noqa: S314 - written by the run
    failures = root.findall("testsuite/testcase/failure")
    assert {f.get("type") for f in failures} == {"SMC006"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--scenario", "nope"], "unknown scenario 'nope'; known scenarios: native-sidecar"),
        (["run", "--istio-version", "1.20"], "Istio version '1.20' names minor 1.20"),
        (["run", "--report", "r.txt"], "must end in .json, .yaml or .yml"),
        (["run", "--junit", "j.json"], "--junit 'j.json' must end in .xml"),
        (["run", "--profile", "core", "--scenario", "gateway-api"], "not in profile 'core'"),
        (["run", "--hub", "registry.example/istio"], "--hub: only for a cluster backend"),
        (["run", "--local-fault", "nope"], "unknown --local-fault 'nope'; known: plaintext"),
        (["run", "--backend", "kind", "--local-network", "netns"], "--backend local only"),
        (["run", "--backend", "cloud"], "invalid choice: 'cloud'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2_before_anything_runs(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("securemetrics-e2e: error: ")
    assert message in err
    assert "Traceback" not in err


def test_missing_prometheus_is_an_environment_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    assert main(["run", "--scenario", "native-sidecar"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "no `prometheus` on PATH" in err
    assert "apt-get install prometheus" in err


def test_plan_local_touches_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    before = ours(os.getpid())
    args = ["plan", "--scenario", SCENARIOS, "--local-network", "loopback"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "backend local, Istio 1.31.1" in out
    assert "RUN  native-sidecar[PERMISSIVE/as-documented] (core)" in out
    assert (
        "SKIP native-sidecar[STRICT/as-documented]: backend local cannot provide inbound-capture"
        in out
    )
    # on 127.0.0.0/8 there is no "outside the pod": the hardened variant cannot run
    assert (
        "SKIP hardened[PERMISSIVE/as-documented]: backend local cannot provide pod-isolation" in out
    )
    assert re.search(r"^\s+foreign-ca-refused\s+SMC006$", out, re.MULTILINE)
    assert ours(os.getpid()) == before


def test_plan_cluster_uses_the_cluster_planner(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--backend", "kind", "--scenario", "legacy-sidecar", "--istio-version", "1.30"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Istio 1.30.5" in out
    assert "istioctl install" in out


def test_list_says_where_each_variant_applies_and_why_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = applicability(["local", "kind"], ["1.30.5", "1.31.1"], "all")
    by = {(r["id"], r["backend"], r["istioVersion"]): r for r in rows}
    assert by[("native-sidecar[PERMISSIVE/as-documented]", "local", "1.31.1")]["applies"] is True
    native_130 = by[("native-sidecar[PERMISSIVE/as-documented]", "kind", "1.30.5")]
    assert native_130["applies"] is False
    assert native_130["reason"] == (
        "Istio 1.30.5 lacks native-secure-ports (needs Istio >= 1.31.0)"
    )
    strict_local = by[("legacy-sidecar[STRICT/as-documented]", "local", "1.30.5")]
    assert strict_local["applies"] is CAPTURED
    if not CAPTURED:
        assert strict_local["reason"] == (
            "backend local cannot provide inbound-capture (not available on this backend)"
        )
    assert by[("legacy-sidecar[STRICT/as-documented]", "kind", "1.30.5")]["applies"] is True
    assert by[("servicemonitor[PERMISSIVE/as-documented]", "kind", "1.31.1")]["applies"] is True
    assert len(rows) == 23 * 2 * 2  # 23 run units x 2 backends x 2 versions
    gap_row = by[("gateway-api[PERMISSIVE/as-documented]", "local", "1.31.1")]
    assert gap_row["applies"] is True  # the local backend models Istio's deployment controller
    assert gap_row["knownGaps"] == ["gateway-api-infrastructure-annotations"]
    assert by[("gateway-api[PERMISSIVE/proxyconfig]", "local", "1.31.1")]["knownGaps"] == []
    assert by[("upgrade[PERMISSIVE/port-strict]", "local", "1.31.1")]["applies"] is True
    assert by[("upgrade[PERMISSIVE/port-strict]", "kind", "1.30.5")]["applies"] is True
    oldest = applicability(["local"], ["1.28"], "all")
    upgrade_128 = next(r for r in oldest if r["scenario"] == "upgrade")
    assert "no supported Istio minor precedes 1.28" in upgrade_128["reason"]
    # on a cluster the agents renew short-lived certificates (cluster/rotation.py)
    assert by[("rotation[PERMISSIVE/as-documented]", "kind", "1.31.1")]["applies"] is True
    assert (
        "lacks native-secure-ports"
        in by[("rotation[PERMISSIVE/as-documented]", "kind", "1.30.5")]["reason"]
    )

    assert main(["list", "--backend", "local", "--istio-version", "1.31", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {r["istioVersion"] for r in listed} == {"1.31.1"}
    assert {r["backend"] for r in listed} == {"local"}

    assert main(["list", "--profile", "extended"]) == 0
    text = capsys.readouterr().out
    header, *body = text.split("\n\n")[0].splitlines()
    assert header.split() == ["SCENARIO[MODE/VARIANT]", "PROFILE", "BACKEND", "1.28.10",
                              "1.29.8", "1.30.5", "1.31.1"]  # fmt: skip
    assert all(line.split()[1] == "extended" for line in body)
    assert "backend local cannot provide istio-control-plane, prometheus-operator" in text
    # each scenario's variants, and the known gaps with their evidence
    assert "  gateway-api proxyconfig (PERMISSIVE): a ProxyConfig selecting" in text
    assert "  servicemonitor-http-app-port-permissive (Istio >= 1.28.0; fix: tcp-app-port" in text
    assert "    evidence: pilot/pkg/networking/core/filterchain_options.go" in text


def test_version_flag_and_module_entry_point() -> None:
    done = subprocess.run(command("--version"), capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert done.stdout.strip() == f"securemetrics-e2e {__version__}"


def test_progress_api() -> None:
    out = io.StringIO()
    progress = Progress(out, start=0.0)
    emit(
        "native-sidecar[STRICT/as-documented]", Phase.DEPLOY, 1.0
    )  # nobody listening: nothing, no error
    with progress.activated():
        emit("native-sidecar[STRICT/as-documented]", Phase.WAIT, 2.5, Status.PASS, "3 pods ready")
        with (
            pytest.raises(RuntimeError, match="boom"),
            timed("hardened[STRICT/as-documented]", Phase.DEPLOY),
        ):
            raise RuntimeError("boom\nsecond line")
    emit("native-sidecar[STRICT/as-documented]", Phase.DEPLOY, 1.0)  # deactivated again
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert re.match(
        r"^\[\s*[\d.]+s\] native-sidecar\[STRICT/as-documented\]\s+wait\s+PASS\s+2\.50s  3 pods",
        lines[0],
    )
    assert re.match(
        r"^\[\s*[\d.]+s\] hardened\[STRICT/as-documented\]\s+deploy\s+FAIL\s+[\d.]+s  boom$",
        lines[1],
    )
    assert progress.setup_seconds >= 2.5


def test_verdict_line_says_when_nothing_was_checked() -> None:
    skipped = RunResult(outcomes=[CheckOutcome("a", "PERMISSIVE", "mtls-scrape", Status.SKIP)])
    line = verdict_line(skipped, backend="local", istio_version="1.31.1", elapsed_s=1.0)
    assert line.startswith("securemetrics-e2e verdict: NOT CONFORMANT (nothing was checked; ")
    skipped.errors.append("environment: x")
    assert "verdict: ERROR" in verdict_line(
        skipped, backend="local", istio_version="1", elapsed_s=0
    )


def test_plan_upgrade_from_prints_the_upgrade_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--backend", "kind", "--istio-version", "1.31.1", "--upgrade-from", "1.30"]
    assert main([*argv, "--canary"]) == 0
    out = capsys.readouterr().out
    assert "istioctl-1.30.5-linux-amd64.tar.gz.sha256" in out
    assert "istioctl-1.31.1-linux-amd64.tar.gz.sha256" in out
    assert out.index("install Istio 1.30.5") < out.index("canary: install Istio 1.31.1")
    assert "revision 1-31-1" in out
    assert "switch httpbin to them" in out  # 1.31 has the native ports
    # the same plan as `pytest --plan --upgrade-from`: the other scenarios say why they skip
    skipped = out.split("\nSKIPPED\n")[1]
    assert (
        "native-sidecar[PERMISSIVE/as-documented]: an upgrade run (--upgrade-from 1.30.5)"
        in skipped
    )


def test_plan_upgrade_across_two_minors_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--backend", "kind", "--istio-version", "1.31.1", "--upgrade-from", "1.29"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "one minor at a time: 1.29.8 -> 1.30 -> 1.31" in err


def test_local_plan_names_the_upgrade_versions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--istio-version", "1.30", "--upgrade-from", "1.29.0"]) == 0
    out = capsys.readouterr().out
    assert "RUN  upgrade[PERMISSIVE/port-strict]" in out
    assert "from Istio 1.29.0's configuration to 1.30.5's" in out
    assert main(["plan", "--istio-version", "1.28"]) == 0
    assert (
        "SKIP upgrade[PERMISSIVE/port-strict]: no upgrade to Istio 1.28.10"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--canary", "--upgrade-from", "1.30"], "--canary: only for a cluster backend"),
        (["--backend", "kind", "--canary"], "--canary chooses how --upgrade-from upgrades"),
        (["--upgrade-from", "1.29"], "one minor at a time"),
    ],
)
def test_upgrade_flags_are_checked_before_anything_runs(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--istio-version", "1.31", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before the run's header, preflight or any pytest session
    assert message in err
