"""The check registry drives the items, and ``--check`` / ``--skip-check`` select from it.

A mistyped check is a usage error (one line, exit 2) on both paths (the CLI and plain
pytest), never a collection traceback; a check left out is reported as skipped, with the
reason, never silently dropped.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from securemetrics_e2e.backends import BACKENDS, session_backend
from securemetrics_e2e.catalog import SCENARIOS, Feature, chosen_scenarios, scenario_names
from securemetrics_e2e.checks import CHECKS, CheckSelection, check
from securemetrics_e2e.cli import main
from securemetrics_e2e.cluster.pytestglue import _chosen_scenarios
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.report import load_report
from securemetrics_e2e.results import Status, overall
from tests.localmesh import requires_local_mesh
from tests.pytestcmd import pytest_command

ROOT = Path(__file__).resolve().parent.parent


def test_a_check_is_named_by_id_or_code_and_a_left_out_one_says_why() -> None:
    chosen = CheckSelection(["SMC002,listeners-tls-only"], ["smc004"])
    assert chosen.only == ("mtls-scrape", "listeners-tls-only")
    assert chosen.skip == ("plaintext-refused",)
    assert chosen.reason(check("mtls-scrape")) is None
    assert chosen.reason(check("plaintext-refused")) == "left out by --skip-check plaintext-refused"
    assert chosen.reason(check("foreign-ca-refused")) == (
        "not selected by --check mtls-scrape,listeners-tls-only"
    )
    assert CheckSelection().reason(check("foreign-ca-refused")) is None
    with pytest.raises(UsageError, match=r"^--skip-check 'SMC099': no such check; known") as bad:
        CheckSelection((), ["SMC099"])
    # the fix is in the message: every check, id and code
    assert str(bad.value).endswith(
        "known checks: " + ", ".join(f"{c.id} ({c.code})" for c in CHECKS)
    )
    assert "listeners-tls-only (SMC001), mtls-scrape (SMC002), " in str(bad.value)
    # what the CLI hands the pytest plugin
    assert chosen.as_args() == [
        "--check=mtls-scrape",
        "--check=listeners-tls-only",
        "--skip-check=plaintext-refused",
    ]


def test_registry_ids_and_codes_are_unique() -> None:
    assert len({c.id for c in CHECKS}) == len({c.code for c in CHECKS}) == len(CHECKS)


def test_cli_mistyped_check_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--check", "mtls-scrap"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("securemetrics-e2e: error: --check 'mtls-scrap': no such check")
    assert err.count("\n") == 1


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pytest_command("scenarios", *args),
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_pytest_mistyped_check_is_one_line_and_exit_2() -> None:
    done = _pytest("--skip-check", "SMC404")
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("securemetrics-e2e: --skip-check 'SMC404': no such check")
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stdout + done.stderr


def test_items_are_generated_from_the_registry_with_readable_ids() -> None:
    done = _pytest("--collect-only", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    ids = {line for line in done.stdout.splitlines() if "::" in line}
    want = {
        f"scenarios/test_conformance.py::test_check[{u.id}-{c.id}]"
        for s in SCENARIOS
        for u in s.run_units()
        for c in CHECKS
        if c.applies_to(s)
    }
    assert ids == want
    assert (
        "scenarios/test_conformance.py::test_check[native-sidecar[STRICT/as-documented]-"
        "mtls-scrape]" in ids
    )


@requires_local_mesh
def test_checks_left_out_are_reported_as_skipped_with_the_reason(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "securemetrics_e2e", "run", "--scenario", "native-sidecar",
         "--check", "SMC002,SMC001", "--skip-check", "listeners-tls-only",
         "--report", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stdout + done.stderr
    doc = load_report(report)
    entries = {
        (e["id"], e["check"]): status
        for p in doc["profiles"]
        for status in ("passed", "failed", "skipped", "knownGaps", "fixed")
        for e in p[status]
    }
    reasons = {(e["id"], e["check"]): e["reason"] for p in doc["profiles"] for e in p["skipped"]}
    unit = "native-sidecar[PERMISSIVE/as-documented]"
    assert entries[(unit, "mtls-scrape")] == "passed"
    assert reasons[(unit, "listeners-tls-only")] == "left out by --skip-check listeners-tls-only"
    assert reasons[(unit, "plaintext-refused")] == (
        "not selected by --check mtls-scrape,listeners-tls-only"
    )
    # the report says what the backend could exercise and what it could not
    features = doc["backend"]["features"]
    every = [f.value for f in Feature]
    assert sorted(features["supported"] + features["unsupported"]) == sorted(every)
    assert "prometheus-operator" in features["unsupported"]  # cluster-only


def test_one_scenario_list_parser_and_one_group_status() -> None:
    assert scenario_names(["native-sidecar, hardened", "native-sidecar", ""]) == [
        "native-sidecar",
        "hardened",
    ]
    assert scenario_names(None) == []
    # the cluster's pytest glue reads --scenario through the same parser (it once split
    # on its own, and " hardened" was an unknown scenario there only)
    given = {"--scenario": ["native-sidecar, hardened", "native-sidecar"]}
    config = SimpleNamespace(getoption=given.get)
    assert [s.name for s in _chosen_scenarios(config)] == ["native-sidecar", "hardened"]
    assert chosen_scenarios(None) == list(SCENARIOS)
    assert overall([Status.PASS, Status.SKIP, Status.FIXED]) is Status.FIXED
    assert overall([Status.KNOWN_GAP, Status.FAIL]) is Status.FAIL
    assert overall([Status.SKIP, Status.PASS]) is Status.PASS
    assert overall([]) is Status.SKIP


def test_every_registered_backend_has_its_nox_session() -> None:
    noxfile = (ROOT / "noxfile.py").read_text(encoding="utf-8")
    for entry in BACKENDS.values():
        assert f"def {entry.nox_session}(session" in noxfile, entry.name
    # the sessions ask the registry which backend to run, never name one themselves
    assert not any(f'"{name}"' in noxfile for name in BACKENDS)
    assert session_backend("conformance", []) == "local"
    assert session_backend("e2e", ["-k", "smc001"]) == "kind"
    assert session_backend("e2e", ["--kubeconfig", "kc"]) == "existing"
    assert session_backend("e2e", ["--kubeconfig=kc"]) == "existing"
    with pytest.raises(UsageError, match="no backend runs in the nox session 'lint'"):
        session_backend("lint", [])
