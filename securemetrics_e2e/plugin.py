"""pytest plugin: options, the backend and deployment fixtures, and the verdict.

The conformance test (``scenarios/test_conformance.py``) asks for ``run_check``; the
plugin generates one item per run unit (scenario x mTLS mode x configuration variant) of
the selected scenarios and check of the registry (:mod:`securemetrics_e2e.checks`) that
applies to it, deploys each unit once on the chosen backend, runs the check through the
one runner (:mod:`securemetrics_e2e.runner`) and records its outcome, mapped through the
known-gap table (KNOWN-GAP, FIXED). At the end it prints the status of every unit with
the reason and one closing verdict line. Continuity windows (rotation, upgrade) open in
the background when the fleet is deployed, where the backend allows it, and their items
read the result (:mod:`securemetrics_e2e.windows`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Collection, Generator, Iterator
from pathlib import Path

import pytest

from securemetrics_e2e import progress, signals, timeouts
from securemetrics_e2e.applicability import unit_skip_reason
from securemetrics_e2e.backend import Backend, Deployment
from securemetrics_e2e.backends import BACKENDS, NAMES, backend_entry
from securemetrics_e2e.catalog import RunUnit, Scenario, chosen_scenarios
from securemetrics_e2e.checkbase import Check, CheckFailed
from securemetrics_e2e.checks import CHECKS, CheckSelection
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.results import RunResult, Status
from securemetrics_e2e.runner import (
    Attempt,
    AttemptWindows,
    attempt,
    close_windows,
    judged,
    open_windows,
)
from securemetrics_e2e.timeouts import TIMEOUTS

_RESULT_KEY = pytest.StashKey[RunResult]()
_RESTORE_SIGNALS_KEY = pytest.StashKey[Callable[[], None]]()
_SESSION_KEY = pytest.StashKey[pytest.Session]()
_ATTEMPT_KEY = pytest.StashKey[Attempt]()
#: the exit status of a run whose report cannot be written: an error, never "not conformant"
EXIT_OUTPUT_FAILED = 2


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("securemetrics-e2e")
    group.addoption(
        "--sm-backend",
        default="local",
        choices=NAMES,
        help="where the conformance scenarios run (default: local): "
        + "; ".join(f"{e.name}: {e.description}" for e in BACKENDS.values()),
    )
    group.addoption(
        "--istio-version",
        default=None,
        help="Istio version to test, e.g. 1.31.1 or 1.30 (default: the latest supported)",
    )
    group.addoption(
        "--upgrade-from",
        default=None,
        help="the upgrade scenario starts on this Istio version, one minor before "
        "--istio-version (default: the previous minor's latest patch); on a cluster it "
        "makes the run an upgrade run, which deploys only the upgrade scenario",
    )
    group.addoption(
        "--scenario",
        action="append",
        default=[],
        help="run only this scenario (repeatable); default: all",
    )
    group.addoption(
        "--check",
        action="append",
        default=[],
        help="run only this check (id or SMC code; repeatable, or comma-separated); the "
        "others are reported as skipped",
    )
    group.addoption(
        "--skip-check",
        action="append",
        default=[],
        help="leave this check out (id or SMC code; repeatable, or comma-separated): "
        "reported as skipped with the reason",
    )
    group.addoption(
        "--timeout",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="override a named timeout (repeatable); names: "
        + ", ".join(f"{t.name} ({t.bounds})" for t in TIMEOUTS),
    )
    group.addoption(
        "--sm-report",
        default=None,
        help="write the conformance report here (.json or .yaml)",
    )
    # the distribution under test, as `securemetrics-e2e run` takes it (--org, ...)
    from securemetrics_e2e.selection import DISTRIBUTION_OPTIONS

    for flag, what in DISTRIBUTION_OPTIONS.items():
        group.addoption(
            f"--sm-{flag}",
            default=None,
            action="append" if flag == "contact" else "store",
            help=f"report: {what}",
        )
    for entry in BACKENDS.values():
        entry.add_options(group)


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """Bad input is one line and exit 2, before anything starts; ``--plan``: print what a
    cluster run would do, touch nothing, run no test."""
    try:
        check_selection(config)
        timeouts.parse(config.getoption("--timeout"))
    except UsageError as exc:
        sys.stderr.write(f"securemetrics-e2e: {exc}\n")
        return 2
    if not config.getoption("--plan", default=False):
        return None
    if config.getoption("--sm-backend") == "local":
        sys.stderr.write(
            "securemetrics-e2e: --plan describes a cluster run: add --sm-backend kind\n"
        )
        return 2
    from securemetrics_e2e.cluster.pytestglue import print_plan

    try:
        print_plan(config, istio_version(config))
    except SecureMetricsError as exc:
        sys.stderr.write(f"securemetrics-e2e: {exc}\n")
        return 2
    return 0


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULT_KEY] = RunResult()
    path = config.getoption("--sm-report", default=None)
    if path:
        from securemetrics_e2e.outputs import check_writable, report_format

        try:  # fail now, not after a ten-minute run
            report_format(Path(path))
            check_writable(Path(path), "--sm-report")
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None
    # SIGTERM / SIGHUP (CI cancellation, timeout, a closed terminal) end the session as
    # Ctrl-C does: through the fixtures' teardown, which stops the mesh
    config.stash[_RESTORE_SIGNALS_KEY] = signals.install()


def pytest_keyboard_interrupt(excinfo: pytest.ExceptionInfo[BaseException]) -> None:
    # the session ends now, through teardown: no checkpoint may raise the stop again
    signals.take()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # before each test: a stop signal a finalizer swallowed still ends the run
    signals.checkpoint()


def pytest_unconfigure(config: pytest.Config) -> None:
    restore = config.stash.get(_RESTORE_SIGNALS_KEY, None)
    if restore is not None:
        restore()


def istio_version(config: pytest.Config) -> str:
    from securemetrics_e2e.versions import DEFAULT_VERSION, check_released, resolve

    text = config.getoption("--istio-version")
    if text is None:
        return str(DEFAULT_VERSION)
    version = resolve(text)  # "" is an error (an unset variable), not the default
    check_released(version, custom_build=bool(config.getoption("--istio-tag", default=None)))
    return str(version)


def check_selection(config: pytest.Config) -> CheckSelection:
    """The checks ``--check`` / ``--skip-check`` select; UsageError naming a bad one."""
    return CheckSelection(config.getoption("--check"), config.getoption("--skip-check"))


def selected_units(config: pytest.Config) -> list[RunUnit]:
    """The run units of the selected scenarios that have a check to run."""
    units = [u for s in _scenarios(config) for u in s.run_units()]
    return [u for u in units if any(runs for _, runs in cases_of(u, check_selection(config)))]


def cases_of(unit: RunUnit, selection: CheckSelection) -> list[tuple[Check, bool]]:
    """The checks of the registry that apply to ``unit``, each with whether the selection
    runs it (a check left out is still reported: skipped, with the reason)."""
    return [(c, selection.reason(c) is None) for c in CHECKS if c.applies_to(unit.scenario)]


def make_backend(config: pytest.Config) -> Backend:
    """The backend ``--sm-backend`` names, from the backend registry."""
    return backend_entry(config.getoption("--sm-backend")).create(config, istio_version(config))


@pytest.fixture(scope="session")
def sm_backend(pytestconfig: pytest.Config) -> Iterator[Backend]:
    """The backend the conformance scenarios run on, closed at the end of the session."""
    try:
        backend = make_backend(pytestconfig)
    except SecureMetricsError as exc:
        pytest.exit(f"securemetrics-e2e: {exc}", returncode=2)
    timeouts.apply(backend, timeouts.parse(pytestconfig.getoption("--timeout")))
    run_result(pytestconfig).backend_features = frozenset(f.value for f in backend.features)
    try:
        yield backend
    finally:
        run_result(pytestconfig).environment.update(backend.describe())
        backend.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One item per run unit and registered check that applies to it (``sm_check``)."""
    if "sm_check" not in metafunc.fixturenames:
        return
    try:
        selection = check_selection(metafunc.config)
        units = [u for s in _scenarios(metafunc.config) for u in s.run_units()]
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    params = []
    for unit in units:
        for chk, _ in cases_of(unit, selection):
            left_out = selection.reason(chk)
            marks = () if left_out is None else (pytest.mark.skip(reason=left_out),)
            item = _CheckParam(chk)
            params.append(pytest.param(unit, item, marks=marks, id=f"{unit.id}-{chk.id}"))
    if not params:
        params = [pytest.param(None, None, marks=pytest.mark.skip(reason="no check"), id="none")]
    metafunc.parametrize(("deployment", "sm_check"), params, indirect=True, scope="session")


