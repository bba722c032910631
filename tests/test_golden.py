"""Behaviour unchanged: a local conformance run gives the ids and statuses it gave before.

``tests/golden/local-conformance.json`` holds the stable part of the report of
``securemetrics-e2e run --backend local`` made on main before the check registry and
runner replaced the hand-written scenario tests (issue 12): run unit ids, check ids, codes,
statuses, and the verdict. A refactoring of how checks are collected and run must give
the same; a change of behaviour updates the golden in the same commit, on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.report import load_report
from tests.golden.stable import stable
from tests.localmesh import requires_local_mesh

GOLDEN = Path(__file__).parent / "golden" / "local-conformance.json"


@requires_local_mesh
@pytest.mark.skipif(
    LocalBackend().capture_unavailable_reason() is not None,
    reason="the golden was made where the local backend captures inbound traffic (iptables)",
)
def test_local_conformance_run_matches_the_golden_report(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "securemetrics_e2e", "run", "--backend", "local",
         "--report", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))
    got = stable(load_report(report))
    assert got["units"] == want["units"]
    assert got["checks"] == want["checks"]
    assert got == want
