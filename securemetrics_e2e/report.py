"""The conformance report a vendor publishes: what was tested, on what, and with what result.

Modelled on the Gateway API conformance report (distribution, date, per-profile result
and statistics) and going further where its users asked: passed checks are named, not
only counted; each failure carries its finding code, message and diagnostics path; every
skip carries its reason; the whole run has one verdict. The document's shape is fixed by
``schemas/report.schema.json`` (shipped in the package); :func:`validate_report` checks a
document against it, and :func:`write_report` never writes one that does not conform.
"""

from __future__ import annotations

import enum
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import jsonschema
import yaml

from securemetrics_e2e import __version__
from securemetrics_e2e.catalog import Feature, Profile
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.outputs import report_format, write_atomically
from securemetrics_e2e.progress import scenario_notes
from securemetrics_e2e.results import CheckOutcome, RunResult, Status

API_VERSION: Final = "securemetrics-e2e/v1alpha1"
KIND: Final = "ConformanceReport"
SCHEMA_PATH: Final = Path(__file__).resolve().parent / "schemas" / "report.schema.json"


class ReportInvalid(UsageError):
    """A report document that does not match the report schema (or cannot be read)."""


class ProfileResult(enum.StrEnum):
    """A profile's (or the run's) result, as the Gateway API report words it."""

    SUCCESS = "success"  # checks passed, none failed, none skipped
    PARTIAL = "partial"  # checks passed, none failed, some skipped
    FAILURE = "failure"  # at least one check failed (or the run hit an error)
    SKIPPED = "skipped"  # nothing ran: every check skipped, which proves nothing


@dataclass(frozen=True)
class Distribution:
    """The mesh distribution under test (Gateway API calls it the implementation)."""

    organization: str = ""
    project: str = ""
    url: str = ""
    version: str = ""
    contact: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "organization": self.organization,
            "project": self.project,
            "url": self.url,
            "version": self.version,
            "contact": list(self.contact),
        }