@dataclasses.dataclass(frozen=True, eq=False)
class _CheckParam:
    """An item's check, as a parameter equal only to itself: pytest groups items by equal
    session-scoped parameters, and must group them by run unit (one deployment each), not
    by check."""

    check: Check

    @property
    def id(self) -> str:
        return self.check.id


def _scenarios(config: pytest.Config) -> list[Scenario]:
    return chosen_scenarios(config.getoption("--scenario"))


class Fleet:
    """The selected run units: deployed together on first use, each removed when its
    tests end.

    Deploying every unit at once lets Prometheus discover them in one go (its
    discovery manager sends updates at most every 5 s) and lets a cluster roll the
    units' namespaces out side by side. A unit the backend defers (it would
    change what another holds, e.g. the classic ingress gateway) is deployed when its
    tests come, after pytest has released the other.

    The continuity windows among ``windowed`` (run unit, check id: the items that will
    run) open as soon as their unit is deployed (:mod:`securemetrics_e2e.windows`), so
    they overlap each other and the other units' checks; their items read the result.
    A window is stopped and joined before its unit is torn down, read or not.
    """

    def __init__(
        self,
        backend: Backend,
        units: list[RunUnit],
        version: str,
        windowed: Collection[tuple[RunUnit, str]] = (),
    ) -> None:
        self.backend = backend
        self.units = units
        self.version = version
        self.windowed = frozenset(windowed)
        self.windows = AttemptWindows()
        self._state: dict[RunUnit, Deployment | SecureMetricsError | str] | None = None

    def _deploy(self, units: list[RunUnit]) -> None:
        assert self._state is not None
        runnable = []
        for u in units:
            reason = unit_skip_reason(u, self.backend, self.version)
            if reason is None:
                runnable.append(u)
            else:
                self._state[u] = reason
        if not runnable:
            return
        label = runnable[0].id if len(runnable) == 1 else "all selected run units"
        with progress.timed(label, progress.Phase.DEPLOY):
            results = self.backend.deploy_many(runnable)
        for u in runnable:
            outcome = results.get(u.key)
            if outcome is not None:
                self._state[u] = outcome
        deployed = [d for u in runnable if isinstance(d := self._state.get(u), Deployment)]
        cases = [
            (c, d)
            for d in deployed
            for c in CHECKS
            if c.applies_to(d.scenario) and (d.unit, c.id) in self.windowed
        ]
        open_windows(self.windows, self.backend, cases)

    def get(self, unit: RunUnit) -> Deployment:
        if self._state is None:
            self._state = {}
            self._deploy(self.units)
        if unit not in self._state:
            self._deploy([unit])  # deferred until now
        state = self._state.get(unit)
        if state is None:
            raise SecureMetricsError(
                f"{unit.id} could not be deployed: it conflicts with a run unit still deployed"
            )
        if isinstance(state, str):
            pytest.skip(state)
        if isinstance(state, BaseException):
            raise state
        return state

    def release(self, unit: RunUnit) -> None:
        """Tear ``unit`` down: pytest is done with its tests."""
        state = (self._state or {}).pop(unit, None)
        if isinstance(state, Deployment):
            try:
                close_windows(self.windows, state)
            finally:
                self.backend.teardown(state)
        if self._state is not None and state is not None:
            self._state[unit] = "already torn down"

    def close(self) -> None:
        try:
            close_windows(self.windows)
        finally:
            for state in (self._state or {}).values():
                if isinstance(state, Deployment):
                    self.backend.teardown(state)


