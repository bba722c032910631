"""Which run owns a local resource, and sweeping what a dead run left behind.

Every resource a local run makes carries its run id, and the run id names its owner: the
process id and that process's start time (so a recycled pid is not mistaken for the
owner). Network namespaces and the temporary directory carry it in their names
(``smx-<run id>-...``), the processes the run starts in their environment
(:data:`RUN_ENV`). A run killed by SIGKILL (or a machine that lost power mid-run) cannot
clean up; the next run does: :func:`sweep` removes every resource whose owner is gone,
and never one whose owner still runs.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

#: the environment variable naming the run id in every process a local run starts
RUN_ENV = "SECUREMETRICS_E2E_RUN"
NETNS_DIR = Path("/var/run/netns")
#: ``smx-<pid>_<start time>_<n>-...`` (hex, hex, decimal); the underscores keep names of
#: other shapes (older versions of this suite, other tools) from ever matching
_RUN_ID = re.compile(r"smx-(?P<run>(?P<pid>[0-9a-f]+)_(?P<start>[0-9a-f]+)_[0-9]+)-")
_counter = itertools.count()


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its ")"
    return int(stat.rsplit(")", 1)[1].split()[19])


def new_run_id() -> str:
    """A run id naming this process as the owner: ``<pid>_<start time>_<n>``."""
    pid = os.getpid()
    return f"{pid:x}_{start_time(pid) or 0:x}_{next(_counter)}"


def owner_alive(run_id: str) -> bool:
    """Whether the process that owns ``run_id`` still runs (the same process, not a reuse)."""
    match = _RUN_ID.match(f"smx-{run_id}-")
    if match is None:
        return True  # not a name this suite gives: never touch it
    started = start_time(int(match["pid"], 16))
    return started is not None and f"{started:x}" == match["start"]


def run_of(name: str) -> str | None:
    """The run id in a resource name ``smx-<run id>-...``, or None."""
    match = _RUN_ID.match(name)
    return match["run"] if match else None


def run_processes() -> dict[int, str]:
    """Every process carrying a run id in its environment: pid -> run id."""
    marker = f"{RUN_ENV}=".encode()
    found: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(marker):
                found[int(entry)] = var[len(marker) :].decode(errors="replace")
    return found


@dataclass
class Swept:
    """What :func:`sweep` removed: processes (pids), namespaces and directories."""

    processes: list[int] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.namespaces or self.directories)

    def summary(self) -> str:
        return (
            f"{len(self.processes)} processes, {len(self.namespaces)} network namespaces, "
            f"{len(self.directories)} temporary directories"
        )


def _stop(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM each pid (each one a process a dead run started), SIGKILL what outlives it."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def ended() -> None:
        # not our children (their parent died): no wait(), watch /proc instead
        alive = [pid for pid in pids if not _gone(pid)]
        if alive:
            raise NotYet(f"still running: {alive}")

    try:
        wait_for("a dead run's processes to stop", ended, timeout=timeout)
    except WaitTimeout:
        for pid in pids:
            if not _gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def stop_own(run_id: str) -> list[int]:
    """Stop what still carries ``run_id`` (this run's own, the owner alive): a process a
    stop signal orphaned between its fork and the run recording its PID. Run ids are
    unique per run (:func:`new_run_id`), so nothing another run started is touched."""
    mine = sorted(pid for pid, run in run_processes().items() if run == run_id)
    _stop(mine)
    return mine


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: it holds nothing but its pid) or not there at all."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def sweep(temp_parents: tuple[Path, ...] = ()) -> Swept:
    """Remove what runs whose owner is gone left behind; a live run's resources stay."""
    swept = Swept()
    dead = {pid: run for pid, run in run_processes().items() if not owner_alive(run)}
    _stop(sorted(dead))
    swept.processes = sorted(dead)
    try:
        namespaces = sorted(os.listdir(NETNS_DIR))
    except OSError:
        namespaces = []
    for name in namespaces:
        run = run_of(name)
        if run is None or owner_alive(run):
            continue
        done = subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        if done.returncode == 0:
            swept.namespaces.append(name)
    for parent in dict.fromkeys((Path(tempfile.gettempdir()), *temp_parents)):
        try:
            entries = sorted(parent.iterdir())
        except OSError:
            continue
        for entry in entries:
            run = run_of(entry.name)
            if run is None or owner_alive(run) or not entry.is_dir():
                continue
            shutil.rmtree(entry, ignore_errors=True)
            swept.directories.append(str(entry))
    return swept
