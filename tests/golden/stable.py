"""The stable part of a conformance report: what a refactoring must not change.

Run unit ids, check ids, finding codes and statuses (per check and per run unit) and the
verdict; no durations, paths, dates or messages. ``python -m tests.golden.stable REPORT``
prints it, which is how ``local-conformance.json`` was made (from main, before the
registry and runner of issue 12).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: the report's per-status lists of check entries, and the status each stands for
_LISTS = {
    "passed": "PASS",
    "failed": "FAIL",
    "skipped": "SKIP",
    "knownGaps": "KNOWN-GAP",
    "fixed": "FIXED",
}


def stable(doc: dict[str, Any]) -> dict[str, Any]:
    checks = sorted(
        f"{e['id']} {e['check']} {e['code']} {status}"
        for profile in doc["profiles"]
        for key, status in _LISTS.items()
        for e in profile[key]
    )
    units = sorted(
        f"{row['id']} {row['status']}"
        for profile in doc["profiles"]
        for row in profile["scenarios"]
    )
    return {
        "conformant": doc["verdict"]["conformant"],
        "statistics": doc["verdict"]["statistics"],
        "units": units,
        "checks": checks,
    }


def check_statuses(golden: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Each run unit's check statuses, read back from :func:`stable`'s "checks" lines."""
    by_unit: dict[str, dict[str, str]] = {}
    for line in golden["checks"]:
        unit, check, _code, status = line.rsplit(" ", 3)
        by_unit.setdefault(unit, {})[check] = status
    return by_unit


if __name__ == "__main__":
    report = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    sys.stdout.write(json.dumps(stable(report), indent=1) + "\n")
