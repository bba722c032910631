# PYTHON_ARGCOMPLETE_OK
"""The ``securemetrics-e2e`` command: run, plan, list, matrix, audit, scrape-config.

Exit status (every command): 0 success / conformant, 1 not conformant (``run``) or
warnings (``audit``), 3 errors (``audit``), 2 a usage or environment error, reported as one
message naming the input and the fix, never a traceback (an output file that cannot be
written after the run is 2 too: the verdict stands); a run stopped by SIGINT, SIGTERM or
SIGHUP cleans up and exits 128 + the signal number. The commands that run no scenario
live in commands.py, what a command line selects in selection.py.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from securemetrics_e2e import __version__, signals
from securemetrics_e2e.commands import cmd_audit, cmd_list, cmd_matrix, cmd_plan, cmd_scrape_config
from securemetrics_e2e.errors import EnvironmentProblem, SecureMetricsError, UsageError
from securemetrics_e2e.selection import (
    BACKENDS,
    CLUSTER_FLAGS,
    DISTRIBUTION_OPTIONS,
    EXIT_NOT_CONFORMANT,
    EXIT_OK,
    EXIT_USAGE,
    PROFILES,
    PROG,
    Selection,
    check_backend_flags,
    distribution,
    local_preflight,
    select,
)
from securemetrics_e2e.timeouts import TIMEOUTS
from securemetrics_e2e.timeouts import parse as parse_timeouts

if TYPE_CHECKING:
    from securemetrics_e2e.checks import CheckSelection
    from securemetrics_e2e.progress import Progress, ProgressPlugin
    from securemetrics_e2e.results import RunResult


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError (exit 2 through :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------- paths


def scenarios_dir() -> Path:
    """The conformance scenarios: packaged in the wheel, or beside the package in a checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_data" / "scenarios", package.parent / "scenarios"):
        if (candidate / "test_conformance.py").is_file():
            return candidate
    raise EnvironmentProblem(
        f"the conformance scenarios are neither packaged in {package / '_data'} nor beside "
        f"the package in {package.parent}; reinstall securemetrics-e2e"
    )


# ---------------------------------------------------------------------- run


def _pytest_args(args: argparse.Namespace, sel: Selection) -> list[str]:
    scenarios = scenarios_dir()
    argv = [
        str(scenarios),
        # the user's own pytest configuration (cwd, ini files) must not change the run
        "-c",
        os.devnull,
        "--rootdir",
        str(scenarios.parent),
        "-p",
        "no:cacheprovider",
        # only our plugin: the others installed beside it are not loaded (_run_pytest turns
        # pytest's autoload off), so none can change what the run judges (a rerun or
        # random-order plugin) and none costs the run its import (a plugin pulling in a
        # Kubernetes client and pydantic took 0.8 s of CPU of a 2 s one-unit run)
        "-p",
        "securemetrics_e2e.plugin",
        "--sm-backend",
        sel.backend,
        "--scenario",
        ",".join(s.name for s in sel.scenarios),
    ]
    if sel.backend != "existing" or args.istio_version is not None:
        argv += ["--istio-version", sel.istio_version]
    if args.upgrade_from:
        argv += ["--upgrade-from", args.upgrade_from]
    argv += _check_selection(args).as_args()
    argv += [f"--timeout={value}" for value in args.timeout or ()]
    if not args.pytest_output:
        argv += ["-p", "no:terminal"]
    if sel.backend == "local":
        argv += ["--local-network", args.local_network]
        if args.local_fault:
            argv += ["--local-fault", args.local_fault]
    else:
        for key, flag in CLUSTER_FLAGS.items():
            value = getattr(args, key, None)
            if value is True:
                argv.append(flag)
            elif value:
                argv += [flag, str(value)]
    return argv + list(args.pytest_args)


def _check_selection(args: argparse.Namespace) -> CheckSelection:
    """The checks ``--check`` / ``--skip-check`` name (ids or SMC codes); UsageError."""
    from securemetrics_e2e.checks import CheckSelection

    return CheckSelection(args.check or (), args.skip_check or ())


