"""The README's two commands are what CI runs, and nox cannot pass without running.

CI (.ci/run) must run the README's test command exactly as printed, so a command that
breaks for a new user (pip refusing an externally managed Python, a missing interpreter)
breaks CI first.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFORMANCE = "apt-get update && apt-get install -y pipx && pipx run nox -s conformance"
TESTS = "apt-get update && apt-get install -y pipx && pipx run nox -s tests"


def _shell_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", text, re.DOTALL)]


def test_the_readme_gives_both_commands_verbatim() -> None:
    blocks = _shell_blocks((REPO / "README.md").read_text())
    assert CONFORMANCE in blocks
    assert TESTS in blocks


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert TESTS in lines
    assert "set -euo pipefail" in lines  # a failing command fails CI


def test_nox_fails_rather_than_skips_and_names_no_fixed_interpreter() -> None:
    text = (REPO / "noxfile.py").read_text()
    assert "nox.options.error_on_missing_interpreters = True" in text
    assert "session.skip" not in text
    # a version list would run every session once per version, or skip where one is missing
    assert not re.search(r"python=\[", text)
    assert not re.search(r"PYTHON = \"3\.\d+\"", text)


def test_the_readme_sample_verdict_has_the_current_shape() -> None:
    from securemetrics_e2e.versions import DEFAULT_VERSION

    (line,) = [
        line
        for line in (REPO / "README.md").read_text().splitlines()
        if line.startswith("securemetrics-e2e verdict:")
    ]
    # the sample is pasted from a real local run: regenerate it when this fails
    assert re.fullmatch(
        r"securemetrics-e2e verdict: CONFORMANT \(\d+ passed, 0 failed, \d+ known gaps, "
        r"\d+ fixed, \d+ skipped checks; "
        rf"backend local, Istio {re.escape(str(DEFAULT_VERSION))}, [\d.]+s; continuity "
        r"100\.0% \(worst job\), longest gap [\d.]+s\) "
        r"\[local: Istio's reference data plane, not a distribution\]",
        line,
    )