def _will_run(items: list[pytest.Item]) -> set[tuple[RunUnit, str]]:
    """(run unit, check id) of the collected conformance items not marked to skip."""
    found = set()
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        unit, param = params.get("deployment"), params.get("sm_check")
        runs = item.get_closest_marker("skip") is None
        if runs and isinstance(unit, RunUnit) and isinstance(param, _CheckParam):
            found.add((unit, param.check.id))
    return found


@pytest.fixture(scope="session")
def sm_fleet(request: pytest.FixtureRequest, sm_backend: Backend) -> Iterator[Fleet]:
    config = request.config
    fleet = Fleet(
        sm_backend,
        selected_units(config),
        istio_version(config),
        windowed=_will_run(request.session.items),
    )
    try:
        yield fleet
    finally:
        fleet.close()


@pytest.fixture(scope="session")
def deployment(request: pytest.FixtureRequest, sm_fleet: Fleet) -> Iterator[Deployment]:
    """The run unit of this test, deployed (with all the others) once per session.

    pytest orders tests so that each unit's tests run together and finalizes this
    fixture when it moves on: that is when the unit is torn down.
    """
    unit: RunUnit = request.param
    try:
        yield sm_fleet.get(unit)
    finally:
        sm_fleet.release(unit)


@pytest.fixture(scope="session")
def sm_check(request: pytest.FixtureRequest) -> Check:
    """The registered check of this item (parametrized by :func:`pytest_generate_tests`)."""
    param: _CheckParam = request.param
    return param.check


