"""docs/vendor-walkthrough.md works as written: its commands run, in order, as a user runs them.

Every shell command of the walk-through runs here except those that need a cluster (a
`run` on kind or an existing cluster): the install (a virtualenv under a scratch $HOME,
`pip install .` from this checkout), then list, plan, a local run writing a report, the
matrix of it, scrape-config and audit. A command that fails fails the test.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from securemetrics_e2e.report import load_report
from tests.localmesh import requires_local_mesh

REPO = Path(__file__).resolve().parent.parent
WALKTHROUGH = REPO / "docs" / "vendor-walkthrough.md"
pytestmark = pytest.mark.slow


def commands() -> list[tuple[str, str]]:
    """(section, command) for every command in the walk-through's ```sh blocks."""
    text = WALKTHROUGH.read_text()
    found = []
    for match in re.finditer(r"^## (.+?)$|```sh\n(.*?)```", text, re.DOTALL | re.MULTILINE):
        if match[1]:
            section = match[1]
            continue
        block = match[2].replace("\\\n", " ")
        for line in block.splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command and not command.startswith("#"):
                found.append((section, command))
    return found


def needs_cluster(command: str) -> bool:
    return bool(re.search(r"\brun\b.*--backend (kind|existing)", command))


def test_the_walkthrough_names_its_commands() -> None:
    found = [c for _, c in commands()]
    assert "python3 -m venv ~/.venvs/securemetrics-e2e" in found
    assert any(needs_cluster(c) for c in found)  # the filter below is not vacuous
    assert "pip install securemetrics-e2e" not in WALKTHROUGH.read_text()  # not on the index


@requires_local_mesh
def test_every_command_without_a_cluster_runs(tmp_path: Path) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {**os.environ, "HOME": str(home), "NO_COLOR": "1"}
    env.pop("VIRTUAL_ENV", None)
    ran = []
    for section, command in commands():
        if needs_cluster(command):
            continue
        # step 1 runs in the checkout it installs from; the others in a scratch directory
        cwd = REPO if section.startswith("1.") else work
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        if command.startswith("export PATH="):  # what the user's shell keeps from it
            value = command.removeprefix("export PATH=").strip('"')
            env["PATH"] = value.replace("$HOME", str(home)).replace("$PATH", env["PATH"])
        ran.append(command)
    assert "securemetrics-e2e --version" in ran
    assert load_report(work / "reports" / "local.yaml")["provenance"]["subject"] == (
        "reference-data-plane"
    )
    assert (work / "matrix.html").is_file()
    assert "scrape_configs" in (work / "prometheus.yml").read_text()