@dataclass(frozen=True)
class ReportMeta:
    """What the run does not know by itself: who ran it against what."""

    distribution: Distribution = field(default_factory=Distribution)
    istio_version: str = ""
    istio_hub: str = ""
    istio_tag: str = ""
    kubernetes_version: str = ""
    backend: str = ""
    backend_details: Mapping[str, str] = field(default_factory=dict)
    #: the profiles the run selected; empty: those its outcomes belong to
    profiles: tuple[str, ...] = ()
    #: the scenario filter of the run; empty: every scenario of the selected profiles
    scenarios: tuple[str, ...] = ()
    date: datetime | None = None
    suite_version: str = __version__
    #: what the run printed as notes on the terminal
    notes: tuple[str, ...] = ()
    #: a plan-only report: nothing ran
    plan_only: bool = False

    @classmethod
    def from_environment(cls, environment: Mapping[str, str], **overrides: Any) -> ReportMeta:
        """Metadata from a run's environment (a backend's ``describe()``), then ``overrides``.

        Known keys: backend, istio_version, istio_hub, istio_tag, kubernetes_version; every
        other key is kept as a backend detail.
        """
        known = ("backend", "istio_version", "istio_hub", "istio_tag", "kubernetes_version")
        values: dict[str, Any] = {k: str(environment.get(k, "") or "") for k in known}
        values["backend_details"] = {
            str(k): str(v) for k, v in environment.items() if k not in known and v not in (None, "")
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def check_title(check_id: str) -> str:
    """The human title of a check id ("" for an id this suite does not define)."""
    from securemetrics_e2e.checks import check

    try:
        return check(check_id).title
    except KeyError:
        return ""


def check_code(check_id: str) -> str:
    """The SMC code of a check id (every report entry carries one)."""
    from securemetrics_e2e.checks import check

    return check(check_id).code


LOCAL_STATEMENT: Final = (
    "This is a run of the securemetrics-e2e suite against Istio's reference data plane, not "
    "of any distribution: upstream Envoy, configured as Istio's pilot-agent configures it, "
    "and the Prometheus listed here ran on the machine that produced this report. No part "
    "of the distribution named in this report ran; it is not a result of that distribution."
)
CLUSTER_STATEMENT: Final = (
    "A run against the Istio control and data plane installed on the cluster in "
    "backend.details: the distribution's own istiod and proxies were tested."
)
PLAN_STATEMENT: Final = (
    "A plan only: nothing ran and nothing was checked. It records what a run with these "
    "options would install, deploy and check."
)


def provenance(meta: ReportMeta) -> dict[str, Any]:
    """What actually ran: the report's answer to "a result of what?"."""
    details = meta.backend_details
    if meta.plan_only:
        subject, statement = "plan", PLAN_STATEMENT
    elif meta.backend == "local":
        subject, statement = "reference-data-plane", LOCAL_STATEMENT
    else:
        subject, statement = "distribution", CLUSTER_STATEMENT
    components: list[dict[str, Any]] = []
    for name in ("envoy", "prometheus"):  # the local backend's stand-ins (local/provenance.py)
        if details.get(name):
            version = details.get(f"{name}_version") or None
            components.append({"name": name, "path": details[name], "version": version})
    for name in ("istiod", "proxy"):  # a cluster's images, as its backend describes them
        if details.get(f"{name}_image"):
            components.append(
                {
                    "name": name,
                    "image": details[f"{name}_image"],
                    "version": details.get(f"{name}_version") or None,
                    "digest": details.get(f"{name}_image_digest") or None,
                }
            )
    if subject != "reference-data-plane" and meta.istio_version:
        components.append(_cluster_prometheus(meta))
    fault = details.get("fault")
    reported = details.get("istio_version_reported") or (
        meta.istio_version if subject != "reference-data-plane" else ""
    )
    return {
        "subject": subject,
        "statement": statement,
        "negativeControl": {"fault": fault} if fault else None,
        "components": components,
        "kubernetesVersion": meta.kubernetes_version or None,
        "istioVersionReported": reported or None,
    }


def _cluster_prometheus(meta: ReportMeta) -> dict[str, Any]:
    """The Prometheus that judged on a cluster: the scraper chart's image for the Istio minor
    (manifests.scraper_release), unless the backend reports the image it ran."""
    from securemetrics_e2e.versions import capabilities

    details = meta.backend_details
    image = details.get("prometheus_image")
    if not image:
        try:
            image = capabilities(meta.istio_version).prometheus_image
        except UsageError:
            image = "unknown"
    return {
        "name": "prometheus",
        "image": image,
        "version": image.rsplit(":", 1)[1] if ":" in image else None,
        "digest": details.get("prometheus_image_digest") or None,
    }


def result_of(outcomes: Iterable[CheckOutcome], errors: Iterable[str] = ()) -> ProfileResult:
    statuses = [o.status for o in outcomes]
    if any(errors) or Status.FAIL in statuses:
        return ProfileResult.FAILURE
    if not {Status.PASS, Status.FIXED, Status.KNOWN_GAP} & set(statuses):
        return ProfileResult.SKIPPED
    return ProfileResult.PARTIAL if Status.SKIP in statuses else ProfileResult.SUCCESS


def statistics(outcomes: Iterable[CheckOutcome]) -> dict[str, int]:
    stats = {"passed": 0, "failed": 0, "knownGaps": 0, "fixed": 0, "skipped": 0}
    key = {
        Status.PASS: "passed",
        Status.FAIL: "failed",
        Status.KNOWN_GAP: "knownGaps",
        Status.FIXED: "fixed",
        Status.SKIP: "skipped",
    }
    for o in outcomes:
        stats[key[o.status]] += 1
    return stats


def _entry(o: CheckOutcome) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": o.unit_id,
        "scenario": o.scenario,
        "mode": o.mode,
        "variant": o.variant,
        "check": o.check,
        "code": o.code or check_code(o.check),
        "title": check_title(o.check),
        "durationSeconds": round(o.duration_s, 3),
    }
    if o.nodeid:
        entry["nodeid"] = o.nodeid
    if o.status is Status.FAIL:
        entry["message"] = o.message or "(the check gave no message)"
        entry["diagnostics"] = o.diagnostics or None
    elif o.status is Status.SKIP:
        entry["reason"] = o.message or "(no reason given)"
    elif o.status in (Status.KNOWN_GAP, Status.FIXED):
        entry["gap"] = o.gap
        entry["message"] = o.message
    return entry


