"""Processes the local backend starts, tracked by PID and always stopped.

Only processes this run started are ever signalled, and only by the PID it recorded.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.local.owner import RUN_ENV


@functools.cache
def binary_version(path: str) -> str:
    """The first line ``path --version`` prints (Envoy, Prometheus), for the report.

    A binary that cannot say is recorded as such rather than failing the run.
    """
    try:
        done = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if not lines:
        return f"unknown (exit {done.returncode}, no output)"
    return lines[0].removeprefix(path).strip()  # Envoy starts the line with its own path


class ManagedProcess:
    """A child process with its output in a log file, stopped by :meth:`stop`."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, run_id: str = "") -> None:
        self.name = name
        self.run_id = run_id
        self.argv = list(argv)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # the run id names the owner: a later run sweeps this process if the
                    # owner dies without stopping it (SIGKILL)
                    env={**os.environ, RUN_ENV: self.run_id} if self.run_id else None,
                    # its own process group, so a Ctrl-C at the terminal reaches only the
                    # suite, which then stops this process itself during teardown
                    start_new_session=True,
                )
            except FileNotFoundError as exc:
                raise EnvironmentProblem(f"cannot start {self.name}: {exc}") from None

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self._proc is None else self._proc.poll()

    def log_text(self) -> str:
        """The whole log ("" when it cannot be read)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; reaps the child. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            proc.wait()
