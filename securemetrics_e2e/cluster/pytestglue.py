"""The cluster backend from pytest's options: the plan ``--plan`` prints, or the backend."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from securemetrics_e2e.catalog import (
    UPGRADE,
    Scenario,
    chosen_scenarios,
)
from securemetrics_e2e.cluster.backend import ClusterBackend
from securemetrics_e2e.cluster.bootstrap import make_cluster_backend
from securemetrics_e2e.cluster.options import (
    ClusterOptions,
    add_cluster_options,
    options_from_pytest,
)
from securemetrics_e2e.cluster.plan import render_plan
from securemetrics_e2e.cluster.setup import (
    stderr_progress,
)
from securemetrics_e2e.cluster.steps import Plan
from securemetrics_e2e.errors import UsageError

__all__ = ["add_cluster_options", "backend_from_pytest", "plan_from_pytest", "print_plan"]


def _chosen_scenarios(config: Any) -> list[Scenario]:
    return chosen_scenarios(config.getoption("--scenario"))


def _check_selection(options: ClusterOptions, chosen: Sequence[Scenario]) -> None:
    """An upgrade run deploys the upgrade scenario only: refuse a selection without it."""
    if options.upgrade_from is not None and all(s.name != UPGRADE.name for s in chosen):
        names = ", ".join(s.name for s in chosen)
        raise UsageError(
            f"--upgrade-from makes an upgrade run, which deploys only the {UPGRADE.name} "
            f"scenario, and --scenario selects {names}: add --scenario {UPGRADE.name} or drop "
            "--upgrade-from"
        )


def plan_from_pytest(config: Any, version: str | None) -> Plan:
    """The plan of the run pytest's options describe (for ``--plan``); with
    ``--upgrade-from``, the upgrade run's plan."""
    options = options_from_pytest(config, version)
    chosen = _chosen_scenarios(config)
    _check_selection(options, chosen)
    return render_plan(options, chosen)


def print_plan(config: Any, version: str | None) -> None:
    """Write the plan to the terminal, past pytest's output capture."""
    text = plan_from_pytest(config, version).render_text()
    capture = config.pluginmanager.get_plugin("capturemanager")
    disabled = capture.global_and_fixture_disabled() if capture is not None else None
    if disabled is not None:
        with disabled:
            sys.stdout.write(text)
            sys.stdout.flush()
    else:
        sys.stdout.write(text)


def backend_from_pytest(config: Any, version: str | None) -> ClusterBackend:
    """The backend pytest's options describe (``--plan`` never gets here: the plugin's
    pytest_cmdline_main prints the plan and ends the session first)."""
    options = options_from_pytest(config, version)
    _check_selection(options, _chosen_scenarios(config))
    progress: Callable[[str], None] = stderr_progress
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        progress = reporter.write_line
    return make_cluster_backend(options, progress=progress, scenarios=_chosen_scenarios(config))