def _scenario_rows(outcomes: list[CheckOutcome]) -> list[dict[str, Any]]:
    result = RunResult(outcomes=outcomes)
    rows = []
    for unit in result.units():
        mine = result.of_unit(unit)
        status = result.unit_status(unit)
        name, mode, variant = unit
        row: dict[str, Any] = {
            "id": mine[0].unit_id,
            "scenario": name,
            "mode": mode,
            "variant": variant,
            "status": status.value,
            "statistics": statistics(mine),
        }
        if status is Status.FAIL:
            row["codes"] = sorted({o.code for o in mine if o.status is Status.FAIL and o.code})
        if status is Status.SKIP:
            row["reason"] = mine[0].message
        gaps = sorted({o.gap for o in mine if o.gap})
        if gaps:
            row["gaps"] = gaps
        rows.append(row)
    return rows


def _profile(name: str, outcomes: list[CheckOutcome], errors: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "result": result_of(outcomes, errors).value,
        "statistics": statistics(outcomes),
        "scenarios": _scenario_rows(outcomes),
        "passed": [_entry(o) for o in outcomes if o.status is Status.PASS],
        "failed": [_entry(o) for o in outcomes if o.status is Status.FAIL],
        "skipped": [_entry(o) for o in outcomes if o.status is Status.SKIP],
        "knownGaps": [_entry(o) for o in outcomes if o.status is Status.KNOWN_GAP],
        "fixed": [_entry(o) for o in outcomes if o.status is Status.FIXED],
    }


def _profile_names(result: RunResult, meta: ReportMeta) -> list[str]:
    if meta.profiles:
        return list(dict.fromkeys(meta.profiles))
    seen = {o.profile for o in result.outcomes}
    ordered = [p.value for p in Profile if p.value in seen]
    return ordered + sorted(seen - set(ordered))


def build_report(result: RunResult, meta: ReportMeta | None = None) -> dict[str, Any]:
    """The report document of ``result`` (plain data, valid against the report schema)."""
    if meta is None:
        meta = ReportMeta.from_environment(result.environment)
    date = meta.date or datetime.now(UTC)
    if date.tzinfo is None:
        date = date.replace(tzinfo=UTC)
    profiles = _profile_names(result, meta)
    duration = result.measurements.get("duration_s")
    if duration is None and "start" in result.measurements and "end" in result.measurements:
        duration = result.measurements["end"] - result.measurements["start"]
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "date": date.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "suite": {"name": "securemetrics-e2e", "version": meta.suite_version},
        "distribution": meta.distribution.as_dict(),
        "istio": {
            "version": meta.istio_version or None,
            "hub": meta.istio_hub or None,
            "tag": meta.istio_tag or None,
        },
        "kubernetes": {"version": meta.kubernetes_version or None},
        "backend": _backend(result, meta),
        "provenance": provenance(meta),
        "notes": [*meta.notes, *scenario_notes(result)],
        "selection": {"profiles": profiles, "scenarios": list(meta.scenarios)},
        "verdict": {
            "conformant": result.conformant,
            "result": result_of(result.outcomes, result.errors).value,
            "statistics": statistics(result.outcomes),
            "errors": list(result.errors),
            "durationSeconds": round(duration, 3) if duration is not None else None,
        },
        "profiles": [
            _profile(name, [o for o in result.outcomes if o.profile == name], result.errors)
            for name in profiles
        ],
        "knownGaps": _gaps(result),
        "continuity": [
            {
                "id": rec.unit_id,
                "scenario": rec.scenario,
                "mode": rec.mode,
                "variant": rec.variant,
                "job": rec.measured.job,
                "scrapes": rec.measured.scrapes,
                "successes": rec.measured.successes,
                "fraction": round(rec.measured.fraction, 6),
                "longestGapSeconds": round(rec.measured.longest_gap_s, 3),
                "passed": rec.passed,
                "scope": rec.measured.scope,
                "pods": rec.measured.pods,
            }
            for rec in result.continuity
        ],
    }
    validate_report(doc)
    return doc