def _terminal() -> TextIO:
    """The real stdout, even while pytest captures fd 1 around each test phase."""
    try:
        fd = os.dup(sys.stdout.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):
        return sys.stdout
    return open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=True)


def _validate_run(args: argparse.Namespace) -> Selection:
    """Every check that can fail before anything starts: usage first, then the machine."""
    from securemetrics_e2e.outputs import check_writable, report_format
    from securemetrics_e2e.versions import upgrade_pair

    check_backend_flags(args)
    if args.local_fault:
        from securemetrics_e2e.local.faults import Fault

        known = ", ".join(f.value for f in Fault)
        if args.local_fault not in {f.value for f in Fault}:
            raise UsageError(f"unknown --local-fault {args.local_fault!r}; known: {known}")
    sel = select(args)
    _check_selection(args)  # a mistyped check id is a usage error, not a collection error
    parse_timeouts(args.timeout or ())
    if args.upgrade_from and (sel.backend != "existing" or args.istio_version is not None):
        # (an existing cluster without --istio-version ends on the Istio it runs)
        upgrade_pair(args.upgrade_from, sel.istio_version)
    if args.report:  # fail now, not after a ten-minute run
        report_format(Path(args.report))
        check_writable(Path(args.report), "--report")
    if args.junit:
        if Path(args.junit).suffix.lower() != ".xml":
            raise UsageError(f"--junit {args.junit!r} must end in .xml")
        check_writable(Path(args.junit), "--junit")
    if sel.backend == "local":
        local_preflight()
    return sel


#: pytest's switch for plugins found through entry points (pytest >= 3.8)
AUTOLOAD_OFF = "PYTEST_DISABLE_PLUGIN_AUTOLOAD"

#: pytest exit statuses that mean the run could not judge the mesh
_PYTEST_STOPPED = {
    2: "interrupted",
    3: "internal error, traceback above",
    4: "usage error, message above",
    5: "no scenario test was collected",
}


@contextmanager
def _plugin_autoload_off() -> Iterator[None]:
    """pytest's PYTEST_DISABLE_PLUGIN_AUTOLOAD for the in-process run (the variable, not
    pytest 8.4's --disable-plugin-autoload, so any pytest >= 8.0 honours it), put back
    after."""
    before = os.environ.get(AUTOLOAD_OFF)
    os.environ[AUTOLOAD_OFF] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[AUTOLOAD_OFF]
        else:
            os.environ[AUTOLOAD_OFF] = before


def _run_pytest(argv: list[str], progress: Progress) -> tuple[RunResult, ProgressPlugin, int]:
    """Run the scenarios in this process; the result, the observer and pytest's exit status."""
    import pytest

    from securemetrics_e2e.plugin import run_result
    from securemetrics_e2e.progress import ProgressPlugin
    from securemetrics_e2e.results import RunResult

    observer = ProgressPlugin(progress)
    captured: list[RunResult] = []

    class _Capture:
        @staticmethod
        def pytest_sessionfinish(session: pytest.Session) -> None:
            captured.append(run_result(session.config))

    with progress.activated(), _plugin_autoload_off():
        code = int(pytest.main(argv, plugins=[observer, _Capture()]))
    result = captured[0] if captured else RunResult()
    result.errors.extend(observer.errors)
    result.errors.extend(f"environment: {p}" for p in observer.environment_problems)
    if code in _PYTEST_STOPPED and not result.errors:
        result.errors.append(f"pytest stopped: {_PYTEST_STOPPED[code]} (exit status {code})")
    if code == 1 and result.conformant:
        result.errors.append(
            "pytest reported a failure outside the conformance checks; re-run with "
            "--pytest-output to see it"
        )
    return result, observer, code


