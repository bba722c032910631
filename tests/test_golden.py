"""Behaviour unchanged: a local conformance run gives the ids and statuses it gave before.

``tests/golden/local-conformance.json`` holds the stable part of the report of
``securemetrics-e2e run --backend local`` made on main before the check registry and
runner replaced the hand-written scenario tests (issue 12): run unit ids, check ids, codes,
statuses, and the verdict. A refactoring of how checks are collected and run must give
the same; a change of behaviour updates the golden in the same commit, on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.report import load_report
from tests.golden.stable import stable
from tests.localmesh import requires_local_mesh
from tests.walkthrough import Walk

#: the walk-through's real run: the full tier's, not the quick one's (nox -s quick)
pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "local-conformance.json"


@requires_local_mesh
@pytest.mark.skipif(
    LocalBackend().capture_unavailable_reason() is not None,
    reason="the golden was made where the local backend captures inbound traffic (iptables)",
)
def test_local_conformance_run_matches_the_golden_report(walkthrough: Walk) -> None:
    # the walk-through's `securemetrics-e2e run --backend local --report reports/local.yaml`,
    # run from the package it installed (tests/walkthrough.py): one whole local run serves
    # both this comparison and the walk-through's test
    ran = [c for c in walkthrough.ran if c.startswith("securemetrics-e2e run --backend local ")]
    assert ran, walkthrough.failed  # the run itself exited 0
    report = walkthrough.local_report
    want = json.loads(GOLDEN.read_text(encoding="utf-8"))
    got = stable(load_report(report))
    assert got["units"] == want["units"]
    assert got["checks"] == want["checks"]
    assert got == want
