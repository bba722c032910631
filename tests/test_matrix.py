"""`securemetrics-e2e matrix`: reports merged into one Markdown and HTML table."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from securemetrics_e2e.cli import main
from securemetrics_e2e.matrix import REFERENCE, anchor, build_matrix, load_reports
from securemetrics_e2e.report import Distribution, ReportMeta, write_report
from securemetrics_e2e.results import CheckOutcome, RunResult, Status

BASE = ReportMeta(
    distribution=Distribution("Example Corp.", "Example Mesh", version="2.4.1"),
    backend="kind",
    profiles=("core",),
    date=datetime(2026, 9, 30, 12, 0, tzinfo=UTC),
)


def _outcomes(strict: Status, legacy: Status = Status.PASS) -> list[CheckOutcome]:
    return [
        CheckOutcome("native-sidecar", "PERMISSIVE", "mtls-scrape", Status.PASS),
        CheckOutcome(
            "native-sidecar",
            "STRICT",
            "targets-up-merged",
            strict,
            {
                Status.FAIL: "httpbin: job istio-secure-merged-metrics: DOWN | reset",
                Status.SKIP: "Istio 1.30.5 lacks native-secure-ports",
                Status.PASS: "",
            }[strict],
            "SMC009" if strict is Status.FAIL else "",
            diagnostics="artifacts/strict/<pod>.yaml" if strict is Status.FAIL else "",
        ),
        CheckOutcome("legacy-sidecar", "PERMISSIVE", "mtls-scrape", legacy),
    ]


@pytest.fixture
def reports(tmp_path: Path) -> list[Path]:
    out = tmp_path / "reports"
    runs = [
        ("a-1.30.json", "1.30.5", "v1.33.1", Status.SKIP),
        ("b-1.31.yaml", "1.31.1", "v1.34.2", Status.FAIL),
        ("c-1.31-k135.yml", "1.31.1", "v1.35.0", Status.PASS),
    ]
    paths = []
    for name, istio, kube, strict in runs:
        meta = replace(BASE, istio_version=istio, kubernetes_version=kube)
        path = out / name
        write_report(path, RunResult(outcomes=_outcomes(strict)), meta)
        paths.append(path)
    # an upstream run on the local backend that ran only the legacy scenario
    local = replace(
        BASE, distribution=Distribution(), backend="local", istio_version="1.29.8", date=None
    )
    only_legacy = [CheckOutcome("legacy-sidecar", "PERMISSIVE", "mtls-scrape", Status.PASS)]
    write_report(out / "local.json", RunResult(outcomes=only_legacy), local)
    return [*paths, out / "local.json"]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.cells: list[tuple[str, str]] = []  # (class, title) of each td

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "a" and a.get("href"):
            self.hrefs.append(str(a["href"]))
        if tag == "td":
            self.cells.append((str(a.get("class", "")), str(a.get("title", ""))))


def test_matrix_rows_columns_and_cells(reports: list[Path]) -> None:
    m = build_matrix(load_reports([reports[0].parent]))
    # grouped by distribution, then ordered by Istio and Kubernetes version
    assert [c.key[1] for c in m.columns] == ["1.30.5", "1.31.1", "1.31.1", "1.29.8"]
    assert [c.key[2] for c in m.columns] == ["v1.33.1", "v1.34.2", "v1.35.0", ""]
    assert [r for r, _ in m.rows] == [
        "native-sidecar[PERMISSIVE/as-documented]",
        "native-sidecar[STRICT/as-documented]",
        "legacy-sidecar[PERMISSIVE/as-documented]",
    ]
    strict = [m.cell("native-sidecar[STRICT/as-documented]", i).status for i in range(4)]
    assert strict == ["SKIP", "FAIL", "PASS", "-"]
    assert (
        m.cell("native-sidecar[STRICT/as-documented]", 0).reason
        == "Istio 1.30.5 lacks native-secure-ports"
    )
    assert [f["code"] for f in m.cell("native-sidecar[STRICT/as-documented]", 1).failures] == [
        "SMC009"
    ]
    assert m.columns[3].label == f"Istio 1.29.8 / no Kubernetes / local / {REFERENCE}"
    assert m.columns[0].label == ("Istio 1.30.5 / Kubernetes v1.33.1 / kind / Example Mesh 2.4.1")


def test_cli_writes_markdown_and_html_with_working_links(
    reports: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    md, html = tmp_path / "matrix.md", tmp_path / "matrix.html"
    args = ["matrix", *map(str, reports), "--markdown", str(md), "--html", str(html)]
    assert main(args) == 0
    assert "3 run units x 4 runs" in capsys.readouterr().out

    fail = anchor("native-sidecar[STRICT/as-documented]", 1)
    text = md.read_text()
    row = next(
        line
        for line in text.splitlines()
        if line.startswith("| native-sidecar[STRICT/as-documented]")
    )
    cells = f"| core | SKIP | [**FAIL**](#{fail}) | PASS | - |"
    assert row == f"| native-sidecar[STRICT/as-documented] {cells}"
    assert f'<a id="{fail}"></a>' in text
    # the message's pipe is escaped so it cannot break the table
    assert "DOWN \\| reset" in text
    assert "(diagnostics: `artifacts/strict/<pod>.yaml`)" in text
    assert f"`{reports[1]}`" in text

    page = _Links()
    page.feed(html.read_text())
    assert page.hrefs.count(f"#{fail}") == 1
    assert all(h.lstrip("#") in page.ids for h in page.hrefs if h.startswith("#"))
    assert "artifacts/strict/<pod>.yaml" in page.hrefs  # the diagnostics path, escaped in HTML
    assert "&lt;pod&gt;" in html.read_text()
    classes = [c for c, _ in page.cells]
    assert classes.count("FAIL") == 1
    assert ("SKIP", "Istio 1.30.5 lacks native-secure-ports") in page.cells
    assert ("none", "not run") in page.cells


def test_markdown_to_stdout_by_default(
    reports: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["matrix", str(reports[0].parent)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# securemetrics-e2e results")
    assert "## Failures" in out


def test_same_combination_twice_keeps_the_newer(reports: list[Path], tmp_path: Path) -> None:
    newer = tmp_path / "newer.json"
    meta = replace(
        BASE,
        istio_version="1.31.1",
        kubernetes_version="v1.34.2",
        date=datetime(2026, 10, 1, tzinfo=UTC),
    )
    write_report(newer, RunResult(outcomes=_outcomes(Status.PASS)), meta)
    m = build_matrix(load_reports([*reports, newer]))
    assert len(m.columns) == 4
    assert m.cell("native-sidecar[STRICT/as-documented]", 1).status == "PASS"
    assert len(m.notes) == 1
    assert str(newer) in m.notes[0]
    assert str(reports[1]) in m.notes[0]


def test_invalid_inputs_are_usage_errors(
    reports: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = json.loads(reports[0].read_text())
    doc["verdict"]["result"] = "great"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert main(["matrix", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"report {bad} does not match" in err
    assert "at /verdict/result" in err
    assert main(["matrix", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["matrix", str(empty)]) == 2
    assert "holds no .json/.yaml/.yml report" in capsys.readouterr().err
