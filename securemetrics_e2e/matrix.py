"""Merge conformance reports into one results matrix (Markdown and HTML).

Rows are run units (scenario[MODE/variant]), columns are runs (Istio version x Kubernetes
version x distribution x backend). Each cell is PASS, FAIL, SKIP, KNOWN-GAP (failed as a
known upstream gap predicts), FIXED (passed where a known gap predicts a failure: the
distribution closes it) or "-" (not run); a known gap or fixed cell names its gaps in the
"Known gaps" section, and a FAIL cell links to its entry in the failures section, which
names each failed check with its finding code, message, diagnostics path and the report it
came from. Users of the Gateway API and Istio
suites ask for exactly this view across versions; every report is schema-validated first.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from securemetrics_e2e.catalog import SCENARIOS
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.outputs import JSON_SUFFIXES, YAML_SUFFIXES
from securemetrics_e2e.report import load_report

NOT_RUN = "-"


@dataclass(frozen=True)
class Column:
    """One run: the report it came from and what distinguishes it from the others."""

    key: tuple[str, str, str, str]  # distribution, istio version, kubernetes version, backend
    label: str
    source: str
    date: str
    report: dict[str, Any] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Cell:
    status: str  # PASS, FAIL, SKIP, KNOWN-GAP, FIXED or NOT_RUN
    failures: tuple[dict[str, Any], ...] = ()
    reason: str = ""
    gaps: tuple[str, ...] = ()  # the known gaps behind a KNOWN-GAP or FIXED cell


#: the symbol each status has in a Markdown cell (a FAIL links to its failure)
SYMBOLS = {"KNOWN-GAP": "GAP", "FIXED": "FIXED+", "PASS": "PASS", "SKIP": "SKIP"}
LEGEND = (
    "GAP: failed exactly as a known upstream Istio gap predicts (not a failure of the "
    "distribution); FIXED+: passed where a known gap predicts a failure (the distribution "
    "closes it); -: not run."
)


@dataclass
class Matrix:
    columns: list[Column]
    rows: list[tuple[str, str]]  # (variant id, profile)
    cells: dict[tuple[str, int], Cell]
    notes: list[str] = field(default_factory=list)

    def cell(self, row: str, column: int) -> Cell:
        return self.cells.get((row, column), Cell(NOT_RUN))


def _version_key(text: str) -> tuple[int, Version | str]:
    try:
        return (0, Version(text.lstrip("v").replace("-", "")))
    except InvalidVersion:
        return (1, text)


#: how a column that is not a distribution's result is named, whatever its report claims
REFERENCE = "Istio reference data plane (local run, not a distribution)"
PLAN = "plan only (nothing ran)"


def negative_control(report: dict[str, Any]) -> str:
    """The seeded fault of a negative-control run, "" for any other run."""
    control = report["provenance"]["negativeControl"]
    return str(control["fault"]) if control else ""


def _distribution(report: dict[str, Any]) -> str:
    subject = report["provenance"]["subject"]
    # a local run names a distribution only as who ran it: it never tested it
    if subject == "reference-data-plane":
        name = REFERENCE
    elif subject == "plan":
        name = PLAN
    else:
        d = report["distribution"]
        name = d["project"] or d["organization"]
        name = f"{name} {d['version']}".strip() if name else "Istio (upstream)"
    fault = negative_control(report)
    return f"{name}, negative control (fault {fault})" if fault else name


def _column(source: str, report: dict[str, Any]) -> Column:
    istio = report["istio"]["version"] or "unknown"
    kube = report["kubernetes"]["version"] or ""
    backend = report["backend"]["name"]
    dist = _distribution(report)
    key = (dist, istio, kube, backend)
    parts = [f"Istio {istio}"]
    if report["istio"]["hub"] or report["istio"]["tag"]:
        parts[0] += f" ({report['istio']['hub'] or ''}:{report['istio']['tag'] or ''})"
    parts.append(f"Kubernetes {kube}" if kube else "no Kubernetes")
    parts.append(backend)
    parts.append(dist)
    return Column(key, " / ".join(parts), source, report["date"], report)


def _row_order() -> dict[str, int]:
    order: dict[str, int] = {}
    for s in SCENARIOS:
        for u in s.run_units():
            order[u.id] = len(order)
    return order


def build_matrix(reports: Sequence[tuple[str, dict[str, Any]]]) -> Matrix:
    """The matrix of ``reports`` ((source, validated report) pairs)."""
    if not reports:
        raise UsageError("no reports to merge: give report files (.json/.yaml) or directories")
    by_key: dict[tuple[str, str, str, str], Column] = {}
    notes = []
    for source, report in reports:
        col = _column(source, report)
        old = by_key.get(col.key)
        if old is not None:
            newer, older = (col, old) if col.date >= old.date else (old, col)
            notes.append(
                f"{older.source} ({older.date}) and {newer.source} ({newer.date}) test the same "
                f"combination; the newer one is shown"
            )
            col = newer
        by_key[col.key] = col
    columns = sorted(
        by_key.values(),
        key=lambda c: (c.key[0], _version_key(c.key[1]), _version_key(c.key[2]), c.key[3]),
    )
    cells: dict[tuple[str, int], Cell] = {}
    profiles: dict[str, str] = {}
    for index, col in enumerate(columns):
        for profile in col.report["profiles"]:
            failures: dict[str, list[dict[str, Any]]] = {}
            for entry in profile["failed"]:
                failures.setdefault(entry["id"], []).append(entry)
            for row in profile["scenarios"]:
                profiles.setdefault(row["id"], profile["name"])
                cells[(row["id"], index)] = Cell(
                    row["status"],
                    tuple(failures.get(row["id"], ())),
                    row.get("reason", ""),
                    tuple(row.get("gaps", ())),
                )
    order = _row_order()
    rows = sorted(profiles.items(), key=lambda r: (order.get(r[0], len(order)), r[0]))
    return Matrix(columns, rows, cells, notes)


def _report_files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in JSON_SUFFIXES | YAML_SUFFIXES
        )
        if not found:
            raise UsageError(f"directory {path} holds no .json/.yaml/.yml report")
        return found
    if not path.exists():
        raise UsageError(f"report {path} does not exist")
    return [path]


def load_reports(paths: Iterable[Path]) -> list[tuple[str, dict[str, Any]]]:
    """Every report in ``paths`` (files, or directories searched for .json/.yaml), validated."""
    return [(str(p), load_report(p)) for path in paths for p in _report_files(path)]


def anchor(row: str, column: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")
    return f"fail-c{column + 1}-{slug}"


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _cells(m: Matrix, keep: Callable[[Cell], bool]) -> list[tuple[str, int, Cell]]:
    """(row, column, cell) of every cell ``keep`` keeps, row by row."""
    return [
        (row, i, m.cell(row, i))
        for row, _ in m.rows
        for i in range(len(m.columns))
        if keep(m.cell(row, i))
    ]


def _gap_cells(m: Matrix) -> list[tuple[str, int, Cell]]:
    return _cells(m, lambda c: bool(c.gaps))


def _failed_cells(m: Matrix) -> list[tuple[str, int, Cell]]:
    return _cells(m, lambda c: c.status == "FAIL")


def render_markdown(m: Matrix) -> str:
    out = ["# securemetrics-e2e results", ""]
    out.append("Columns (one per run):")
    out.append("")
    for i, col in enumerate(m.columns):
        out.append(f"{i + 1}. {_md(col.label)}, {col.date}: `{_md(col.source)}`")
    out.append("")
    out.append(
        "A column named *reference data plane* is a local run: the suite against upstream Envoy "
        "and Prometheus, not a result of any distribution. A *negative control* broke the mesh "
        "on purpose: its FAILs are expected and prove the suite can fail."
    )
    out.append("")
    out.append(
        "| Scenario | Profile | " + " | ".join(f"{i + 1}" for i in range(len(m.columns))) + " |"
    )
    out.append("|---|---|" + "---|" * len(m.columns))
    for row, profile in m.rows:
        cells = []
        for i in range(len(m.columns)):
            cell = m.cell(row, i)
            if cell.status == "FAIL" and negative_control(m.columns[i].report):
                cells.append(f"[FAIL (negative control)](#{anchor(row, i)})")
            elif cell.status == "FAIL":
                cells.append(f"[**FAIL**](#{anchor(row, i)})")
            else:
                cells.append(SYMBOLS.get(cell.status, cell.status))
        out.append(f"| {_md(row)} | {profile} | " + " | ".join(cells) + " |")
    out += ["", LEGEND]
    gaps = _gap_cells(m)
    if gaps:
        out += ["", "## Known gaps", ""]
        out += [
            f"- {_md(row)} in run {i + 1}: {c.status} {', '.join(c.gaps)}" for row, i, c in gaps
        ]
    failures = _failed_cells(m)
    if failures:
        out += ["", "## Failures"]
        for row, i, cell in failures:
            col = m.columns[i]
            out += ["", f'<a id="{anchor(row, i)}"></a>', f"### {_md(row)} in run {i + 1}", ""]
            out.append(f"{_md(col.label)}; report `{_md(col.source)}`")
            out.append("")
            for f in cell.failures:
                line = f"- **{f['code']}** `{f['check']}`: {_md(f['message'])}"
                if f.get("diagnostics"):
                    line += f" (diagnostics: `{_md(f['diagnostics'])}`)"
                out.append(line)
    if m.notes:
        out += ["", "## Notes", ""] + [f"- {_md(n)}" for n in m.notes]
    return "\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: center; }
th.row, td.row { text-align: left; font-family: monospace; }
td.PASS { background: #d7f5d7; } td.FAIL { background: #f8d0d0; }
td.SKIP { background: #f5efc8; } td.none { color: #888; }
td.KNOWN-GAP { background: #e4dcf5; } td.FIXED { background: #cdeff5; }
li { margin: 0.2em 0; } code { background: #eee; padding: 0 0.2em; }
"""