@pytest.fixture
def run_check(
    request: pytest.FixtureRequest,
    sm_backend: Backend,
    sm_fleet: Fleet,
    deployment: Deployment,
    sm_check: Check,
) -> Callable[[], None]:
    """The item's check bound to its deployment, run through the one runner.

    The test body calls it, so a misbehaving mesh is a test FAILURE (not a setup error)
    and the check's time is the test's time.
    """

    def run() -> None:
        with progress.heartbeat(deployment.unit.id):  # a rotation or upgrade window runs long
            seen = attempt(sm_check, sm_backend, deployment, sm_fleet.windows)
        request.node.stash[_ATTEMPT_KEY] = seen
        if seen.status is Status.SKIP:
            pytest.skip(seen.message)
        if seen.failure is not None:
            raise seen.failure
        _record_continuity(request.config, deployment, seen.measured)

    return run


def _record_continuity(config: pytest.Config, deployment: Deployment, measured: object) -> None:
    from securemetrics_e2e.continuity import Continuity

    if isinstance(measured, Continuity):
        records = measured.records(
            deployment.scenario.name, deployment.mtls_mode.value, deployment.variant.id
        )
        run_result(config).continuity.extend(records)


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Generator[None, object, object]:
    """A check's finding (CheckFailed) leaves the test body without its traceback:
    pytest_runtest_makereport below replaces the report of a finding with the finding
    itself, so pytest need not render the source of frames nobody reads (this frame is
    hidden, pytest's and pluggy's are filtered). Rendering them parsed every module on
    the way and scanned every loaded module's path, a good part of a second of CPU per
    run with failed or known-gap checks. Other exceptions keep their traceback."""
    __tracebackhide__ = True  # read by pytest from this frame
    try:
        return (yield)
    except CheckFailed as exc:
        raise exc.with_traceback(None) from None


@pytest.hookimpl(wrapper=True, trylast=True)  # inner: progress reads its sm_status
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return report
    unit, param = callspec.params.get("deployment"), callspec.params.get("sm_check")
    if not isinstance(unit, RunUnit) or not isinstance(param, _CheckParam):
        return report  # not a conformance item, or an empty parameter set
    chk = param.check
    if report.when == "call" or (report.when == "setup" and not report.passed):
        status, message, observed = _seen(item, report, call)
        outcome = judged(
            unit,
            chk,
            istio_version(item.config),
            status,
            message.splitlines()[0] if message else "",
            observed,
            duration_s=report.duration,
            nodeid=item.nodeid,
        )
        exc = call.excinfo.value if call.excinfo is not None else None
        if outcome.status is Status.FAIL:
            diagnostics = _capture(item, message)
            outcome = dataclasses.replace(outcome, diagnostics=diagnostics)
            if isinstance(exc, CheckFailed):
                # the finding says everything: no traceback through the suite's internals
                report.longrepr = str(exc) + (
                    f"\ndiagnostics: {diagnostics}" if diagnostics else ""
                )
        elif outcome.status is Status.KNOWN_GAP:
            # an upstream gap is not this distribution's failure: pytest reports it skipped
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, outcome.message)
        # read by progress; plain strs: under pytest-xdist a report crosses to the
        # controller, whose serializer takes only builtin types (an enum kills the worker)
        report.sm_status = outcome.status.value  # type: ignore[attr-defined]
        report.sm_code = outcome.code or outcome.check  # type: ignore[attr-defined]
        report.sm_message = outcome.message  # type: ignore[attr-defined]
        item.config.stash[_RESULT_KEY].add(outcome)
    return report


