"""docs/vendor-walkthrough.md works as written: its commands run, in order, as a user runs them.

Every shell command of the walk-through runs here except those that need a cluster (a
`run` on kind or an existing cluster): the install (a virtualenv under a scratch $HOME,
`pip install .` from this checkout, with the declared dependencies lent from this
interpreter: tests/walkthrough.py says what that leaves out), then list, plan, a local
run writing a report, the matrix of it, scrape-config and audit. A command that fails
fails the test.
"""

from __future__ import annotations

import pytest

from securemetrics_e2e.report import load_report
from tests.localmesh import requires_local_mesh
from tests.walkthrough import WALKTHROUGH, Walk, commands, needs_cluster

pytestmark = pytest.mark.slow


def test_the_walkthrough_names_its_commands() -> None:
    found = [c for _, c in commands()]
    assert "python3 -m venv ~/.venvs/securemetrics-e2e" in found
    assert any(needs_cluster(c) for c in found)  # the filter below is not vacuous
    assert "pip install securemetrics-e2e" not in WALKTHROUGH.read_text()  # not on the index


@requires_local_mesh
def test_every_command_without_a_cluster_runs(walkthrough: Walk) -> None:
    assert walkthrough.failed == ""
    assert walkthrough.ran == [c for _, c in commands() if not needs_cluster(c)]
    assert "securemetrics-e2e --version" in walkthrough.ran
    # the dependencies the install found were the package's own, not the test environment
    assert "kubernetes" in walkthrough.lent
    assert "nox" not in walkthrough.lent
    work = walkthrough.work
    assert load_report(walkthrough.local_report)["provenance"]["subject"] == (
        "reference-data-plane"
    )
    assert (work / "matrix.html").is_file()
    assert "scrape_configs" in (work / "prometheus.yml").read_text()
