"""Two real local runs of the `securemetrics-e2e` command, started side by side in
subprocesses exactly as a user starts it: a clean mesh (exit 0) and one with a seeded
fault (exit 1). A session fixture (tests/conftest.py, ``cli_runs``) starts them once;
tests/test_cli.py checks their exit codes, progress, verdicts, reports and JUnit, and
tests/test_provenance.py what the clean run's report says about what ran (conftest.py
keeps both files on one xdist worker).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests.localmesh import netns_names

PHASE_LINE = re.compile(
    r"^\[\s*[\d.]+s\] (?P<variant>.+?)\s+(?P<phase>deploy|wait|probe|verify|-)\s+"
    r"(?P<status>PASS|FAIL|SKIP)\b"
)
SCENARIOS = "native-sidecar,hardened"
#: the distribution the clean run names (its report and the matrix show it)
DIST = ["--org", "Example Corp.", "--project", "Example Mesh", "--dist-version", "2.4.1"]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "securemetrics_e2e", *args]


def installed_plugin_that_breaks_pytest(into: Path) -> Path:
    """A distribution registering a pytest11 plugin that fails on import, as a user's
    environment may hold plugins that have nothing to do with the run; on PYTHONPATH
    (``into``), it proves the command's pytest loads its own plugin only (cli.py)."""
    into.mkdir(parents=True, exist_ok=True)
    (into / "smx_poison_plugin.py").write_text(
        'raise RuntimeError("an installed pytest plugin was loaded into the run")\n'
    )
    info = into / "smx_poison-0.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: smx-poison\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nsmx_poison = smx_poison_plugin\n")
    return into


class Run:
    def __init__(self, cwd: Path, *args: str, pythonpath: Path | None = None) -> None:
        self.cwd = cwd
        env = {**os.environ, "NO_COLOR": "1"}
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        self.process = subprocess.Popen(
            command(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.stdout = self.stderr = ""
        self.code: int | None = None

    def wait(self) -> Run:
        self.stdout, self.stderr = self.process.communicate(timeout=120)
        self.code = self.process.returncode
        return self

    def phases(self) -> list[tuple[str, str, str]]:
        return [
            (m["variant"], m["phase"], m["status"])
            for line in self.stdout.splitlines()
            if (m := PHASE_LINE.match(line))
        ]


def ours(pid: int) -> set[str]:
    """Network namespaces and work directories of the local backend run in process ``pid``.

    Other test sessions may run local meshes on this machine at the same time: only names
    carrying this process's run id prefix are this test's business.
    """
    prefix = f"smx-{pid:x}"
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return {n for n in netns_names() if n.startswith(prefix)} | {
        p.name for p in tmp.glob(f"{prefix}*")
    }


def cli_runs(good_dir: Path, bad_dir: Path, plugins: Path) -> Iterator[dict[str, Run]]:
    """Start both runs, yield them finished, then check they left nothing behind. The
    clean one runs beside an installed pytest plugin that breaks any pytest loading it
    (``plugins``: installed_plugin_that_breaks_pytest)."""
    meta = [*DIST, "--contact", "mesh@example.com", "--url", "https://mesh.example"]
    poisoned = installed_plugin_that_breaks_pytest(plugins)
    started = {
        "good": Run(good_dir, "run", "--scenario", SCENARIOS, "--report", "out/report.yaml",
                    "--junit", "out/junit.xml", *meta, pythonpath=poisoned),
        "bad": Run(bad_dir, "run", "--scenario", SCENARIOS, "--local-fault",
                   "foreign-root-trusted", "--report", "report.json", "--junit", "junit.xml"),
    }  # fmt: skip
    yield {name: run.wait() for name, run in started.items()}
    for run in started.values():
        assert ours(run.process.pid) == set(), "a run left namespaces or directories behind"
