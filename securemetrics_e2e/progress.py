"""Live progress of a run on the terminal: one line per scenario phase, then the verdict.

A conformance run on a cluster takes minutes; a silent terminal looks hung. Each line says
when (seconds since the run started), which run unit (scenario[MODE/variant]), which
phase (deploy, wait, probe, verify), how it ended and how long the phase took::

    [   2.41s] native-sidecar[PERMISSIVE/as-documented]    deploy  PASS         2.31s
    [   3.02s] native-sidecar[PERMISSIVE/as-documented]    probe   PASS         0.58s  6 checks
    [   4.10s] gateway-api[PERMISSIVE/as-documented]       probe   KNOWN-GAP    0.90s  ...
    [   4.80s] native-sidecar[STRICT/exclude-capture]      -       SKIP         backend local ...

Producers do not need to know whether anybody listens: :func:`emit` and :func:`timed`
do nothing unless a :class:`Progress` is active (the CLI activates one for ``run``).
:class:`ProgressPlugin` turns the check results pytest reports into probe / verify lines.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import pytest

from securemetrics_e2e.catalog import SCENARIOS
from securemetrics_e2e.results import RunResult, Status
from securemetrics_e2e.waiting import waiting_on


class Phase(enum.StrEnum):
    DEPLOY = "deploy"  # render / apply / start what the scenario needs
    WAIT = "wait"  # wait for proxies, certificates and the scraper to be ready
    PROBE = "probe"  # the suite's own probes: listeners, mTLS, plaintext, credentials
    VERIFY = "verify"  # what Prometheus itself scraped


#: checks answered by Prometheus' own view of its targets; every other check is a probe
_VERIFY_PREFIX = "targets-up"


def phase_of(check_id: str) -> Phase:
    return Phase.VERIFY if check_id.startswith(_VERIFY_PREFIX) else Phase.PROBE


_COLOURS = {
    Status.PASS: "32",
    Status.FAIL: "31",
    Status.SKIP: "33",
    Status.KNOWN_GAP: "35",
    Status.FIXED: "36",
}


class Progress:
    """Writes progress lines to a terminal stream (stdout by default)."""

    def __init__(
        self, stream: TextIO | None = None, *, start: float | None = None, colour: bool = False
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.start = time.monotonic() if start is None else start
        self.colour = colour
        self.lines = 0
        #: seconds reported for deploy and wait phases, so check timings can leave them out
        self.setup_seconds = 0.0
        self._lock = threading.Lock()  # heartbeats write from their own thread

    @classmethod
    def for_terminal(cls, stream: TextIO | None = None) -> Progress:
        """Colour only on a terminal, and never when NO_COLOR is set (no-color.org)."""
        out = stream if stream is not None else sys.stdout
        tty = hasattr(out, "isatty") and out.isatty()
        return cls(out, colour=tty and "NO_COLOR" not in os.environ)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def status_text(self, status: Status) -> str:
        text = f"{status.value:9}"
        return f"\x1b[{_COLOURS[status]}m{text}\x1b[0m" if self.colour else text

    def write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text + "\n")
            self.stream.flush()
            self.lines += 1

    def phase(
        self,
        variant: str,
        phase: Phase | str,
        elapsed_s: float | None,
        status: Status = Status.PASS,
        detail: str = "",
    ) -> None:
        """One line: ``variant`` finished ``phase`` with ``status`` after ``elapsed_s``."""
        if phase in (Phase.DEPLOY, Phase.WAIT) and elapsed_s is not None:
            self.setup_seconds += elapsed_s
        took = f"{elapsed_s:7.2f}s" if elapsed_s is not None else " " * 8
        when = f"[{self.elapsed():8.2f}s]"
        line = f"{when} {variant:<44} {phase!s:<7} {self.status_text(status)} {took}"
        if detail:
            line += f"  {detail}"
        self.write(line.rstrip())

    def message(self, text: str) -> None:
        self.write(text)

    @contextlib.contextmanager
    def activated(self) -> Iterator[Progress]:
        """Make this the progress that :func:`emit` and :func:`timed` write to."""
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.remove(self)


#: the activated progresses, innermost last (a stack, so nested activations unwind cleanly)
_ACTIVE: list[Progress] = []


def active() -> Progress | None:
    return _ACTIVE[-1] if _ACTIVE else None


def emit(
    variant: str,
    phase: Phase | str,
    elapsed_s: float | None,
    status: Status = Status.PASS,
    detail: str = "",
) -> None:
    """Report a finished phase to the active :class:`Progress`; nothing when none is active."""
    progress = active()
    if progress is not None:
        progress.phase(variant, phase, elapsed_s, status, detail)


#: notes about the run said on the terminal (e.g. what a sweep removed), kept for the report
_RUN_NOTES: list[str] = []


def note(text: str) -> None:
    """A note about the whole run: printed by the active :class:`Progress`, kept for the report."""
    _RUN_NOTES.append(text)
    progress = active()
    if progress is not None:
        progress.message(f"note: {text}")


def take_notes() -> list[str]:
    """The run notes since the last call (each run reports its own)."""
    notes = list(_RUN_NOTES)
    _RUN_NOTES.clear()
    return notes


#: seconds between two heartbeat lines of a long-running step
HEARTBEAT_S = 5.0


@contextlib.contextmanager
def heartbeat(label: str, interval: float = HEARTBEAT_S) -> Iterator[None]:
    """While the body runs, say every ``interval`` seconds what it is waiting for.

    A rotation or upgrade window runs for many seconds; a silent terminal looks hung.
    Nothing is printed for a body shorter than ``interval``, or with no active progress.
    """
    progress = active()
    if progress is None:
        yield
        return
    stop = threading.Event()
    started = time.monotonic()

    def beat() -> None:
        while not stop.wait(interval):  # wakes at once when the body ends
            what = waiting_on() or "the step to finish"
            took = time.monotonic() - started
            progress.write(
                f"[{progress.elapsed():8.2f}s] {label:<30} {took:4.0f}s: waiting for {what}"
            )

    thread = threading.Thread(target=beat, name=f"heartbeat-{label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc) or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def timed(variant: str, phase: Phase | str, detail: str = "") -> Iterator[None]:
    """Time the body and :func:`emit` it: PASS when it returns, FAIL (re-raised) when it raises."""
    started = time.monotonic()
    try:
        yield
    except BaseException as exc:
        emit(variant, phase, time.monotonic() - started, Status.FAIL, _first_line(exc))
        raise
    emit(variant, phase, time.monotonic() - started, Status.PASS, detail)


# ------------------------------------------------------------------ pytest integration


@dataclass
class _Group:
    """The checks of one variant in one phase; a line is written when the last one reports."""

    variant: str
    phase: Phase
    pending: int
    statuses: list[Status] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def status(self) -> Status:
        for status in (Status.FAIL, Status.KNOWN_GAP, Status.FIXED, Status.PASS):
            if status in self.statuses:
                return status
        return Status.SKIP

    def detail(self) -> str:
        n = len(self.statuses)
        counted = f"{n} check{'s' if n != 1 else ''}"
        if self.status is Status.FAIL:
            return f"{counted}; failed: {', '.join(dict.fromkeys(self.codes))}"
        if self.status is Status.SKIP:
            return self.reasons[0] if self.reasons else counted
        counts = {s: self.statuses.count(s) for s in (Status.KNOWN_GAP, Status.FIXED, Status.SKIP)}
        words = {
            Status.KNOWN_GAP: "known gap" if counts[Status.KNOWN_GAP] == 1 else "known gaps",
            Status.FIXED: "fixed",
            Status.SKIP: "skipped",
        }
        extra = [f"{n} {words[s]}" for s, n in counts.items() if n]
        return ", ".join([counted, *extra])


def _check_id(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("check")
    return str(marker.args[0]) if marker and marker.args else None


def _variant_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    param = callspec.params.get("deployment") if callspec is not None else None
    vid = getattr(param, "id", None)
    return vid if isinstance(vid, str) else None


class ProgressPlugin:
    """A pytest plugin writing probe / verify lines per variant, and capturing run errors.

    Registered by the CLI (``pytest.main(..., plugins=[ProgressPlugin(progress)])``).
    Deploy and wait lines come from whoever deploys, through :func:`emit` / :func:`timed`;
    until that is wired, the first deployment's setup time is reported as one deploy line.
    """

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self._groups: dict[tuple[str, Phase], _Group] = {}
        self._variant_groups: dict[str, list[_Group]] = {}
        self._item_group: dict[str, _Group] = {}
        self._deploy_seen = False
        self._backend: Any = None
        self._setup_seconds_before = 0.0
        self._setup_took: dict[str, float] = {}
        self._lines_at_start = 0
        self.errors: list[str] = []
        self.environment_problems: list[str] = []
        self.backend_description: dict[str, str] = {}
        self.collected = 0

    # collection: know how many checks each (variant, phase) group waits for
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self._lines_at_start = self.progress.lines
        for item in session.items:
            check_id, vid = _check_id(item), _variant_of(item)
            if check_id is None or vid is None:
                continue
            self.collected += 1
            key = (vid, phase_of(check_id))
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(vid, key[1], 0)
                self._variant_groups.setdefault(vid, []).append(group)
            group.pending += 1
            self._item_group[item.nodeid] = group

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            text = str(report.longrepr).strip().splitlines()
            self.errors.append(f"collecting {report.nodeid or 'the scenarios'}: {text[-1]}")

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, object, object]:
        value = yield
        if fixturedef.argname == "sm_backend" and hasattr(value, "describe"):
            self._backend = value
        return value

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._setup_seconds_before = self.progress.setup_seconds

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        exc = call.excinfo.value if call.excinfo is not None else None
        from securemetrics_e2e.errors import EnvironmentProblem

        if isinstance(exc, EnvironmentProblem):
            problem = _first_line(exc)
            if problem not in self.environment_problems:
                self.environment_problems.append(problem)
        if report.when == "setup":
            # A check runs in its fixture's setup; deployments reported through emit() /
            # timed() during that setup are theirs, not the check's.
            took = report.duration - (self.progress.setup_seconds - self._setup_seconds_before)
            # only a setup that deployed counts: a test skipped before any deployment (a
            # check applying to none of the selected scenarios) would print a second line
            deployed = _variant_of(item) is not None and not report.skipped
            if deployed and not self._deploy_seen:
                self._deploy_seen = True
                if self.progress.lines == self._lines_at_start:
                    # nobody reported deployments: the first setup deployed every variant
                    status = Status.FAIL if report.failed else Status.PASS
                    self.progress.phase("all selected run units", Phase.DEPLOY, took, status)
                    took = 0.0
            self._setup_took[item.nodeid] = max(took, 0.0)
        group = self._item_group.get(item.nodeid)
        if group is None:
            return report
        if report.when == "call" or (report.when == "setup" and not report.passed):
            group.seconds += self._setup_took.get(item.nodeid, 0.0)
            if report.when == "call":
                group.seconds += report.duration
            mapped = getattr(report, "sm_status", None)  # through the known-gap table
            if mapped in (Status.KNOWN_GAP, Status.FIXED):
                group.statuses.append(Status(mapped))
            elif report.passed:
                group.statuses.append(Status.PASS)
            elif report.skipped:
                group.statuses.append(Status.SKIP)
                longrepr = report.longrepr
                reason = str(longrepr[2]) if isinstance(longrepr, tuple) else str(longrepr)
                group.reasons.append(reason.removeprefix("Skipped: "))
            else:
                group.statuses.append(Status.FAIL)
                group.codes.append(self._code(item, exc))
            group.pending -= 1
            if group.pending == 0:
                self._group_done(group)
        return report

    @staticmethod
    def _code(item: pytest.Item, exc: BaseException | None) -> str:
        code = getattr(exc, "code", None)
        if isinstance(code, str) and code:
            return code
        return _check_id(item) or "error"

    def _group_done(self, group: _Group) -> None:
        # An all-skipped group waits for its variant: a variant that cannot run here at all
        # gets one line with the reason instead of one per phase.
        groups = self._variant_groups[group.variant]
        if group.status is not Status.SKIP:
            self._write(group)
        if any(g.pending for g in groups):
            return
        skipped = [g for g in groups if g.status is Status.SKIP]
        reasons = {r for g in skipped for r in g.reasons}
        if len(skipped) == len(groups) and len(reasons) == 1:
            self.progress.phase(group.variant, "-", None, Status.SKIP, reasons.pop())
            return
        for g in skipped:
            self._write(g)

    def _write(self, group: _Group) -> None:
        self.progress.phase(group.variant, group.phase, group.seconds, group.status, group.detail())

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        # pytest.exit(...) from the plugin (e.g. the backend cannot be created) and Ctrl-C
        msg = getattr(excinfo.value, "msg", None) or str(excinfo.value) or excinfo.typename
        self.errors.append(str(msg).removeprefix("securemetrics-e2e: "))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._backend is not None:
            try:
                self.backend_description = dict(self._backend.describe())
            except Exception as exc:  # a report without backend details beats no report
                self.backend_description = {"describe_error": _first_line(exc)}


# ------------------------------------------------------------------ summary lines


def scenario_lines(result: RunResult) -> list[tuple[Status, str]]:
    """PASS / FAIL / KNOWN-GAP / FIXED / SKIP per run unit with the reason, the failed
    checks or the known gap (and its fix)."""
    lines: list[tuple[Status, str]] = []
    for unit in result.units():
        status = result.unit_status(unit)
        mine = result.of_unit(unit)
        name = unit[0]
        line = f"{status.value:9}  {mine[0].unit_id}"
        if status is Status.SKIP:
            line += f"  -- {mine[0].message}"
        elif status is Status.FAIL:
            failed = [o for o in mine if o.status is Status.FAIL]
            line += "  -- " + ", ".join(f"{o.code} {o.check}" for o in failed)
        elif status in (Status.KNOWN_GAP, Status.FIXED):
            line += "  -- " + ", ".join(sorted({o.gap for o in mine if o.gap}))
        lines.append((status, line))
        for o in mine:
            if o.status is Status.FAIL:
                lines.append((status, f"        {o.code} {o.check}: {o.message}"))
                if o.diagnostics:
                    lines.append((status, f"        diagnostics: {o.diagnostics}"))
            elif o.status in (Status.KNOWN_GAP, Status.FIXED):
                lines.append((o.status, f"        {o.status.value} {o.check}: {o.message}"))
        if status is Status.PASS and name in _NOTES:
            lines.extend((status, f"        note: {note}") for note in _NOTES[name])
    for rec in result.continuity:
        status = Status.PASS if rec.passed else Status.FAIL
        lines.append((status, f"continuity {rec.unit_id} {rec.measured.summary()}"))
    return lines


#: what a PASS of a scenario does not prove, said under it (e.g. cluster-only wiring)
_NOTES = {s.name: s.notes for s in SCENARIOS if s.notes}


def scenario_notes(result: RunResult) -> list[str]:
    """The notes :func:`scenario_lines` prints under passed run units, for the report."""
    return [
        f"{result.of_unit(unit)[0].unit_id}: {note}"
        for unit in result.units()
        if result.unit_status(unit) is Status.PASS
        for note in _NOTES.get(unit[0], ())
    ]


def verdict_line(
    result: RunResult,
    *,
    backend: str,
    istio_version: str,
    elapsed_s: float,
    negative_control: str = "",
) -> str:
    """The one closing line: CONFORMANT or NOT CONFORMANT, with the counts behind it.

    A local run says it judged Istio's reference data plane (not a distribution), and a
    run with a seeded fault says it is a negative control, so neither line can be quoted
    as a distribution's result.
    """
    counts = result.counts()
    if result.errors:
        verdict = "ERROR"
    elif result.conformant:
        verdict = "CONFORMANT"
    else:
        verdict = "NOT CONFORMANT"
    why = ""
    if not result.errors and not any(
        counts[s] for s in (Status.PASS, Status.FAIL, Status.KNOWN_GAP, Status.FIXED)
    ):
        why = "nothing was checked; "
    elif result.unfixed() and not counts[Status.FAIL]:
        why = "a known gap's fix variant did not pass; "
    continuity = ""
    if result.continuity:
        worst = min(rec.measured.fraction for rec in result.continuity)
        gap = max(rec.measured.longest_gap_s for rec in result.continuity)
        continuity = f"; continuity {worst:.1%} (worst job), longest gap {gap:.1f}s"
    what = ""
    if negative_control:
        what = f" [negative control: fault {negative_control}, a FAIL is the expected outcome]"
    elif backend == "local":
        what = " [local: Istio's reference data plane, not a distribution]"
    return (
        f"securemetrics-e2e verdict: {verdict} ({why}{counts[Status.PASS]} passed, "
        f"{counts[Status.FAIL]} failed, {counts[Status.KNOWN_GAP]} known gaps, "
        f"{counts[Status.FIXED]} fixed, {counts[Status.SKIP]} skipped checks; "
        f"backend {backend}, Istio {istio_version}, {elapsed_s:.1f}s{continuity}){what}"
    )