def _seen(
    item: pytest.Item, report: pytest.TestReport, call: pytest.CallInfo[None]
) -> tuple[Status, str, tuple[str, ...]]:
    """What the item saw: the runner's attempt, or (a deployment that failed or was
    skipped, an error outside the check) what pytest saw."""
    seen = item.stash.get(_ATTEMPT_KEY, None)
    if seen is not None and report.when == "call":
        return seen.status, seen.message, seen.observed
    if report.skipped:
        longrepr = report.longrepr
        message = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
        return Status.SKIP, message.removeprefix("Skipped: "), ()
    exc = call.excinfo.value if call.excinfo is not None else None
    message = getattr(exc, "message", None) or (str(exc) if exc else str(report.longrepr))
    return Status.FAIL, message, ()


def _capture(item: pytest.Item, message: str) -> str:
    """Diagnostics of the failing variant, captured now: before anything is torn down."""
    funcargs = getattr(item, "funcargs", {})
    backend, deployment = funcargs.get("sm_backend"), funcargs.get("deployment")
    if not isinstance(backend, Backend) or not isinstance(deployment, Deployment):
        return ""
    try:
        path = backend.capture_diagnostics(deployment, message)
    except Exception as exc:  # diagnostics must never hide the failure itself
        return f"(capturing diagnostics failed: {exc})"
    return "" if path is None else str(path)


def run_result(config: pytest.Config) -> RunResult:
    return config.stash[_RESULT_KEY]


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SESSION_KEY] = session
    session.config.stash[_RESULT_KEY].measurements["start"] = time.time()


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    result = config.stash[_RESULT_KEY]
    if not result.outcomes:
        return
    tr = terminalreporter
    tr.section("securemetrics-e2e conformance")
    for status, line in progress.scenario_lines(result):
        tr.write_line(
            line,
            red=status is Status.FAIL,
            green=status is Status.PASS,
            yellow=status is Status.SKIP,
        )
    elapsed = time.time() - result.measurements.get("start", time.time())
    line = progress.verdict_line(
        result,
        backend=config.getoption("--sm-backend"),
        istio_version=istio_version(config),
        elapsed_s=elapsed,
        negative_control=config.getoption("--local-fault") or "",
    )
    tr.write_line(line, bold=True, red=not result.conformant, green=result.conformant)
    # under the CLI (an active progress) the notes were printed and go into its report
    notes = progress.take_notes() if progress.active() is None else []
    for note in notes:  # without the CLI's progress lines nobody printed them yet
        tr.write_line(f"note: {note}")
    path = config.getoption("--sm-report")
    if path:
        from securemetrics_e2e.outputs import OutputFailed
        from securemetrics_e2e.report import Distribution, ReportMeta, write_report

        option = config.getoption
        meta = ReportMeta.from_environment(
            result.environment,
            distribution=Distribution(
                organization=option("--sm-org") or "",
                project=option("--sm-project") or "",
                url=option("--sm-url") or "",
                version=option("--sm-dist-version") or "",
                contact=tuple(option("--sm-contact") or ()),
            ),
            backend=result.environment.get("backend") or option("--sm-backend"),
            istio_version=result.environment.get("istio_version") or istio_version(config),
            notes=tuple(notes),
        )
        try:
            write_report(Path(path), result, meta)
        except OutputFailed as exc:  # the verdict above stands; the report is what failed
            tr.write_line(f"securemetrics-e2e: error: {exc}", red=True)
            config.stash[_SESSION_KEY].exitstatus = EXIT_OUTPUT_FAILED
            return
        tr.write_line(f"report: {path}")
