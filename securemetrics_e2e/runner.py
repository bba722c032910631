"""The one check runner: every way a check runs (pytest, the CLI, negative controls).

:func:`attempt` runs one registered check on a deployment, or says why it does not run
(a feature the backend lacks: :mod:`securemetrics_e2e.applicability`); :func:`judged`
maps what it saw through the known-gap table (:mod:`securemetrics_e2e.knowngaps`) into
the :class:`~securemetrics_e2e.results.CheckOutcome` reports are made of. The pytest
plugin calls both from the generated items of ``scenarios/test_conformance.py``;
:func:`run_checks` calls them for every check of a deployment, for negative controls.
Both open continuity windows early with :func:`open_windows` (:mod:`.windows`), and
:func:`attempt` then reads a window's result instead of running its check again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from securemetrics_e2e.applicability import lacking_reason
from securemetrics_e2e.backend import Backend, Deployment
from securemetrics_e2e.catalog import RunUnit
from securemetrics_e2e.checkbase import Check, CheckFailed
from securemetrics_e2e.checks import CHECKS
from securemetrics_e2e.knowngaps import fix_of, judge
from securemetrics_e2e.results import CheckOutcome, Status
from securemetrics_e2e.windows import Windows


@dataclass(frozen=True)
class Attempt:
    """What running one check saw, before the known-gap table: PASS, FAIL or SKIP."""

    status: Status
    message: str = ""
    observed: tuple[str, ...] = ()
    #: what a continuity check measured (a Continuity), else None
    measured: object = None
    duration_s: float = 0.0
    failure: CheckFailed | None = None


def skip_reason(chk: Check, backend: Backend) -> str | None:
    """Why ``chk`` cannot run on ``backend`` (a feature it lacks), or None."""
    return lacking_reason(chk.needs, backend=backend.name, backend_features=backend.features)


#: the background windows of a run: each an :class:`Attempt` of one check on one unit
AttemptWindows = Windows[Attempt]


def _window_key(chk: Check, dep: Deployment) -> tuple[str, str]:
    return chk.id, dep.namespace


def open_windows(
    windows: AttemptWindows, backend: Backend, cases: Iterable[tuple[Check, Deployment]]
) -> None:
    """Start the continuity checks among ``cases`` in the background now, where the
    backend lets them run beside other checks (:attr:`Backend.windows_beside_checks`);
    the others run in their turn."""
    if not backend.windows_beside_checks:
        return
    for chk, dep in cases:
        key = _window_key(chk, dep)
        if chk.continuity and skip_reason(chk, backend) is None and not windows.started(key):
            windows.start(key, f"{chk.id}[{dep.namespace}]", _run(chk, backend, dep))


def close_windows(windows: AttemptWindows, dep: Deployment | None = None) -> None:
    """Stop and join the windows of ``dep`` (default: every one), read or not."""
    keys = None if dep is None else [(c.id, dep.namespace) for c in CHECKS if c.continuity]
    windows.stop(keys)


def _run(chk: Check, backend: Backend, dep: Deployment) -> Callable[[], Attempt]:
    return lambda: attempt(chk, backend, dep)


def attempt(
    chk: Check, backend: Backend, dep: Deployment, windows: AttemptWindows | None = None
) -> Attempt:
    """Run ``chk`` on ``dep``, or skip it with the reason; exceptions other than
    :class:`CheckFailed` (the environment broke, not the mesh) propagate. A window
    opened for it in ``windows`` is awaited instead (its duration counted from its
    start)."""
    if windows is not None and windows.started(_window_key(chk, dep)):
        return windows.result(_window_key(chk, dep))
    started = time.monotonic()
    reason = skip_reason(chk, backend)
    if reason is not None:
        return Attempt(Status.SKIP, reason)
    try:
        measured = chk.run(backend, dep)
    except CheckFailed as exc:
        took = time.monotonic() - started
        return Attempt(Status.FAIL, exc.message, exc.observed, duration_s=took, failure=exc)
    return Attempt(Status.PASS, measured=measured, duration_s=time.monotonic() - started)


def judged(
    unit: RunUnit,
    chk: Check,
    version: str,
    status: Status,
    message: str,
    observed: Collection[str] = (),
    *,
    duration_s: float = 0.0,
    nodeid: str = "",
    diagnostics: str = "",
) -> CheckOutcome:
    """The outcome of ``chk`` on ``unit``: its PASS / FAIL / SKIP judged by
    :func:`~securemetrics_e2e.knowngaps.judge` at Istio ``version``."""
    scenario, mode, variant = unit.scenario.name, unit.mtls_mode.value, unit.variant.id.value
    verdict = judge(
        scenario=scenario,
        mode=mode,
        variant=variant,
        check=chk.id,
        version=version,
        status=status,
        message=message,
        observed=observed,
    )
    failed = verdict.status is Status.FAIL
    return CheckOutcome(
        scenario=scenario,
        mode=mode,
        variant=variant,
        check=chk.id,
        status=verdict.status,
        message=verdict.message,
        code=chk.code if failed or verdict.status is Status.KNOWN_GAP else "",
        profile=unit.scenario.profile.value,
        duration_s=duration_s,
        diagnostics=diagnostics if failed else "",
        nodeid=nodeid,
        gap=verdict.gap,
        fix_of=fix_of(scenario, mode, variant),
    )


def run_checks(
    backend: Backend, dep: Deployment, version: str = "", only: Collection[str] = ()
) -> list[CheckOutcome]:
    """Every check that applies to ``dep``'s scenario (``only``: those of these ids), as
    outcomes mapped through the known-gap table at Istio ``version`` (default: the
    backend's)."""
    version = version or backend.describe().get("istio_version", "")
    chosen = [c for c in CHECKS if c.applies_to(dep.scenario) and (not only or c.id in only)]
    outcomes = []
    windows = AttemptWindows()
    try:
        open_windows(windows, backend, [(chk, dep) for chk in chosen])
        for chk in chosen:
            seen = attempt(chk, backend, dep, windows)
            outcomes.append(
                judged(
                    dep.unit,
                    chk,
                    version,
                    seen.status,
                    seen.message,
                    seen.observed,
                    duration_s=seen.duration_s,
                )
            )
    finally:
        close_windows(windows)
    return outcomes
