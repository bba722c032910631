"""`pytest scenarios --plan`: the cluster plan is printed before any test, nothing runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.pytestcmd import pytest_command

REPO = Path(__file__).resolve().parent.parent


def _pytest(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        pytest_command(str(REPO / "scenarios"), "--rootdir", str(REPO), *args),
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_plan_prints_steps_for_the_chosen_version_and_runs_no_test(tmp_path: Path) -> None:
    done = _pytest("--sm-backend", "kind", "--plan", "--istio-version", "1.30", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Istio 1.30.5" in done.stdout
    assert "istioctl-1.30.5-linux-amd64.tar.gz" in done.stdout
    assert " passed" not in done.stdout  # no test ran
    assert list(tmp_path.iterdir()) == []  # nothing created, not even a cluster dir


def test_plan_with_an_unknown_version_is_a_usage_error(tmp_path: Path) -> None:
    done = _pytest("--sm-backend", "kind", "--plan", "--istio-version", "1.27", cwd=tmp_path)
    assert done.returncode == 2
    assert "1.27" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_plan_needs_a_cluster_backend(tmp_path: Path) -> None:
    done = _pytest("--plan", cwd=tmp_path)
    assert done.returncode == 2
    assert "--sm-backend kind" in done.stderr
