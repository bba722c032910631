"""JUnit XML from the same run the report describes, for CI systems that read JUnit.

One ``<testsuite>`` per run unit (``native-sidecar[STRICT/exclude-capture]``), one
``<testcase>`` per check with the unit as ``classname`` and the check id as ``name``. A
failure's ``type`` is its finding code and its text carries the message and the
diagnostics path; a skip carries its reason. JUnit has no status for a known upstream
gap: KNOWN-GAP is a skip whose reason names the gap and its fix; FIXED is a pass whose
output says which gap the distribution closes. The run's metadata (backend, Istio,
Kubernetes, distribution) goes into ``<properties>`` of each suite, where Jenkins, GitLab
and GitHub reporters show it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

from securemetrics_e2e.outputs import write_atomically
from securemetrics_e2e.report import ReportMeta, check_title, provenance
from securemetrics_e2e.results import CheckOutcome, RunResult, Status


def _properties(meta: ReportMeta, profile: str) -> list[tuple[str, str]]:
    prov = provenance(meta)  # a CI page must not show a local run as the distribution's
    control = prov["negativeControl"]
    props = [
        ("securemetrics.suite_version", meta.suite_version),
        ("securemetrics.backend", meta.backend),
        ("securemetrics.subject", prov["subject"]),
        ("securemetrics.negative_control", control["fault"] if control else ""),
        ("securemetrics.profile", profile),
        ("istio.version", meta.istio_version),
        ("istio.hub", meta.istio_hub),
        ("istio.tag", meta.istio_tag),
        ("kubernetes.version", meta.kubernetes_version),
        ("distribution.organization", meta.distribution.organization),
        ("distribution.project", meta.distribution.project),
        ("distribution.version", meta.distribution.version),
    ]
    return [(k, v) for k, v in props if v]


def _testcase(parent: ET.Element, o: CheckOutcome, classname: str) -> None:
    case = ET.SubElement(
        parent,
        "testcase",
        classname=classname,
        name=o.check,
        time=f"{o.duration_s:.3f}",
    )
    title = check_title(o.check)
    if o.status is Status.FAIL:
        text = [o.message]
        if title:
            text.append(f"check: {title}")
        if o.diagnostics:
            text.append(f"diagnostics: {o.diagnostics}")
        if o.nodeid:
            text.append(f"re-run: pytest '{o.nodeid}'")
        failure = ET.SubElement(case, "failure", message=f"{o.code} {o.message}", type=o.code)
        failure.text = "\n".join(text)
    elif o.status is Status.SKIP:
        ET.SubElement(case, "skipped", message=o.message or "skipped")
    elif o.status is Status.KNOWN_GAP:
        ET.SubElement(case, "skipped", message=f"KNOWN-GAP {o.gap}: {o.message}")
    elif o.status is Status.FIXED:
        out = ET.SubElement(case, "system-out")
        out.text = f"FIXED {o.gap}: {o.message}" + (f"\ncheck: {title}" if title else "")
    elif title:
        out = ET.SubElement(case, "system-out")
        out.text = title


def build_junit(result: RunResult, meta: ReportMeta | None = None) -> ET.Element:
    """The JUnit document of ``result`` (its ``<testsuites>`` root)."""
    if meta is None:
        meta = ReportMeta.from_environment(result.environment)
    stamp = (meta.date or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    counts = result.counts()
    root = ET.Element(
        "testsuites",
        name="securemetrics-e2e",
        tests=str(len(result.outcomes)),
        failures=str(counts[Status.FAIL]),
        errors=str(len(result.errors)),
        skipped=str(counts[Status.SKIP] + counts[Status.KNOWN_GAP]),
        time=f"{sum(o.duration_s for o in result.outcomes):.3f}",
    )
    for unit in result.units():
        mine = result.of_unit(unit)
        name = mine[0].unit_id
        suite = ET.SubElement(
            root,
            "testsuite",
            name=name,
            tests=str(len(mine)),
            failures=str(sum(o.status is Status.FAIL for o in mine)),
            errors="0",
            skipped=str(sum(o.status in (Status.SKIP, Status.KNOWN_GAP) for o in mine)),
            time=f"{sum(o.duration_s for o in mine):.3f}",
            timestamp=stamp.replace("+00:00", ""),
        )
        props = ET.SubElement(suite, "properties")
        for key, value in _properties(meta, mine[0].profile):
            ET.SubElement(props, "property", name=key, value=value)
        for o in mine:
            _testcase(suite, o, name)
    if result.errors:
        # An error that stopped the run is not a check result, but CI must see it.
        suite = ET.SubElement(
            root, "testsuite", name="securemetrics-e2e", tests="1", failures="0", errors="1"
        )
        case = ET.SubElement(suite, "testcase", classname="securemetrics-e2e", name="run")
        error = ET.SubElement(case, "error", message=result.errors[0], type="EnvironmentError")
        error.text = "\n".join(result.errors)
    ET.indent(root)
    return root


def write_junit(path: Path, result: RunResult, meta: ReportMeta | None = None) -> None:
    """Write the JUnit XML of ``result`` to ``path`` (atomically)."""
    root = build_junit(result, meta)
    data = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    write_atomically(path, data, "junit")
