"""Bad inputs and unwritable outputs: exit 2, one line, before anything starts.

Run as a user runs the command (a subprocess). "Before anything starts" is observed, not
timed (a wall clock on a loaded machine measures the machine): nothing on stdout (a run
that starts prints its banner first) and no run directory in a TMPDIR of its own. An
output path
that fails only after the run (the disk filled up) is an error of its own, exit 2, with
the verdict left standing: never the "not conformant" exit 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from securemetrics_e2e.cli import _write_outputs, main
from securemetrics_e2e.outputs import OutputFailed, check_writable, write_atomically
from securemetrics_e2e.progress import Progress
from securemetrics_e2e.results import RunResult

CASES = {
    "report-in-proc": (["run", "--report", "/proc/r.yaml"], "--report '/proc/r.yaml'"),
    "junit-in-proc": (["run", "--junit", "/proc/j.xml"], "--junit '/proc/j.xml'"),
    "report-is-a-dir": (["run", "--report", "out.json/"], "is a directory"),
    "report-under-a-file": (["run", "--report", "afile/r.json"], "is not a directory"),
    "matrix-markdown": (["matrix", "x.yaml", "--markdown", "/proc/m.md"], "--markdown"),
    "matrix-html": (["matrix", "x.yaml", "--html", "/proc/m.html"], "--html '/proc/m.html'"),
    "unknown-patch": (["run", "--istio-version", "1.31.999"], "latest 1.31 patch"),
    "unknown-patch-plan": (["plan", "--istio-version", "1.31.999"], "latest 1.31 patch"),
    "empty-version": (["run", "--istio-version", ""], "Istio version ''"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_fast_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    argv, message = CASES[case]
    (tmp_path / "out.json").mkdir()
    (tmp_path / "afile").write_text("")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    before = set(tmp_path.iterdir())
    done = subprocess.run(
        [sys.executable, "-m", "securemetrics_e2e", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "NO_COLOR": "1", "TMPDIR": str(private_tmp)},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert list(private_tmp.iterdir()) == []  # no run directory: the backend never started
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("securemetrics-e2e: error: ")
    assert message in line
    assert set(tmp_path.iterdir()) == before


def test_a_custom_build_may_carry_an_unreleased_patch(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--backend", "kind", "--istio-version", "1.31.999"]
    assert main([*argv, "--tag", "1.31.999-custom", "--hub", "registry.example/istio"]) == 0
    assert "1.31.999" in capsys.readouterr().out


def test_a_write_failing_after_the_run_is_exit_2_not_a_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(report=str(tmp_path / "r.json"), junit="/proc/j.xml")
    result = RunResult()
    with open(os.devnull, "w") as devnull:
        assert _write_outputs(args, result, None, Progress(devnull)) is False
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "securemetrics-e2e: error: could not write junit /proc/j.xml: No such file or directory"
    ]
    assert (tmp_path / "r.json").is_file()  # the other output is still written


def test_check_writable_leaves_no_probe_and_creates_no_directory(tmp_path: Path) -> None:
    check_writable(tmp_path / "a" / "b" / "r.json", "--report")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputFailed, match=r"could not write --html /proc/x\.html"):
        write_atomically(Path("/proc/x.html"), b"x", "--html")


def test_shell_completion_completes_subcommands(tmp_path: Path) -> None:
    pytest.importorskip("argcomplete", reason="completion is optional: pip install argcomplete")
    out = tmp_path / "completions"
    line = "securemetrics-e2e ma"
    done = subprocess.run(
        [sys.executable, "-m", "securemetrics_e2e"],
        env={
            **os.environ,
            "_ARGCOMPLETE": "1",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
            "_ARGCOMPLETE_IFS": "\n",
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text().split() == ["matrix"]