def cmd_run(args: argparse.Namespace) -> int:
    sel = _validate_run(args)
    argv = _pytest_args(args, sel)
    # after the checks: a usage error need not load pytest and the report schema (0.3 s)
    from securemetrics_e2e.progress import Progress, scenario_lines, take_notes, verdict_line
    from securemetrics_e2e.report import ReportMeta

    term = _terminal()
    try:
        progress = Progress.for_terminal(term)
        started = time.monotonic()
        date = datetime.now(UTC)
        # an existing cluster's installed Istio is used unless a version is asked for
        asked = (
            sel.istio_version if sel.backend != "existing" or args.istio_version is not None else ""
        )
        progress.message(
            f"{PROG} {__version__}: backend {sel.backend}, Istio {asked or 'as installed'}, "
            f"profile {sel.profile}: {', '.join(s.name for s in sel.scenarios)}"
        )
        result, observer, _ = _run_pytest(argv, progress)
        result.measurements["duration_s"] = time.monotonic() - started
        env = {**observer.backend_description, **result.environment}
        meta = ReportMeta.from_environment(
            env,
            distribution=distribution(args),
            istio_version=env.get("istio_version") or asked,
            istio_hub=args.hub or env.get("istio_hub") or "",
            istio_tag=args.tag or env.get("istio_tag") or "",
            backend=env.get("backend") or sel.backend,
            profiles=sel.profiles,
            scenarios=tuple(s.name for s in sel.scenarios) if sel.explicit else (),
            date=date,
            notes=tuple(take_notes()),
        )
        for status, text in scenario_lines(result):
            head = status.value if text.startswith(status.value) else ""
            shown = progress.status_text(status) if head else ""
            progress.write(shown + text.removeprefix(head))
        progress.write(
            verdict_line(
                result,
                backend=meta.backend,
                istio_version=meta.istio_version or "unknown",
                elapsed_s=result.measurements["duration_s"],
                negative_control=args.local_fault or "",
            )
        )
        for error in result.errors:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        written = _write_outputs(args, result, meta, progress)
    finally:
        if term is not sys.stdout:
            term.close()
    stopped = signals.received()
    if stopped is not None:
        return signals.exit_status(stopped)  # what the shell reports for a signalled run
    if result.errors or not written:
        return EXIT_USAGE
    return EXIT_OK if result.conformant else EXIT_NOT_CONFORMANT


def _write_outputs(args: argparse.Namespace, result: RunResult, meta: Any, progress: Any) -> bool:
    """Write the report and JUnit; False (error printed) when one cannot be written.

    The verdict is already on the terminal: a write that fails now is an error of its own
    (exit 2), never a verdict about the mesh.
    """
    from securemetrics_e2e.junit import write_junit
    from securemetrics_e2e.outputs import OutputFailed
    from securemetrics_e2e.report import write_report

    ok = True
    for path, write, label in (
        (args.report, write_report, "report"),
        (args.junit, write_junit, "junit"),
    ):
        if not path:
            continue
        try:
            write(Path(path), result, meta)
        except OutputFailed as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            ok = False
            continue
        progress.message(f"{label}: {path}")
    return ok


# ---------------------------------------------------------------------- parser


def _selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="local", help="where to run")
    p.add_argument("--istio-version", help="e.g. 1.31.1 or 1.30 (default: latest supported)")
    p.add_argument("--profile", choices=PROFILES, default="all", help="default: all")
    p.add_argument(
        "--scenario", action="append", help="only this scenario (repeatable, or comma-separated)"
    )
    p.add_argument(
        "--upgrade-from",
        metavar="VERSION",
        help="the upgrade scenario starts on this Istio version (legacy configuration) and "
        "moves to --istio-version (native ports where it has them), one minor at a time "
        "(default: the previous minor). On a cluster it makes the run an upgrade run: "
        "istioctl installs this version and upgrades it, and only the upgrade scenario runs",
    )
    p.add_argument(
        "--canary",
        action="store_true",
        help="with --upgrade-from on a cluster: upgrade by a canary revision, not in place",
    )
    p.add_argument("--hub", help="Istio image hub to install (cluster backends)")
    p.add_argument("--tag", help="Istio image tag to install (cluster backends)")
    p.add_argument("--kubeconfig", help="kubeconfig of the cluster (--backend existing)")
    p.add_argument("--context", help="kubeconfig context (--backend existing)")
    p.add_argument("--keep", action="store_true", help="keep the cluster and what the run deployed")
    p.add_argument(
        "--local-network",
        choices=("auto", "netns", "loopback"),
        default="auto",
        help="local backend pods: network namespaces or 127.0.0.0/8 (default: auto)",
    )
    # negative controls: break the local mesh on purpose (tests and demos)
    p.add_argument("--local-fault", help=argparse.SUPPRESS)