def render_html(m: Matrix) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>securemetrics-e2e results</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>securemetrics-e2e results</h1>",
        "<table>",
        '<thead><tr><th class="row">Scenario</th><th>Profile</th>',
    ]
    for i, col in enumerate(m.columns):
        out.append(f'<th title="{e(col.source)}, {e(col.date)}">{i + 1}. {e(col.label)}</th>')
    out.append("</tr></thead><tbody>")
    for row, profile in m.rows:
        out.append(f'<tr><td class="row">{e(row)}</td><td>{e(profile)}</td>')
        for i, col in enumerate(m.columns):
            cell = m.cell(row, i)
            if cell.status == "FAIL":
                codes = ", ".join(dict.fromkeys(f["code"] for f in cell.failures))
                text = "FAIL (negative control)" if negative_control(col.report) else "FAIL"
                link = f'<a href="#{anchor(row, i)}" title="{e(codes)}">{text}</a>'
                out.append(f'<td class="FAIL">{link}</td>')
            elif cell.status == "SKIP":
                out.append(f'<td class="SKIP" title="{e(cell.reason)}">SKIP</td>')
            elif cell.status == "PASS":
                out.append('<td class="PASS">PASS</td>')
            elif cell.status in ("KNOWN-GAP", "FIXED"):
                out.append(
                    f'<td class="{cell.status}" title="{e(", ".join(cell.gaps))}">'
                    f"{SYMBOLS[cell.status]}</td>"
                )
            else:
                out.append(f'<td class="none" title="not run">{NOT_RUN}</td>')
        out.append("</tr>")
    out.append("</tbody></table>")
    out.append(f"<p>{e(LEGEND)}</p>")
    failures = _failed_cells(m)
    if failures:
        out.append("<h2>Failures</h2>")
        for row, i, cell in failures:
            col = m.columns[i]
            out.append(f'<h3 id="{anchor(row, i)}">{e(row)} in run {i + 1}</h3>')
            out.append(f"<p>{e(col.label)}; report <code>{e(col.source)}</code></p><ul>")
            for f in cell.failures:
                item = f"<li><strong>{e(f['code'])}</strong> <code>{e(f['check'])}</code>: "
                item += e(f["message"])
                if f.get("diagnostics"):
                    d = f["diagnostics"]
                    item += f' (diagnostics: <a href="{e(d)}"><code>{e(d)}</code></a>)'
                out.append(item + "</li>")
            out.append("</ul>")
    if m.notes:
        out.append("<h2>Notes</h2><ul>")
        out += [f"<li>{e(n)}</li>" for n in m.notes]
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
