"""The known-gap table and the one mapping through it: KNOWN-GAP, FIXED, or a plain FAIL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from securemetrics_e2e.catalog import SCENARIOS, MtlsMode, RunUnit, scenario
from securemetrics_e2e.checks import CHECKS, check
from securemetrics_e2e.junit import build_junit
from securemetrics_e2e.knowngaps import (
    KNOWN_GAPS,
    Judgement,
    KnownGap,
    fix_of,
    gaps_for,
    judge,
)
from securemetrics_e2e.matrix import build_matrix, load_reports, render_html, render_markdown
from securemetrics_e2e.progress import scenario_lines, verdict_line
from securemetrics_e2e.report import build_report, write_report
from securemetrics_e2e.results import CheckOutcome, RunResult, Status
from securemetrics_e2e.runner import judged as checked

GW = {"scenario": "gateway-api", "mode": "PERMISSIVE", "variant": "as-documented"}
V131 = "1.31.1"


def _judge(check_id: str, status: Status, observed: tuple[str, ...] = (), **unit: str) -> Judgement:
    where = {**GW, **unit}
    return judge(
        **where, check=check_id, version=V131, status=status, message="seen", observed=observed
    )


def test_a_failure_the_gap_predicts_is_a_known_gap_naming_gap_and_fix() -> None:
    j = _judge("mtls-scrape", Status.FAIL, ("scrape:refused",))
    assert j.status is Status.KNOWN_GAP
    assert j.gap == "gateway-api-infrastructure-annotations"
    assert "fix: variant proxyconfig" in j.message


def test_a_pass_where_a_gap_is_predicted_is_fixed() -> None:
    j = _judge("mtls-scrape", Status.PASS)
    assert j.status is Status.FIXED
    assert "closes upstream gap gateway-api-infrastructure-annotations" in j.message


def test_a_failure_of_a_check_the_gap_does_not_predict_is_a_fail() -> None:
    j = _judge("foreign-ca-refused", Status.FAIL, ("handshake:ok",))
    assert j.status is Status.FAIL
    assert j.gap == ""


@pytest.mark.parametrize(
    "observed",
    [
        ("scrape:peer-identity",),  # another outcome
        ("scrape:refused", "scrape:no-families"),  # the predicted one and another
        (),  # nothing machine-readable: cannot be taken for the gap
    ],
)
def test_a_failure_with_another_outcome_is_a_fail(observed: tuple[str, ...]) -> None:
    j = _judge("mtls-scrape", Status.FAIL, observed)
    assert j.status is Status.FAIL
    assert "not known gap gateway-api-infrastructure-annotations" in j.message


def test_the_fix_variant_failing_is_a_fail() -> None:
    j = _judge("mtls-scrape", Status.FAIL, ("scrape:refused",), variant="proxyconfig")
    assert j.status is Status.FAIL
    assert fix_of("gateway-api", "PERMISSIVE", "proxyconfig") == (
        "gateway-api-infrastructure-annotations",
    )


def test_gaps_apply_to_the_versions_they_name() -> None:
    strict = ("native-sidecar", "STRICT", "as-documented")
    assert [g.id for g in gaps_for(*strict, V131)] == ["strict-captures-secure-ports"]
    assert gaps_for(*strict, "1.30.5") == []  # no native ports, nothing to capture
    legacy = ("legacy-sidecar", "PERMISSIVE", "as-documented")
    assert [g.id for g in gaps_for(*legacy, "1.28.10")] == ["legacy-sidecar-permissive-plaintext"]
    assert gaps_for("legacy-sidecar", "STRICT", "as-documented", "1.30.5") == []
    assert gaps_for("legacy-sidecar", "PERMISSIVE", "port-strict", "1.30.5") == []


def test_servicemonitor_gaps_are_told_apart_by_port() -> None:
    app = ("down:8080",)
    merged = ("down:15092",)
    sm = {"scenario": "servicemonitor", "variant": "as-documented"}
    permissive = _judge("servicemonitor-targets-up", Status.FAIL, app, mode="PERMISSIVE", **sm)
    assert permissive.gap == "servicemonitor-http-app-port-permissive"
    wrong_port = _judge("servicemonitor-targets-up", Status.FAIL, merged, mode="PERMISSIVE", **sm)
    assert wrong_port.status is Status.FAIL
    strict = _judge("servicemonitor-targets-up", Status.FAIL, merged, mode="STRICT", **sm)
    assert strict.gap == "strict-captures-secure-ports"


@pytest.mark.parametrize("gap", KNOWN_GAPS, ids=lambda g: g.id)
def test_every_gap_names_real_units_checks_and_fixes(gap: KnownGap) -> None:
    units = {u.key for s in SCENARIOS for u in s.run_units()}
    checks = {c.id for c in CHECKS}
    for name, mode, variant in gap.units:
        assert (name, mode, variant) in units
    for p in gap.predictions:
        assert p.check in checks
        assert p.outcomes
        assert all(re.fullmatch(r"[a-z-]+:[a-z0-9-]+", o) for o in p.outcomes)
    assert any(
        check(p.check).applies_to(scenario(n)) for n, _, _ in gap.units for p in gap.predictions
    )
    # every fix is a variant of a scenario the gap affects, run in a mode the gap affects
    fixes = [
        u
        for n, m, _ in gap.units
        for u in scenario(n).run_units()
        if u.mtls_mode is m and u.variant.id in gap.fixes
    ]
    assert fixes
    assert gap.evidence
    assert all(gap.evidence)


def _outcome(
    unit: RunUnit, check_id: str, status: Status, observed: tuple[str, ...] = ()
) -> CheckOutcome:
    return checked(
        unit, check(check_id), V131, status, "seen" if status is Status.FAIL else "", observed
    )


def test_verdict_counts_known_gaps_and_fixed_and_needs_fixes_to_pass() -> None:
    gw = scenario("gateway-api")
    documented, fix = gw.run_units()
    result = RunResult(
        outcomes=[
            _outcome(documented, "mtls-scrape", Status.FAIL, ("scrape:refused",)),
            _outcome(documented, "plaintext-refused", Status.PASS),
            _outcome(fix, "mtls-scrape", Status.PASS),
        ]
    )
    assert [o.status for o in result.outcomes] == [Status.KNOWN_GAP, Status.PASS, Status.PASS]
    assert result.conformant
    line = verdict_line(result, backend="local", istio_version=V131, elapsed_s=1.0)
    assert "CONFORMANT (2 passed, 0 failed, 1 known gaps, 0 fixed, 0 skipped checks" in line
    lines = [text for _, text in scenario_lines(result)]
    assert lines[0].startswith("KNOWN-GAP  gateway-api[PERMISSIVE/as-documented]")
    assert "gateway-api-infrastructure-annotations" in lines[0]

    broken_fix = RunResult(
        outcomes=[
            *result.outcomes[:2],
            _outcome(fix, "mtls-scrape", Status.FAIL, ("scrape:refused",)),
        ]
    )
    assert broken_fix.outcomes[-1].status is Status.FAIL
    assert not broken_fix.conformant

    fixed = RunResult(outcomes=[_outcome(documented, "mtls-scrape", Status.PASS)])
    assert fixed.outcomes[0].status is Status.FIXED
    assert fixed.conformant
    assert "0 passed, 0 failed, 0 known gaps, 1 fixed" in verdict_line(
        fixed, backend="local", istio_version=V131, elapsed_s=1.0
    )


def test_a_strict_unit_of_a_version_without_the_gap_keeps_its_fail() -> None:
    unit = RunUnit(scenario("native-sidecar"), MtlsMode.STRICT)
    outcome = checked(
        unit, check("mtls-scrape"), "1.30.5", Status.FAIL, "closed", ("scrape:closed",)
    )
    assert outcome.status is Status.FAIL
    assert outcome.code == "SMC002"


def test_report_junit_and_matrix_show_known_gaps_and_fixed(tmp_path: Path) -> None:
    documented, fix = scenario("gateway-api").run_units()
    strict = RunUnit(scenario("native-sidecar"), MtlsMode.STRICT)
    result = RunResult(
        outcomes=[
            _outcome(documented, "mtls-scrape", Status.FAIL, ("scrape:refused",)),
            _outcome(fix, "mtls-scrape", Status.PASS),
            _outcome(strict, "mtls-scrape", Status.PASS),  # this distribution closes the gap
        ],
        environment={"backend": "kind", "istio_version": V131},
    )
    doc = build_report(result)
    assert doc["verdict"]["statistics"] == {
        "passed": 1,
        "failed": 0,
        "knownGaps": 1,
        "fixed": 1,
        "skipped": 0,
    }
    gaps = {g["id"]: g for g in doc["knownGaps"]}
    assert gaps["gateway-api-infrastructure-annotations"]["status"] == "KNOWN-GAP"
    assert gaps["gateway-api-infrastructure-annotations"]["fix"] == ["proxyconfig"]
    assert gaps["strict-captures-secure-ports"]["status"] == "FIXED"
    assert gaps["strict-captures-secure-ports"]["units"] == ["native-sidecar[STRICT/as-documented]"]
    rows = {r["id"]: r for p in doc["profiles"] for r in p["scenarios"]}
    assert rows["gateway-api[PERMISSIVE/as-documented]"]["status"] == "KNOWN-GAP"
    assert rows["native-sidecar[STRICT/as-documented]"]["gaps"] == ["strict-captures-secure-ports"]

    root = build_junit(result)
    skipped = root.find("testsuite[@name='gateway-api[PERMISSIVE/as-documented]']/testcase/skipped")
    assert skipped is not None
    assert skipped.get("message", "").startswith("KNOWN-GAP gateway-api-infrastructure-annotations")
    assert root.get("failures") == "0"

    path = tmp_path / "report.json"
    write_report(path, result)
    matrix = build_matrix(load_reports([path]))
    text = render_markdown(matrix)
    assert "| gateway-api[PERMISSIVE/as-documented] | extended | GAP |" in text
    assert "| native-sidecar[STRICT/as-documented] | core | FIXED+ |" in text
    assert (
        "- native-sidecar[STRICT/as-documented] in run 1: FIXED strict-captures-secure-ports"
        in text
    )
    assert '<td class="KNOWN-GAP" title="gateway-api-infrastructure-annotations">GAP</td>' in (
        render_html(matrix)
    )
