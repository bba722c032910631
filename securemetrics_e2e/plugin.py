"""pytest plugin: options, the backend and deployment fixtures, and the verdict.

Scenario tests (``scenarios/``) ask for the ``deployment`` fixture; the plugin
parametrizes it with every run unit (scenario x mTLS mode x configuration variant) the
selected scenarios define, deploys each unit once on the chosen backend, and records one
outcome per check, mapped through the known-gap table (KNOWN-GAP, FIXED). At the end it
prints the status of every unit with the reason and one closing verdict line.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from securemetrics_e2e import progress, signals
from securemetrics_e2e.applicability import skip_reason as skip_reason_for
from securemetrics_e2e.backend import Backend, Deployment
from securemetrics_e2e.catalog import SCENARIOS, RunUnit, scenario
from securemetrics_e2e.checks import Check, CheckFailed, check, skip_reason
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.knowngaps import checked
from securemetrics_e2e.results import RunResult, Status

_RESULT_KEY = pytest.StashKey[RunResult]()
_RESTORE_SIGNALS_KEY = pytest.StashKey[Callable[[], None]]()
_SESSION_KEY = pytest.StashKey[pytest.Session]()
#: the exit status of a run whose report cannot be written: an error, never "not conformant"
EXIT_OUTPUT_FAILED = 2


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("securemetrics-e2e")
    group.addoption(
        "--sm-backend",
        default="local",
        choices=("local", "kind", "existing"),
        help="where the conformance scenarios run (default: local)",
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
        "--local-network",
        default="auto",
        choices=("auto", "netns", "loopback"),
        help="local backend pods: network namespaces, or 127.0.0.0/8 addresses (default: auto)",
    )
    group.addoption(
        "--local-fault",
        default=None,
        help="negative control: deploy the local mesh with this seeded misconfiguration "
        "(the run must then be NOT CONFORMANT); see securemetrics_e2e.local.faults",
    )
    group.addoption(
        "--sm-report",
        default=None,
        help="write the conformance report here (.json or .yaml)",
    )
    # the distribution under test, as `securemetrics-e2e run` takes it (--org, ...)
    from securemetrics_e2e.report import DISTRIBUTION_OPTIONS

    for flag, what in DISTRIBUTION_OPTIONS.items():
        group.addoption(
            f"--sm-{flag}",
            default=None,
            action="append" if flag == "contact" else "store",
            help=f"report: {what}",
        )
    try:
        from securemetrics_e2e.cluster.backend import add_cluster_options
    except ImportError:  # the cluster backend is optional at import time
        return
    add_cluster_options(group)


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--plan``: print what a cluster run would do, touch nothing, run no test."""
    if not config.getoption("--plan", default=False):
        return None
    if config.getoption("--sm-backend") == "local":
        sys.stderr.write(
            "securemetrics-e2e: --plan describes a cluster run: add --sm-backend kind\n"
        )
        return 2
    from securemetrics_e2e.cluster.backend import print_plan

    try:
        print_plan(config, istio_version(config))
    except SecureMetricsError as exc:
        sys.stderr.write(f"securemetrics-e2e: {exc}\n")
        return 2
    return 0


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_RESULT_KEY] = RunResult()
    config.addinivalue_line("markers", "check(id): the conformance check a scenario test performs")
    path = config.getoption("--sm-report", default=None)
    if path:
        from securemetrics_e2e.outputs import check_writable
        from securemetrics_e2e.report import report_format

        try:  # fail now, not after a ten-minute run
            report_format(Path(path))
            check_writable(Path(path), "--sm-report")
        except UsageError as exc:
            raise pytest.UsageError(str(exc)) from None
    # SIGTERM / SIGHUP (CI cancellation, timeout, a closed terminal) end the session as
    # Ctrl-C does: through the fixtures' teardown, which stops the mesh
    config.stash[_RESTORE_SIGNALS_KEY] = signals.install()


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


def unit_skip_reason(unit: RunUnit, backend: Backend, version: str) -> str | None:
    """Why ``unit`` cannot run on ``backend`` at ``version``, or None when it can."""
    return backend.scope_reason(unit.scenario) or skip_reason_for(
        unit,
        backend=backend.name,
        backend_features=backend.features,
        version=version,
    )


def selected_units(config: pytest.Config) -> list[RunUnit]:
    names = [n for opt in config.getoption("--scenario") for n in opt.split(",") if n]
    chosen = [scenario(n) for n in names] if names else list(SCENARIOS)
    return [u for s in chosen for u in s.run_units()]


def make_backend(config: pytest.Config) -> Backend:
    kind = config.getoption("--sm-backend")
    version = istio_version(config)
    if kind == "local":
        from securemetrics_e2e.local.backend import LocalBackend
        from securemetrics_e2e.local.faults import Fault

        fault_name = config.getoption("--local-fault")
        try:
            fault = Fault(fault_name) if fault_name else None
        except ValueError:
            known = ", ".join(f.value for f in Fault)
            raise UsageError(
                f"unknown --local-fault {fault_name!r}; known faults: {known}"
            ) from None
        artifacts = config.getoption("--sm-artifacts", default=None) or "artifacts"
        return LocalBackend(
            network=config.getoption("--local-network"),
            istio_version=version,
            upgrade_from=config.getoption("--upgrade-from"),
            fault=fault,
            artifacts_dir=Path(artifacts),
        )
    from securemetrics_e2e.cluster.backend import backend_from_pytest

    backend: Backend = backend_from_pytest(config, version)
    return backend


