"""Running docs/vendor-walkthrough.md's commands, in order, as a user runs them.

Every shell command of the walk-through runs except those that need a cluster (a `run` on
kind or an existing cluster): the install (a virtualenv under a scratch $HOME, `pip
install .` from this checkout), then list, plan, a local run writing a report, the matrix
of it, scrape-config and audit. The walk is a session fixture (tests/conftest.py): its
local run is `securemetrics-e2e run --backend local` as a user types it, and
tests/test_golden.py compares that run's report with the golden instead of starting a
whole conformance run of its own (conftest.py keeps both files on one xdist worker).

Between the walk-through's `python3 -m venv` and its `pip install .`, the package's
declared dependencies, as this interpreter has them installed, are lent to the new
virtualenv (tests/installed.py): `pip install .` then finds them satisfied and builds and
installs the package alone, instead of resolving and unpacking some fifty distributions
(about 45 s of CPU). What the walk still proves: the commands run as written, the
package installs from the checkout with pip and works from a scratch directory with
only its declared dependencies. What it leaves to the development install (`pip install
-e '.[dev]'`, which resolves the same requirements): that an index satisfies them.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.installed import lend_dependencies

REPO = Path(__file__).resolve().parent.parent
WALKTHROUGH = REPO / "docs" / "vendor-walkthrough.md"
#: the walk-through's virtualenv command, whose environment receives the dependencies
VENV_COMMAND = re.compile(r"^python3 -m venv (\S+)$")


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


@dataclass
class Walk:
    """What a walk through the commands did: ``failed`` names the command that failed
    (with its output) and is empty when every command ran."""

    home: Path
    work: Path
    ran: list[str] = field(default_factory=list)
    failed: str = ""
    lent: list[str] = field(default_factory=list)

    @property
    def local_report(self) -> Path:
        """The report of the walk-through's local run (section 3)."""
        return self.work / "reports" / "local.yaml"


def walk(scratch: Path) -> Walk:
    """Run every command without a cluster, in order, until one fails."""
    done = Walk(home=scratch / "home", work=scratch / "work")
    done.home.mkdir()
    done.work.mkdir()
    env = {**os.environ, "HOME": str(done.home), "NO_COLOR": "1"}
    env.pop("VIRTUAL_ENV", None)
    for section, command in commands():
        if needs_cluster(command):
            continue
        # step 1 runs in the checkout it installs from; the others in a scratch directory
        cwd = REPO if section.startswith("1.") else done.work
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", command],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if result.returncode != 0:
            done.failed = f"{command}\n{result.stdout}\n{result.stderr}"
            return done
        if command.startswith("export PATH="):  # what the user's shell keeps from it
            value = command.removeprefix("export PATH=").strip('"')
            env["PATH"] = value.replace("$HOME", str(done.home)).replace("$PATH", env["PATH"])
        if venv := VENV_COMMAND.match(command):
            python = Path(venv[1].replace("~", str(done.home), 1)) / "bin" / "python"
            done.lent = lend_dependencies(python, scratch / "dependencies")
        done.ran.append(command)
    return done