def _backend(result: RunResult, meta: ReportMeta) -> dict[str, Any]:
    """The backend that ran, and the features it supports and does not."""
    doc: dict[str, Any] = {"name": meta.backend or "unknown", "details": dict(meta.backend_details)}
    if result.backend_features is not None:
        every = [f.value for f in Feature]
        doc["features"] = {
            "supported": [f for f in every if f in result.backend_features],
            "unsupported": [f for f in every if f not in result.backend_features],
        }
    return doc


def _gaps(result: RunResult) -> list[dict[str, Any]]:
    """Every known gap the run met: shown (KNOWN-GAP) or closed (FIXED), with its evidence."""
    from securemetrics_e2e.knowngaps import known_gap

    rows = []
    for gap_id in dict.fromkeys(o.gap for o in result.outcomes if o.gap):
        gap = known_gap(gap_id)
        mine = [o for o in result.outcomes if o.gap == gap_id]
        rows.append(
            {
                "id": gap.id,
                "title": gap.title,
                "status": (
                    Status.KNOWN_GAP.value
                    if any(o.status is Status.KNOWN_GAP for o in mine)
                    else Status.FIXED.value
                ),
                "units": list(dict.fromkeys(o.unit_id for o in mine)),
                "checks": sorted({o.check for o in mine}),
                "fix": [f.value for f in gap.fixes],
                "istioVersions": gap.versions,
                "evidence": list(gap.evidence),
            }
        )
    return rows


@functools.cache
def report_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), as shipped in the package."""
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text())
    return schema


def schema_problems(doc: object) -> list[str]:
    """Every way ``doc`` violates the report schema, each as "at <pointer>: <message>"."""
    validator = jsonschema.Draft202012Validator(report_schema())
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path))):
        pointer = "/" + "/".join(str(p) for p in error.absolute_path)
        problems.append(f"at {pointer}: {error.message}")
    return problems


def validate_report(doc: object, source: str = "report") -> None:
    """Raise :class:`ReportInvalid` naming every schema violation of ``doc``."""
    problems = schema_problems(doc)
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ReportInvalid(
            f"{source} does not match the securemetrics-e2e report schema "
            f"({SCHEMA_PATH.name}): {shown}{more}"
        )


def dump_report(doc: Mapping[str, Any], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    # through JSON first: the document holds str enums (VariantId), which JSON writes as
    # their values and safe_dump refuses; YAML and JSON reports then say the same thing
    plain = json.loads(json.dumps(doc))
    return yaml.safe_dump(plain, sort_keys=False, allow_unicode=True, width=100)


def write_report(path: Path, result: RunResult, meta: ReportMeta | None = None) -> dict[str, Any]:
    """Write the report of ``result`` to ``path`` (JSON or YAML by suffix); return it."""
    fmt = report_format(path)
    doc = build_report(result, meta)
    write_atomically(path, dump_report(doc, fmt).encode("utf-8"), "report")
    return doc


def load_report(path: Path) -> dict[str, Any]:
    """Read and validate a report written by :func:`write_report`."""
    fmt = report_format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReportInvalid(f"cannot read report {path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ReportInvalid(f"report {path} is not valid {fmt.upper()}: {exc}") from None
    validate_report(doc, source=f"report {path}")
    loaded: dict[str, Any] = doc
    return loaded
