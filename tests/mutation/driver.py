"""Mutation testing of the check bodies against live meshes deployed once (`nox -s mutation`).

mutmut 3 writes the mutated tree (``mutants/``) and switches mutants at call time (its
trampoline reads the active mutant on every call), so one process deploys the meshes once
and then, mutant by mutant, switches and re-runs only the checks that reach the mutated
function on the meshes already up; forking a fresh pytest per mutant, as ``mutmut run``
does, would pay a full deploy (20-30 s) per mutant.

Phases: ``generate`` (in the project root: mutmut writes ``mutants/``) re-executes this
module as ``run`` inside ``mutants/``, where ``securemetrics_e2e`` and ``tests`` are the
mutated copies. ``run`` deploys the negative controls of ``tests/test_negative_controls.py``
(their EXPECTED table: one home for what each control must fail) and the clean conformance
units (their statuses: ``tests/golden/local-conformance.json``), learns which mutated
functions each (target, check) pair reaches (mutmut's ``stats`` mode), checks every pair's
unmutated outcome against those expectations, then judges each mutant
(:mod:`tests.mutation.judge`). A mutant no live pair kills runs the fast unit tests of its
module (UNIT_TESTS) in a pytest of its own, as ``mutmut run`` would. Verdicts go into
mutmut's own files, so ``mutmut results`` and ``mutmut show NAME`` read them.

Left out of the shared targets, and why: the clean ``upgrade`` unit and the
UPGRADE_DROPS_TARGETS control (an upgrade window changes the deployment for good: it cannot
be re-run on it). The mutants only the upgrade window reaches (``verify``,
``_upgrade_continuity``) run its tests instead (UNIT_TESTS), each in a mesh of its own.
The rotation window (``rotation-continuity`` on the clean ``rotation`` unit) can be re-run,
and is, for every mutant that reaches it (about 12 s each).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.mutation.judge import (
    EXIT_CODE,
    KILLED,
    NO_TESTS,
    SURVIVED,
    TIMEOUT,
    Outcome,
    Pair,
    Verdict,
    bound_for,
    judge,
    outcome_of,
    unaccounted,
)

#: the mutated files, in the order a run takes them (a time-boxed run stops in order)
FILES = (
    "securemetrics_e2e/checkbase.py",
    "securemetrics_e2e/checks.py",
    "securemetrics_e2e/checkbodies.py",
    "securemetrics_e2e/probe.py",
)
#: the unit tests (no mesh) a mutant runs when no live check kills it: the first pattern
#: matching its name (fnmatch) wins
UNIT_TESTS = (
    # reached only by the upgrade window, which no shared target can run twice: the
    # window's own tests and the upgrade control, each in a mesh of its own (a minute);
    # the judgements without a mesh first (a backend that cannot upgrade, a failure
    # before the window opens)
    (
        "securemetrics_e2e.checks.x_verify__*",
        ["tests/test_check_judgements.py", "tests/test_upgrade_window.py"],
    ),
    (
        "securemetrics_e2e.checks.x__upgrade_continuity__*",
        [
            "tests/test_check_judgements.py",
            "tests/test_negative_controls.py::test_fault_makes_the_verdict_fail_naming_its_checks",
            "tests/test_negative_controls.py::test_fault_messages_match_the_golden",
            "tests/test_negative_controls.py::test_targets_dropped_by_an_upgrade_are_named",
        ],
    ),
    ("securemetrics_e2e.checks.x_named__*", ["tests/test_check_selection.py"]),
    ("securemetrics_e2e.checks.x__split__*", ["tests/test_check_selection.py"]),
    ("securemetrics_e2e.checks.xǁCheckSelectionǁ*", ["tests/test_check_selection.py"]),
    # the cluster's Prometheus servers and rotation driver, on the fake Kubernetes API
    (
        "securemetrics_e2e.checkbodies.x_servicemonitor*",
        ["tests/test_check_servicemonitor.py", "tests/test_cluster_checks.py"],
    ),
    (
        "securemetrics_e2e.checkbodies.x_mtls_scrape__*",
        ["tests/test_check_judgements.py", "tests/test_cluster_checks.py"],
    ),
    (
        "securemetrics_e2e.checkbodies.x_targets_up__*",
        ["tests/test_check_judgements.py", "tests/test_cluster_checks.py"],
    ),
    (
        "securemetrics_e2e.checkbodies.x_rotation_continuity__*",
        ["tests/test_check_judgements.py", "tests/test_cluster_rotation.py"],
    ),
    # Prometheus answers no live target gives (first scrapes, timeouts), without a mesh
    (
        "securemetrics_e2e.checkbodies.*",
        ["tests/test_check_judgements.py", "tests/test_check_hints.py"],
    ),
    ("securemetrics_e2e.probe.*", ["tests/test_probe.py"]),
    ("securemetrics_e2e.*", ["tests/test_check_hints.py"]),
)
#: the targets are UP before any mutant runs: a healthy target answers within a second
#: (local Prometheus scrapes every second), a mutant that waits for one that never comes
#: is cut after this, not after the local default of 15 s
TIMEOUT_OVERRIDES = {"target-up": 6.0}
#: a pytest of the unit tests of one mutant may take this long, or three times their
#: unmutated run if longer (the window's tests: a minute or more under load); slower, the
#: mutant hangs
UNIT_TEST_BOUND = 120.0
SUMMARY = "mutation-summary.json"


# ----------------------------------------------------------------------------- generate


def generate(root: Path) -> None:
    """mutmut writes ``root/mutants`` afresh: every file of the package copied, the FILES
    mutated (with their ``.meta`` lists of mutants)."""
    from mutmut.__main__ import create_mutants
    from mutmut.mutation.trampoline import set_mutant_under_test
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

    os.chdir(root)
    shutil.rmtree("mutants", ignore_errors=True)
    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir()
    copy_src_dir()
    copy_also_copy_files()
    create_mutants(1)


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    name: str
    backend: Any  # LocalBackend, imported from the mutated tree at run time
    deployment: Any
    #: check id -> the status it must have (absent: PASS or n/a)
    expected: dict[str, str]
    #: the statuses must be exactly these (a clean unit); else only FAIL is pinned
    exact: bool


def _golden(root: Path) -> dict[str, dict[str, str]]:
    from tests.golden.stable import check_statuses

    doc = json.loads((root / "tests/golden/local-conformance.json").read_text("utf-8"))
    return check_statuses(doc)


def deploy(stack: ExitStack, root: Path) -> list[Target]:
    """The negative controls and the clean units, deployed side by side (three meshes,
    as the controls' fixture does); ``stack`` tears them down."""
    from securemetrics_e2e.catalog import chosen_scenarios
    from securemetrics_e2e.local.backend import LocalBackend
    from tests.test_negative_controls import (
        EXPECTED,
        deploy_data_plane_fault_controls,
        deploy_scraper_fault_controls,
    )

    golden = _golden(root)

    def clean() -> list[Target]:
        backend = LocalBackend()
        stack.callback(backend.close)
        units = [
            u
            for sc in chosen_scenarios(None)
            if sc.name != "upgrade"
            for u in sc.run_units()
            if u.id in golden and "SKIP" not in set(golden[u.id].values())
        ]
        deployed = backend.deploy_many(units)
        return [
            Target(u.id, backend, dep, golden[u.id], exact=True)
            for u in units
            if not isinstance(dep := deployed[u.key], Exception)
        ]

    def controls(deploy_them: Callable[[ExitStack], list[Any]]) -> list[Target]:
        return [
            Target(
                f"control {c.fault}",
                c.backend,
                c.deployment,
                dict.fromkeys(EXPECTED[c.fault][1], "FAIL"),
                exact=False,
            )
            for c in deploy_them(stack)
        ]

    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs = [
            pool.submit(clean),
            pool.submit(controls, deploy_scraper_fault_controls),
            pool.submit(controls, deploy_data_plane_fault_controls),
        ]
        targets = [t for job in jobs for t in job.result()]
    for t in targets:
        t.backend.timeouts = t.backend.timeouts.with_overrides(TIMEOUT_OVERRIDES)
    return targets


# ----------------------------------------------------------------------------- pairs


def _runner(target: Target, check: Any) -> Callable[[], Outcome]:
    """One pair: its status, observed tokens and normalised message (the wording a vendor
    reads is behaviour: tests/golden/messages.py pins the controls')."""
    from securemetrics_e2e.runner import attempt, judged
    from securemetrics_e2e.versions import DEFAULT_VERSION
    from tests.golden.messages import normalise

    # the version the golden report was judged at (the pytest path's default)
    version = str(DEFAULT_VERSION)

    def run() -> Outcome:
        dep = target.deployment
        if not check.applies_to(dep.scenario):
            return ("n/a",)
        seen = attempt(check, target.backend, dep)
        out = judged(dep.unit, check, version, seen.status, seen.message, seen.observed)
        return (str(out.status.value), *seen.observed, normalise(seen.message))

    return run


def _expected_problem(target: Target, check_id: str, got: Outcome) -> str | None:
    want = target.expected.get(check_id)
    status = got[0]
    if target.exact:
        ok = status == want if want is not None else status == "n/a"
    else:
        ok = status == "FAIL" if want == "FAIL" else status in ("PASS", "n/a", "SKIP")
    return None if ok else f"{target.name} {check_id}: {got}, expected {want or 'PASS'}"


def learn_pairs(targets: Sequence[Target]) -> tuple[list[Pair], list[str]]:
    """Every (target, check) pair with its unmutated outcome and the mutated functions it
    reaches; and the pairs whose outcome contradicts the suite's expectations (left out:
    they could not tell a mutant from the mesh)."""
    from mutmut.mutation.trampoline import set_mutant_under_test
    from mutmut.state import state

    from securemetrics_e2e.checks import CHECKS

    pairs, problems = [], []
    for target in targets:
        for check in CHECKS:
            run = _runner(target, check)
            state()._stats.clear()
            set_mutant_under_test("stats")
            started = time.monotonic()
            got = outcome_of(run)
            took = time.monotonic() - started
            set_mutant_under_test("")
            hits = frozenset(state()._stats)
            problem = _expected_problem(target, check.id, got)
            if problem is not None:
                problems.append(problem)
                continue
            pairs.append(Pair(f"{target.name} {check.id}", run, got, hits, took))
    return pairs, problems


# ----------------------------------------------------------------------------- mutants


def mutants(root: Path, patterns: Sequence[str]) -> list[tuple[str, str]]:
    """(file, mutant name) of every mutant mutmut wrote, in FILES order, those matching
    ``patterns`` (fnmatch; none: all)."""
    found = []
    for path in FILES:
        meta = json.loads((root / "mutants" / f"{path}.meta").read_text("utf-8"))
        for name in meta["exit_code_by_key"]:
            if not patterns or any(fnmatch.fnmatch(name, p) for p in patterns):
                found.append((path, name))
    return found


def function_of(mutant: str) -> str:
    """The mangled function a mutant belongs to (as the stats mode records it)."""
    from mutmut.utils.format_utils import mangled_name_from_mutant_name

    return str(mangled_name_from_mutant_name(mutant))


def tests_for(mutant: str) -> list[str]:
    return next(files for pattern, files in UNIT_TESTS if fnmatch.fnmatch(mutant, pattern))


def unit_tests(
    mutants_dir: Path, mutant: str, files: Sequence[str] = (), bound: float = UNIT_TEST_BOUND
) -> Verdict:
    """The unit tests of ``mutant`` with it active, in a pytest of their own; ``mutant``
    "": none active, the baseline ``files`` must pass. No tier filter: the window's tests
    and the upgrade control are slow by nature, and chosen on purpose (a ``-m "not slow"``
    deselected them all, and pytest's exit 5 stopped the run)."""
    files = tests_for(mutant) if mutant else files
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    cmd += ["--benchmark-skip", *files]
    env = {**os.environ, "MUTANT_UNDER_TEST": mutant}
    started = time.monotonic()
    try:
        done = subprocess.run(
            cmd, check=False, cwd=mutants_dir, env=env, capture_output=True, timeout=bound
        )
    except subprocess.TimeoutExpired:
        return Verdict(mutant, TIMEOUT, "unit tests", time.monotonic() - started)
    took = time.monotonic() - started
    if done.returncode == 0:
        return Verdict(mutant, SURVIVED, seconds=took)
    if done.returncode in (1, 3):  # tests failed; internal error (an import broke)
        return Verdict(mutant, KILLED, " ".join(files), took)
    raise RuntimeError(f"pytest {mutant}: exit {done.returncode}: {done.stdout[-2000:]!r}")


def equivalent(root: Path) -> set[str]:
    """Mutants CONTRIBUTING.md ("Mutation testing") writes down as equivalent."""
    text = (root / "CONTRIBUTING.md").read_text("utf-8")
    return set(re.findall(r"^\| `([\w.ǁ]+)`[^|]*\| equivalent", text, re.MULTILINE))


# ----------------------------------------------------------------------------- run


def run(root: Path, patterns: Sequence[str], budget_s: float) -> int:
    from mutmut.mutation.trampoline import set_mutant_under_test

    import securemetrics_e2e
    from securemetrics_e2e import signals

    mutants_dir = root / "mutants"
    where = Path(securemetrics_e2e.__file__).resolve()
    if mutants_dir.resolve() not in where.parents:
        print(f"securemetrics_e2e imported from {where}, not from {mutants_dir}")
        return 2
    chosen = mutants(root, patterns)
    started = time.monotonic()
    # the unit tests the chosen mutants may run, unmutated: each must pass first
    clean = unit_tests(mutants_dir, "", sorted({f for _, m in chosen for f in tests_for(m)}))
    if clean.status != SURVIVED:
        print(f"the unit tests fail with no mutant active ({clean.by}): fix them first")
        return 2
    unit_bound = max(UNIT_TEST_BOUND, 3 * clean.seconds)
    # SIGTERM / SIGHUP stop the run through teardown, as Ctrl-C does (no mesh left behind)
    stack = ExitStack()
    stack.callback(signals.install())
    with stack:
        targets = deploy(stack, root)
        deployed_s = time.monotonic() - started
        pairs, problems = learn_pairs(targets)
        learned_s = time.monotonic() - started - deployed_s
        print(
            f"{len(targets)} targets deployed in {deployed_s:.0f} s; {len(pairs)} pairs "
            f"learned in {learned_s:.0f} s",
            flush=True,
        )
        for problem in problems:
            print(f"  left out (unmutated outcome contradicts the suite): {problem}")
        verdicts: list[Verdict] = []
        not_run: list[str] = []
        for _path, name in chosen:
            if signals.received() is not None:
                raise KeyboardInterrupt(f"stopped by {signals.received()}")
            if time.monotonic() - started > budget_s:
                not_run.append(name)
                continue
            reach = [p for p in pairs if function_of(name) in p.hits]
            verdict = judge(name, reach, set_mutant_under_test, bound_for(reach))
            if verdict.status in (SURVIVED, NO_TESTS):
                verdict = unit_tests(mutants_dir, name, bound=unit_bound)
            verdicts.append(verdict)
            print(f"  {verdict.status:8} {name}  {verdict.by}", flush=True)
    took = time.monotonic() - started
    os.chdir(root)
    _record(verdicts)
    summary = _summary(chosen, verdicts, not_run, took, deployed_s + learned_s, problems)
    (mutants_dir / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n", "utf-8")
    _print(summary, verdicts, equivalent(root))
    return 1 if unaccounted(verdicts, equivalent(root)) or problems else 0


def _record(verdicts: Sequence[Verdict]) -> None:
    """Each verdict into mutmut's .meta file (cwd: the project root)."""
    from mutmut.mutation.data import SourceFileMutationData

    by_name = {v.mutant: v for v in verdicts}
    for path in FILES:
        data = SourceFileMutationData(path=path)
        data.load()
        for name in data.exit_code_by_key:
            if name in by_name:
                data.exit_code_by_key[name] = EXIT_CODE[by_name[name].status]
                data.durations_by_key[name] = by_name[name].seconds
        data.save()


def _summary(
    chosen: Sequence[tuple[str, str]],
    verdicts: Sequence[Verdict],
    not_run: Sequence[str],
    took: float,
    setup: float,
    problems: Sequence[str],
) -> dict[str, Any]:
    file_of = dict((name, path) for path, name in chosen)
    per_file: dict[str, dict[str, int]] = {}
    for path, _ in chosen:
        per_file.setdefault(path, {"mutants": 0, "not run": 0})["mutants"] += 1
    for v in verdicts:
        counts = per_file[file_of[v.mutant]]
        counts[v.status] = counts.get(v.status, 0) + 1
    for name in not_run:
        per_file[file_of[name]]["not run"] += 1
    return {
        "seconds": round(took),
        "setup_seconds": round(setup),
        "per_file": per_file,
        "verdicts": {v.mutant: [v.status, v.by, round(v.seconds, 1)] for v in verdicts},
        "not_run": list(not_run),
        "left_out_pairs": list(problems),
    }


def _print(summary: dict[str, Any], verdicts: Sequence[Verdict], equiv: set[str]) -> None:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    print(f"\nmutation run: {summary['seconds']} s (setup {summary['setup_seconds']} s)")
    for path, counts in summary["per_file"].items():
        print(f"  {path}: " + ", ".join(f"{k} {n}" for k, n in counts.items() if n))
    for v in verdicts:
        if v.status == SURVIVED:
            tag = "equivalent (CONTRIBUTING.md)" if v.mutant in equiv else "SURVIVED"
            print(f"\n# {v.mutant}: {tag}")
            print(get_diff_for_mutant(v.mutant))


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation.driver", description=__doc__)
    parser.add_argument("patterns", nargs="*", help="mutant names or fnmatch patterns")
    parser.add_argument("--budget-minutes", type=float, default=600.0)
    parser.add_argument("--phase", choices=("generate", "run"), default="generate")
    parser.add_argument("--root", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    if not args.budget_minutes > 0:  # exit 2 before mutmut writes anything
        parser.error(f"--budget-minutes {args.budget_minutes:g}: give a number of minutes > 0")
    root = args.root.resolve()
    if args.phase == "generate":
        generate(root)
        os.chdir(root / "mutants")
        here = [sys.executable, "-m", "tests.mutation.driver", "--phase", "run"]
        budget = str(args.budget_minutes)
        # a fresh interpreter whose sys.path starts in mutants/: nothing unmutated imported
        os.execv(  # noqa: S606 - this interpreter, no shell
            sys.executable, [*here, "--root", str(root), "--budget-minutes", budget, *args.patterns]
        )
    return run(root, args.patterns, args.budget_minutes * 60)


if __name__ == "__main__":
    sys.exit(main())