@pytest.fixture(scope="session")
def sm_backend(pytestconfig: pytest.Config) -> Iterator[Backend]:
    """The backend the conformance scenarios run on, closed at the end of the session."""
    try:
        backend = make_backend(pytestconfig)
    except SecureMetricsError as exc:
        pytest.exit(f"securemetrics-e2e: {exc}", returncode=2)
    try:
        yield backend
    finally:
        run_result(pytestconfig).environment.update(backend.describe())
        backend.close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "deployment" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("check")
    chk = check(marker.args[0]) if marker else None
    try:
        units = selected_units(metafunc.config)
    except UsageError as exc:
        raise pytest.UsageError(str(exc)) from None
    if chk is not None:
        units = [u for u in units if chk.applies_to(u.scenario)]
    if not units:
        reason = f"check {chk.id if chk else '?'} applies to none of the selected scenarios"
        metafunc.parametrize(
            "deployment",
            [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="none")],
            indirect=True,
            scope="session",
        )
        return
    metafunc.parametrize(
        "deployment", units, indirect=True, scope="session", ids=[u.id for u in units]
    )


class Fleet:
    """The selected run units: deployed together on first use, each removed when its
    tests end.

    Deploying every unit at once lets Prometheus discover them in one go (its
    discovery manager sends updates at most every 5 s) and lets a cluster roll the
    units' namespaces out side by side. A unit the backend defers (it would
    change what another holds, e.g. the classic ingress gateway) is deployed when its
    tests come, after pytest has released the other.
    """

    def __init__(self, backend: Backend, units: list[RunUnit], version: str) -> None:
        self.backend = backend
        self.units = units
        self.version = version
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
            self.backend.teardown(state)
        if self._state is not None and state is not None:
            self._state[unit] = "already torn down"

    def close(self) -> None:
        for state in (self._state or {}).values():
            if isinstance(state, Deployment):
                self.backend.teardown(state)


@pytest.fixture(scope="session")
def sm_fleet(pytestconfig: pytest.Config, sm_backend: Backend) -> Iterator[Fleet]:
    fleet = Fleet(sm_backend, selected_units(pytestconfig), istio_version(pytestconfig))
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


@pytest.fixture
def run_check(
    request: pytest.FixtureRequest, sm_backend: Backend, deployment: Deployment
) -> Callable[[], None]:
    """The check named by the test's ``check`` marker, bound to its deployment.

    The test body calls it, so a misbehaving mesh is a test FAILURE (not a setup error)
    and the check's time is the test's time.
    """
    marker = request.node.get_closest_marker("check")
    if marker is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses run_check without a check marker")
    chk: Check = check(marker.args[0])
    reason = skip_reason(chk, sm_backend)
    if reason is not None:
        pytest.skip(reason)

    def run() -> None:
        label = deployment.unit.id
        with progress.heartbeat(label):  # a rotation or upgrade window runs for seconds
            measured = chk.run(sm_backend, deployment)
        _record_continuity(request.config, deployment, measured)

    return run


def _record_continuity(config: pytest.Config, deployment: Deployment, measured: object) -> None:
    from securemetrics_e2e.continuity import Continuity

    if isinstance(measured, Continuity):
        records = measured.records(
            deployment.scenario.name, deployment.mtls_mode.value, deployment.variant.id
        )
        run_result(config).continuity.extend(records)


@pytest.hookimpl(wrapper=True, trylast=True)  # inner: progress reads its sm_status
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    callspec = getattr(item, "callspec", None)
    marker = item.get_closest_marker("check")
    if marker is None or callspec is None or "deployment" not in callspec.params:
        return report
    unit = callspec.params["deployment"]
    if not isinstance(unit, RunUnit):  # an empty parameter set: no run unit to report
        return report
    if report.when == "call" or (report.when == "setup" and not report.passed):
        observed: tuple[str, ...] = ()
        exc = call.excinfo.value if call.excinfo is not None else None
        if report.passed:
            status, message = Status.PASS, ""
        elif report.skipped:
            status = Status.SKIP
            longrepr = report.longrepr
            message = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
            message = message.removeprefix("Skipped: ")
        else:
            status = Status.FAIL
            message = getattr(exc, "message", None) or (str(exc) if exc else str(report.longrepr))
            if isinstance(exc, CheckFailed):
                observed = exc.observed
        chk = check(marker.args[0])
        outcome = checked(
            unit,
            chk,
            istio_version(item.config),
            status,
            message.splitlines()[0] if message else "",
            observed,
            duration_s=report.duration,
            nodeid=item.nodeid,
        )
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
        # a plain str: under pytest-xdist a report crosses to the controller, whose
        # serializer takes only builtin types (an enum there kills the worker)
        report.sm_status = outcome.status.value  # type: ignore[attr-defined]  # read by progress
        item.config.stash[_RESULT_KEY].add(outcome)
    return report


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
