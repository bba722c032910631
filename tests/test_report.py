"""The conformance report and JUnit XML: content, schema, formats.

Reports here are built from RunResults with the suite's real check ids and codes; the
reports of real local runs are validated in tests/test_cli.py.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from securemetrics_e2e.checks import CHECKS, check
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.junit import build_junit, write_junit
from securemetrics_e2e.report import (
    SCHEMA_PATH,
    Distribution,
    ReportInvalid,
    ReportMeta,
    build_report,
    load_report,
    schema_problems,
    validate_report,
    write_report,
)
from securemetrics_e2e.results import CheckOutcome, RunResult, Status

META = ReportMeta(
    distribution=Distribution("Example Corp.", "Example Mesh", "https://mesh.example", "2.4.1",
                              ("mesh@example.com",)),
    istio_version="1.31.1",
    istio_hub="registry.example/istio",
    istio_tag="1.31.1-example.2",
    kubernetes_version="v1.34.2",
    backend="kind",
    backend_details={"cluster": "sm-e2e-1-31"},
    profiles=("core", "extended"),
    date=datetime(2026, 9, 30, 12, 0, 5, tzinfo=UTC),
)  # fmt: skip


def outcome(
    scenario: str, variant: str, check_id: str, status: Status, message: str = "", **kw: object
) -> CheckOutcome:
    profile = "extended" if scenario in ("gateway-api", "servicemonitor") else "core"
    code = check(check_id).code if status is Status.FAIL else ""
    return CheckOutcome(
        scenario,
        variant,
        check_id,
        status,
        message,
        code,
        profile,
        0.25,
        **kw,  # type: ignore[arg-type]
    )


def mixed_result() -> RunResult:
    return RunResult(
        outcomes=[
            outcome("native-sidecar", "PERMISSIVE", "listeners-tls-only", Status.PASS),
            outcome("native-sidecar", "PERMISSIVE", "mtls-scrape", Status.PASS),
            outcome(
                "native-sidecar",
                "STRICT",
                "targets-up-merged",
                Status.FAIL,
                "httpbin: job istio-secure-merged-metrics: DOWN (connection reset)",
                diagnostics="artifacts/native-sidecar-strict/",
                nodeid="scenarios/test_secure_metrics.py::test_x[native-sidecar[STRICT/as-documented]]",
            ),
            outcome("native-sidecar", "STRICT", "mtls-scrape", Status.PASS),
            outcome(
                "hardened",
                "PERMISSIVE",
                "hardened-agent-forbidden",
                Status.SKIP,
                "backend local lacks pod-isolation",
            ),
            outcome("hardened", "PERMISSIVE", "mtls-scrape", Status.PASS),
            outcome(
                "gateway-api",
                "PERMISSIVE",
                "mtls-scrape",
                Status.SKIP,
                "Istio 1.30.5 lacks native-secure-ports (needs Istio >= 1.31.0)",
            ),
        ]
    )


def test_report_names_every_check_with_its_fate() -> None:
    doc = build_report(mixed_result(), META)
    validate_report(doc)
    core, extended = doc["profiles"]
    assert core["name"] == "core"
    assert extended["name"] == "extended"
    passed = {(e["id"], e["check"]) for e in core["passed"]}
    assert passed == {
        ("native-sidecar[PERMISSIVE/as-documented]", "listeners-tls-only"),
        ("native-sidecar[PERMISSIVE/as-documented]", "mtls-scrape"),
        ("native-sidecar[STRICT/as-documented]", "mtls-scrape"),
        ("hardened[PERMISSIVE/as-documented]", "mtls-scrape"),
    }
    assert all(e["title"] == check(e["check"]).title for e in core["passed"])
    (failed,) = core["failed"]
    assert failed["code"] == "SMC009"
    assert failed["message"].startswith("httpbin: job istio-secure-merged-metrics")
    assert failed["diagnostics"] == "artifacts/native-sidecar-strict/"
    assert failed["nodeid"].endswith("[native-sidecar[STRICT/as-documented]]")
    (skipped,) = core["skipped"]
    assert skipped["reason"] == "backend local lacks pod-isolation"
    assert extended["skipped"][0]["reason"].startswith("Istio 1.30.5 lacks")


def test_profile_and_run_results() -> None:
    doc = build_report(mixed_result(), META)
    core, extended = doc["profiles"]
    assert core["result"] == "failure"
    assert core["statistics"] == {
        "passed": 4,
        "failed": 1,
        "knownGaps": 0,
        "fixed": 0,
        "skipped": 1,
    }
    assert extended["result"] == "skipped"  # nothing ran there: it proves nothing
    assert doc["verdict"]["conformant"] is False
    assert doc["verdict"]["result"] == "failure"
    rows = {r["id"]: r for r in core["scenarios"]}
    assert rows["native-sidecar[STRICT/as-documented]"]["status"] == "FAIL"
    assert rows["native-sidecar[STRICT/as-documented]"]["codes"] == ["SMC009"]
    assert rows["native-sidecar[PERMISSIVE/as-documented]"]["status"] == "PASS"

    passing = RunResult(
        outcomes=[o for o in mixed_result().outcomes if o.status is not Status.FAIL]
    )
    doc = build_report(passing, META)
    assert doc["profiles"][0]["result"] == "partial"  # passed, with a skip
    assert doc["verdict"] == {
        "conformant": True,
        "result": "partial",
        "statistics": {"passed": 4, "failed": 0, "knownGaps": 0, "fixed": 0, "skipped": 2},
        "errors": [],
        "durationSeconds": None,
    }
    only_passed = RunResult(outcomes=[o for o in passing.outcomes if o.status is Status.PASS])
    assert build_report(only_passed, META)["profiles"][0]["result"] == "success"


def test_metadata_is_recorded() -> None:
    doc = build_report(mixed_result(), META)
    assert doc["distribution"] == {
        "organization": "Example Corp.",
        "project": "Example Mesh",
        "url": "https://mesh.example",
        "version": "2.4.1",
        "contact": ["mesh@example.com"],
    }
    assert doc["istio"] == {
        "version": "1.31.1",
        "hub": "registry.example/istio",
        "tag": "1.31.1-example.2",
    }
    assert doc["kubernetes"] == {"version": "v1.34.2"}
    assert doc["backend"] == {"name": "kind", "details": {"cluster": "sm-e2e-1-31"}}
    assert doc["date"] == "2026-09-30T12:00:05Z"
    assert doc["suite"]["name"] == "securemetrics-e2e"
    assert doc["suite"]["version"]


def test_metadata_falls_back_to_the_run_environment() -> None:
    result = mixed_result()
    result.environment.update(
        {"backend": "local", "istio_version": "1.31.1", "network": "netns", "fault": ""}
    )
    doc = build_report(result)
    assert doc["backend"] == {"name": "local", "details": {"network": "netns"}}
    assert doc["istio"] == {"version": "1.31.1", "hub": None, "tag": None}
    assert doc["kubernetes"] == {"version": None}
    assert [p["name"] for p in doc["profiles"]] == ["core", "extended"]


def test_run_errors_make_the_run_fail() -> None:
    result = RunResult(outcomes=[outcome("hardened", "PERMISSIVE", "mtls-scrape", Status.PASS)])
    assert result.conformant
    result.errors.append("environment: no `prometheus` on PATH")
    doc = build_report(result, META)
    assert doc["verdict"]["conformant"] is False
    assert doc["verdict"]["result"] == "failure"
    assert doc["verdict"]["errors"] == ["environment: no `prometheus` on PATH"]


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_write_and_load_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "out" / f"report{suffix}"
    written = write_report(path, mixed_result(), META)
    text = path.read_text()
    parsed = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert parsed == written
    assert load_report(path) == written
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_bad_report_paths_and_documents(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"must end in \.json, \.yaml or \.yml"):
        write_report(tmp_path / "report.txt", mixed_result(), META)
    assert not (tmp_path / "report.txt").exists()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ReportInvalid, match=r"broken\.json is not valid JSON"):
        load_report(broken)
    doc = build_report(mixed_result(), META)
    del doc["profiles"][0]["failed"][0]["code"]
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    with pytest.raises(ReportInvalid, match=r"at /profiles/0/failed/0: 'code' is a required"):
        load_report(tampered)


def test_schema_is_strict() -> None:
    """The schema rejects what a sloppy report would contain; otherwise validation proves little."""
    good = build_report(mixed_result(), META)
    assert schema_problems(good) == []

    def broken(edit: str) -> dict[str, object]:
        doc = json.loads(json.dumps(good))
        exec(edit, {"doc": doc})  # noqa: S102 - test-only edits of a plain dict
        return doc

    for edit, pointer in [
        ("doc['profiles'][0]['passed'][0]['check'] = 'Not An Id'", "/profiles/0/passed/0/check"),
        ("doc['profiles'][0]['failed'][0]['code'] = 'E1'", "/profiles/0/failed/0/code"),
        ("doc['profiles'][0]['skipped'][0]['reason'] = ''", "/profiles/0/skipped/0/reason"),
        ("doc['profiles'][0]['passed'][0]['reason'] = 'x'", "/profiles/0/passed/0"),
        ("doc['profiles'][0]['result'] = 'ok'", "/profiles/0/result"),
        ("doc['verdict']['statistics']['passed'] = -1", "/verdict/statistics/passed"),
        ("doc['date'] = '30/09/2026'", "/date"),
        ("doc['extra'] = 1", "/"),
        ("del doc['distribution']['contact']", "/distribution"),
    ]:
        problems = schema_problems(broken(edit))
        assert any(p.startswith(f"at {pointer}:") for p in problems), (edit, problems)


def test_schema_ships_inside_the_package() -> None:
    import securemetrics_e2e

    assert SCHEMA_PATH.parent.parent == Path(securemetrics_e2e.__file__).parent
    assert json.loads(SCHEMA_PATH.read_text())["$schema"].endswith("2020-12/schema")


def test_junit_from_the_same_result(tmp_path: Path) -> None:
    result = mixed_result()
    path = tmp_path / "junit.xml"
    write_junit(path, result, META)
    root = ET.parse(path).getroot()  # noqa: S314 - the file this test just wrote
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("skipped")) == ("7", "1", "2")
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == [
        "native-sidecar[PERMISSIVE/as-documented]",
        "native-sidecar[STRICT/as-documented]",
        "hardened[PERMISSIVE/as-documented]",
        "gateway-api[PERMISSIVE/as-documented]",
    ]
    strict = suites["native-sidecar[STRICT/as-documented]"]
    cases = {c.get("name"): c for c in strict.findall("testcase")}
    assert {c.get("classname") for c in cases.values()} == {"native-sidecar[STRICT/as-documented]"}
    failure = cases["targets-up-merged"].find("failure")
    assert failure is not None
    assert failure.get("type") == "SMC009"
    assert failure.get("message", "").startswith("SMC009 httpbin: job")
    assert "diagnostics: artifacts/native-sidecar-strict/" in (failure.text or "")
    assert cases["mtls-scrape"].find("failure") is None
    skip = suites["hardened[PERMISSIVE/as-documented]"].find(
        "testcase[@name='hardened-agent-forbidden']/skipped"
    )
    assert skip is not None
    assert skip.get("message") == "backend local lacks pod-isolation"
    props = {p.get("name"): p.get("value") for p in strict.iter("property")}
    assert props["istio.tag"] == "1.31.1-example.2"
    assert props["kubernetes.version"] == "v1.34.2"
    assert props["securemetrics.profile"] == "core"


def test_junit_reports_a_run_error() -> None:
    result = RunResult(errors=["environment: no `prometheus` on PATH"])
    root = build_junit(result, META)
    error = root.find("testsuite/testcase/error")
    assert root.get("errors") == "1"
    assert error is not None
    assert "prometheus" in error.get("message", "")


def gap_outcome(
    scenario: str, mode: str, check_id: str, status: Status, message: str
) -> CheckOutcome:
    """An outcome as the known-gap mapping makes it: KNOWN-GAP and FIXED name their gap."""
    if status in (Status.KNOWN_GAP, Status.FIXED):
        return outcome(
            scenario, mode, check_id, status, message or "gap", gap="strict-captures-secure-ports"
        )
    return outcome(scenario, mode, check_id, status, message)


outcomes = st.lists(
    st.builds(
        gap_outcome,
        st.sampled_from(["native-sidecar", "hardened", "gateway-api", "legacy-gateway"]),
        st.sampled_from(["PERMISSIVE", "STRICT"]),
        st.sampled_from([c.id for c in CHECKS]),
        st.sampled_from(list(Status)),
        st.text(min_size=0, max_size=40),
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(outcomes)
def test_any_run_gives_a_valid_consistent_report(items: list[CheckOutcome]) -> None:
    result = RunResult(outcomes=items)
    doc = build_report(result)
    validate_report(doc)
    stats = doc["verdict"]["statistics"]
    assert sum(stats.values()) == len(items)
    kinds = ("passed", "failed", "skipped", "knownGaps", "fixed")
    named = sum(len(p[k]) for p in doc["profiles"] for k in kinds)
    assert named == len(items)
    assert doc["verdict"]["conformant"] == result.conformant
    root = build_junit(result)
    assert len(root.findall("testsuite/testcase")) == len(items)
    assert len(root.findall("testsuite/testcase/failure")) == stats["failed"]


def test_continuity_records_reach_the_report_and_the_verdict() -> None:
    from securemetrics_e2e.continuity import Continuity
    from securemetrics_e2e.progress import scenario_lines, verdict_line
    from securemetrics_e2e.results import JobContinuity

    now = datetime(2026, 9, 30, 12, 0, 0, tzinfo=UTC)
    upgrade = Continuity(
        "ns/httpbin",
        now,
        now.replace(second=20),
        1.0,
        (
            JobContinuity("istio-secure-merged-metrics", 20, 17, 1.0, covered=1.0, pods=2),
            JobContinuity("istio-secure-envoy-metrics", 9, 9, 3.5, covered=0.8, pods=1),
        ),
    )
    rotation = Continuity(
        "httpbin", now, now.replace(second=20), 1.0, (JobContinuity("merged", 20, 19, 1.0),)
    )
    result = RunResult(
        outcomes=[outcome("upgrade", "PERMISSIVE", "upgrade-continuity", Status.PASS)],
        continuity=[
            *upgrade.records("upgrade", "PERMISSIVE"),
            *rotation.records("rotation", "PERMISSIVE"),
        ],
    )
    doc = build_report(result, META)  # validated against the shipped schema
    merged, envoy, pod = doc["continuity"]
    assert (merged["scope"], merged["pods"], merged["passed"]) == ("namespace", 2, True)
    assert merged["fraction"] == 1.0  # coverage, not 17/20: the replaced pod's failures
    assert (envoy["passed"], envoy["fraction"]) == (False, 0.8)
    assert (pod["scope"], pod["passed"], pod["fraction"]) == ("pod", False, 0.95)
    lines = {text: status for status, text in scenario_lines(result) if "continuity" in text}
    assert lines == {
        "continuity upgrade[PERMISSIVE/as-documented] istio-secure-merged-metrics: 100.0% of "
        "the window covered (17/20 scrapes of 2 pod(s) succeeded), longest gap 1.0s": Status.PASS,
        "continuity upgrade[PERMISSIVE/as-documented] istio-secure-envoy-metrics: 80.0% of "
        "the window covered (9/9 scrapes of 1 pod(s) succeeded), longest gap 3.5s": Status.FAIL,
        "continuity rotation[PERMISSIVE/as-documented] merged: 95.0% up (19/20 scrapes), "
        "longest gap 1.0s": Status.FAIL,
    }
    verdict = verdict_line(result, backend="local", istio_version="1.31.1", elapsed_s=1.0)
    assert verdict.endswith(
        "continuity 80.0% (worst job), longest gap 3.5s) "
        "[local: Istio's reference data plane, not a distribution]"
    )
