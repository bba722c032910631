"""The built wheel carries everything a vendor needs, and works outside the repository.

Builds the wheel, installs it into a fresh virtual environment (its declared dependencies
are lent from this interpreter's site-packages through a .pth file, so no network is
needed: tests/installed.py), and
from an empty directory runs ``securemetrics-e2e run`` on the local backend and collects
the packaged scenarios with ``pytest --pyargs``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.installed import lend_dependencies
from tests.localmesh import requires_local_mesh

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=300, **kw)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    args = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(out), "-q"]
    if importlib.util.find_spec("hatchling") is not None:
        args.append("--no-build-isolation")  # offline: use the hatchling installed here
    done = _run(args)
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("securemetrics_e2e-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("venv") / "fresh"
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(home)])
    assert done.returncode == 0, done.stderr
    python = home / "bin" / "python"
    # The declared dependencies, not the package: lent from this interpreter
    # (tests/installed.py), so a module the package imports without declaring it fails
    lend_dependencies(python, home.parent / "dependencies")
    done = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                 "-q", str(wheel)])  # fmt: skip
    assert done.returncode == 0, done.stderr
    return home


def test_wheel_contains_plugin_cli_charts_schema_and_scenarios(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "securemetrics_e2e/plugin.py",
        "securemetrics_e2e/cli.py",
        "securemetrics_e2e/__main__.py",
        "securemetrics_e2e/schemas/report.schema.json",
        "securemetrics_e2e/_data/charts/secure-metrics-prometheus/files/prometheus.yml",
        "securemetrics_e2e/_data/charts/httpbin/Chart.yaml",
        "securemetrics_e2e/_data/scenarios/test_conformance.py",
    ):
        assert required in names, required
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "securemetrics-e2e = securemetrics_e2e.cli:main" in text
    assert "securemetrics_e2e = securemetrics_e2e.plugin" in text


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["NO_COLOR"] = "1"
    return env


@requires_local_mesh
def test_installed_wheel_runs_outside_the_repository(venv: Path, tmp_path: Path) -> None:
    show = "import securemetrics_e2e; print(securemetrics_e2e.__file__)"
    where = _run([str(venv / "bin" / "python"), "-c", show], cwd=tmp_path, env=_clean_env())
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr

    # the one-unit scenario: what is tested is the installed package, not the units
    run = _run(
        [str(venv / "bin" / "securemetrics-e2e"), "run", "--backend", "local",
         "--scenario", "legacy-gateway", "--report", "report.json"],
        cwd=tmp_path, env=_clean_env(),
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "securemetrics-e2e verdict: CONFORMANT (" in run.stdout
    assert (tmp_path / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # nothing else left


def test_installed_wheel_collects_scenarios_with_pyargs(venv: Path, tmp_path: Path) -> None:
    done = _run(
        [str(venv / "bin" / "python"), "-m", "pytest", "--pyargs",
         "securemetrics_e2e._data.scenarios", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--scenario", "native-sidecar"],
        cwd=tmp_path, env=_clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    collected = [line for line in done.stdout.splitlines() if "::test_" in line]
    item = "[native-sidecar[PERMISSIVE/as-documented]-mtls-scrape]"
    assert any(item in line for line in collected)
    assert all("site-packages" not in line or str(venv) in line for line in collected)
