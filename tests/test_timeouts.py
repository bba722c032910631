"""Named timeouts: one table, parsed the same on the CLI and the pytest path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from securemetrics_e2e.cli import main
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.timeouts import apply, effective, parse

ROOT = Path(__file__).resolve().parent.parent


def test_an_override_reaches_the_backend() -> None:
    backend = LocalBackend()
    assert effective(backend) == {"target-up": 15.0}  # the local backend's own default
    apply(backend, parse(["target-up=2.5"]))
    assert effective(backend) == {"target-up": 2.5}


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("target-up", "expected name=seconds"),
        ("rollout=5", "expected name=seconds with a name among: target-up"),
        ("target-up=soon", "seconds must be a number above 0"),
        ("target-up=0", "seconds must be a number above 0"),
    ],
)
def test_a_bad_timeout_is_a_usage_error(value: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        parse([value])


def test_cli_and_pytest_refuse_a_bad_timeout_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--timeout", "target-up=-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "scenarios",
         "--timeout", "nope=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("securemetrics-e2e: --timeout 'nope=1'")