def _distribution_options(p: argparse.ArgumentParser) -> None:
    dist = p.add_argument_group("distribution under test (recorded in the report)")
    for flag, what in DISTRIBUTION_OPTIONS.items():
        action = "append" if flag == "contact" else "store"
        dist.add_argument(f"--{flag}", action=action, help=what)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Prove that Prometheus scrapes Istio sidecars and gateways over mutual "
        "TLS, and that the plaintext metrics ports are closed.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the conformance scenarios and give a verdict")
    _selection_options(run)
    run.add_argument(
        "--check",
        action="append",
        metavar="CHECK",
        help="run only this check, by id or SMC code (repeatable, or comma-separated); the "
        "others are reported as skipped, with the reason",
    )
    run.add_argument(
        "--skip-check",
        action="append",
        metavar="CHECK",
        help="leave this check out, by id or SMC code (repeatable, or comma-separated): "
        "reported as skipped, with the reason",
    )
    run.add_argument(
        "--timeout",
        action="append",
        metavar="NAME=SECONDS",
        help="override a named timeout (repeatable); names: "
        + ", ".join(f"{t.name} ({t.bounds})" for t in TIMEOUTS),
    )
    run.add_argument("--report", help="write the conformance report (.json, .yaml or .yml)")
    run.add_argument("--junit", help="write JUnit XML (.xml)")
    _distribution_options(run)
    run.add_argument(
        "--pytest-output",
        action="store_true",
        help="show pytest's own output (tracebacks) as well as the progress lines",
    )
    run.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments, e.g. -- -x")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="show what `run` would do, touching nothing")
    _selection_options(plan)
    plan.add_argument("--report", help="also write a plan-only report (.json, .yaml or .yml)")
    _distribution_options(plan)
    plan.set_defaults(func=cmd_plan)

    lst = sub.add_parser("list", help="scenarios x Istio versions x backends: what applies")
    lst.add_argument("--backend", action="append", choices=BACKENDS, help="repeatable")
    lst.add_argument("--istio-version", action="append", help="repeatable")
    lst.add_argument("--profile", choices=PROFILES, default="all")
    lst.add_argument("--local-network", choices=("auto", "netns", "loopback"), default="auto")
    lst.add_argument("--format", choices=("text", "json"), default="text")
    lst.set_defaults(func=cmd_list)

    mtx = sub.add_parser("matrix", help="merge reports into one Markdown / HTML table")
    mtx.add_argument("reports", nargs="+", help="report files or directories of reports")
    mtx.add_argument("--markdown", help="write Markdown here (default: print it)")
    mtx.add_argument("--html", help="write HTML here")
    mtx.set_defaults(func=cmd_matrix)

    aud = sub.add_parser("audit", help="check your Prometheus config and manifests")
    aud.add_argument("paths", nargs="+", help="files or directories (.yaml, .yml, .json)")
    aud.add_argument("--format", choices=("text", "json"), default="text")
    aud.add_argument(
        "--fail-on",
        choices=("error", "warning", "info"),
        default="warning",
        help="lowest severity that makes the exit status non-zero (default: warning)",
    )
    aud.set_defaults(func=cmd_audit)

    scrape = sub.add_parser(
        "scrape-config",
        help="print the Prometheus scrape configuration the suite verifies (the chart's "
        "prometheus.yml): the secure-port jobs with the OUTPUT_CERTS client certificate",
    )
    scrape.set_defaults(func=cmd_scrape_config)
    return parser


def _enable_completion(parser: argparse.ArgumentParser) -> None:
    """Shell completion when argcomplete is installed (optional: `pip install argcomplete`,
    then `eval "$(register-python-argcomplete securemetrics-e2e)"`)."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)  # returns at once unless the shell is completing


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:
        _enable_completion(parser)
    try:
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except SecureMetricsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_USAGE
