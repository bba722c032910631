"""Repository conftest: the securemetrics-e2e plugin is loaded through its pytest11 entry point.

Under pytest-xdist (``nox -s tests`` runs with it) this file decides which tests share a
worker: a test file's tests stay together (their module fixtures, e.g. a mesh, are built
once; files sharing a session fixture, e.g. one local run, go together), a file of
independent long tests is split test by test, and every conformance scenario
(``scenarios/``) runs on one worker, because the plugin deploys all selected run units at
once as one session-scoped fleet with one Prometheus: split across workers, each would
deploy the whole fleet again.
"""

from __future__ import annotations

from typing import Any

import pytest

#: the units of work that take longest, longest first (the sum of their tests' setup, call
#: and teardown, `--durations=0` on 4 workers, 2026-11-26): a worker takes them first, so
#: that none picks one up at the end while the others idle; the units not named here are
#: short and fill the end in the collection's order
_LONGEST_FIRST = (
    "tests/test_walkthrough.py",  # 44 s, with tests/test_golden.py
    "tests/test_interrupt.py",  # 45 s, split test by test (5-12 s each)
    "tests/test_rotation.py",  # 30 s
    # CPU-bound in one process (the Istio and Prometheus Operator models load first)
    "tests/test_manifests.py",  # 27 s
    "tests/test_local_lifecycle.py",  # 22 s
    "tests/test_negative_controls.py",  # 21 s
    "tests/test_cli.py",  # 18 s, with tests/test_provenance.py
    "tests/test_packaging.py",  # 16 s
    "tests/test_check_servicemonitor.py",  # 16 s
    "tests/test_upgrade_window.py",  # 15 s
    "tests/test_windows.py",  # 15 s
    "scenarios",  # 15 s
    "tests/test_inbound.py",  # 14 s
    "tests/test_probe.py",  # 12 s
    "tests/test_chart_schemas.py",  # 12 s
    "tests/test_prometheus.py",  # 12 s
    "tests/test_cluster_safety.py",  # 11 s
    "tests/test_cluster_plan.py",  # 9 s
    "tests/test_capture_backend.py",  # 9 s
    "tests/test_cli_inputs.py",  # 8 s, split
    "tests/test_cluster_upgrade_run.py",  # 8 s, split
    "tests/test_cluster_rotation.py",  # 7 s
    "tests/test_check_selection.py",  # 7 s, split
    "tests/test_cluster_backend.py",  # 7 s, split
    "tests/test_local_diagnostics.py",  # 6 s
    "tests/test_plugin_plan.py",  # 6 s, split
)

#: test files that read what another file's session fixture made (tests/conftest.py),
#: and that file: on one worker, the fixture runs once
_SHARING = {
    # the walk-through's local run is the run the golden report is compared with
    "tests/test_golden.py": "tests/test_walkthrough.py",
    # the CLI's clean run is the run whose report's provenance is checked
    "tests/test_provenance.py": "tests/test_cli.py",
}

#: files whose tests share no module fixture and each start a run or a pytest of their
#: own: each test is a unit of its own, so that one worker does not run them all one
#: after another (test_interrupt's nine runs took two minutes of one worker's time)
_SPLIT = frozenset(
    {
        "tests/test_interrupt.py",
        "tests/test_cli_inputs.py",
        "tests/test_cluster_backend.py",
        "tests/test_plugin_plan.py",
        "tests/test_check_selection.py",
        "tests/test_cluster_upgrade_run.py",
    }
)


def _unit_file(nodeid: str) -> str:
    """The file a test's unit is named after: ``scenarios``, or a test file."""
    path = nodeid.split("::", 1)[0]
    return "scenarios" if path.startswith("scenarios/") else _SHARING.get(path, path)


def xdist_scope(nodeid: str) -> str:
    """The unit of work a worker takes whole: ``scenarios``, one test file with the files
    sharing its session fixtures, or one test of a file in ``_SPLIT``."""
    unit = _unit_file(nodeid)
    return nodeid if unit in _SPLIT else unit


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    # hand out units in the collection's order (longest first, pytest_collection_modifyitems
    # below): xdist >= 3.6 otherwise sorts them by their number of tests, which put the
    # three-test walk-through (the longest unit, ~44 s) near the end: the run's tail
    config.option.loadscopereorder = False

    class FileScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return FileScheduling(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, order the collection longest unit first: the scheduler hands
    out units in the order the workers collected them. A stable sort, so the order inside
    a unit (pytest's grouping by session-scoped deployment) is kept."""
    if not hasattr(config, "workerinput"):
        return
    rank = {scope: i for i, scope in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit_file(item.nodeid), len(rank)))
