"""Any way a run ends leaves nothing behind and is reported for what it is.

SIGINT, SIGTERM, SIGHUP, and SIGKILL + next run; and a report that becomes unwritable
during the run (exit 2 after the verdict, never the "not conformant" 1).

Each test starts a real local run in a subprocess, waits until it has deployed (its pod
network exists and an Envoy of the run is up), sends the signal and then looks for what
the run owned: network namespaces and temporary directories named after its run id, and
processes carrying its run id in their environment (local/owner.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from securemetrics_e2e import signals
from securemetrics_e2e.local.netns import PodNetwork
from securemetrics_e2e.local.owner import (
    NETNS_DIR,
    RUN_ENV,
    new_run_id,
    run_processes,
    stop_own,
    sweep,
)
from securemetrics_e2e.waiting import NotYet, wait_for
from tests.localmesh import requires_local_mesh
from tests.pytestcmd import pytest_command

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
#: a scenario of one run unit (one pod and Prometheus), where the test is about how a run
#: ends and not about how many units it had
ONE_UNIT = "legacy-gateway"


def _leftovers(pid: int, tmp: Path | None = None) -> dict[str, list[str]]:
    """What runs owned by process ``pid`` hold now (empty lists: nothing); ``tmp``: the
    run's temporary directory parent (default: this process's)."""
    prefix = f"smx-{pid:x}_"
    namespaces = sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    tmp = tmp or Path(tempfile.gettempdir())
    return {
        "namespaces": namespaces,
        "processes": sorted(
            f"{p} {Path(f'/proc/{p}/comm').read_text().strip()}"
            for p, run in run_processes().items()
            if run.startswith(f"{pid:x}_") and Path(f"/proc/{p}").exists()
        ),
        "directories": sorted(p.name for p in tmp.glob(f"{prefix}*")),
    }


def _wait_deployed(proc: subprocess.Popen[str], tmp: Path | None = None) -> None:
    def deployed() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        left = _leftovers(proc.pid, tmp)
        if not left["namespaces"] and not left["directories"]:
            raise NotYet("no pod network yet")
        if not any(p.endswith(" envoy") for p in left["processes"]):
            raise NotYet(f"no Envoy of the run yet: {left['processes']}")

    wait_for("the run to deploy an Envoy", deployed, timeout=120)  # a bound, not a wait


def _start(argv: list[str], tmp: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "NO_COLOR": "1"}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cli_run(tmp: Path | None = None, scenario: str = "native-sidecar") -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "securemetrics_e2e", "run", "--scenario", scenario]
    return _start(argv, tmp)


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@requires_local_mesh
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: str(s.name)
)
def test_a_signalled_cli_run_stops_everything_it_started(sig: signal.Signals) -> None:
    # SIGINT lands while the four-unit scenario's other units still deploy; the other
    # signals take the same handler (signals.py), on the one-unit scenario
    proc = _cli_run(scenario="native-sidecar" if sig == signal.SIGINT else ONE_UNIT)
    _wait_deployed(proc)
    proc.send_signal(sig)
    out, err = _finish(proc)
    assert proc.returncode == 128 + sig, out + err
    assert f"stopped by {sig.name}" in err
    assert "Traceback" not in err
    assert _leftovers(proc.pid) == {"namespaces": [], "processes": [], "directories": []}


@requires_local_mesh
def test_a_sigterm_to_the_pytest_plugin_path_stops_everything() -> None:
    # `nox -s e2e` and a hand-run `pytest scenarios` reach the backend without the CLI
    argv = pytest_command("-q", "scenarios")
    proc = _start([*argv, "--scenario", "native-sidecar"])
    _wait_deployed(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = _finish(proc)
    assert proc.returncode != 0, out + err
    assert _leftovers(proc.pid) == {"namespaces": [], "processes": [], "directories": []}


@requires_local_mesh
def test_after_sigkill_the_next_run_sweeps_what_the_killed_one_left(tmp_path: Path) -> None:
    # Both runs keep their temporary directories under a TMPDIR of their own: any run on
    # the machine sweeps a dead run's namespaces and processes (another test worker,
    # another suite beside this one), but only a run sharing its TMPDIR sees the
    # directory, so "the next run swept" is this test's to observe, whatever runs beside.
    killed = _cli_run(tmp_path)
    _wait_deployed(killed, tmp_path)
    killed.kill()  # no handler can run: everything stays behind
    _finish(killed)
    left = _leftovers(killed.pid, tmp_path)
    assert left["directories"], left
    # any run sweeps: the following one is the one-unit scenario, not four units again
    following = _cli_run(tmp_path, ONE_UNIT)
    out, err = _finish(following)
    assert following.returncode == 0, out + err
    assert "note: removed what an interrupted earlier run left:" in out
    assert _leftovers(killed.pid, tmp_path) == {
        "namespaces": [],
        "processes": [],
        "directories": [],
    }


def _plant(run_id: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """A process and a directory carrying ``run_id``, as a run leaves them."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, RUN_ENV: run_id},
        start_new_session=True,
    )
    directory = tmp_path / f"smx-{run_id}-abc"
    directory.mkdir()
    return proc, directory


def test_sweep_removes_a_dead_owners_resources_and_never_a_live_ones(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead_run, live_run = f"{gone.pid:x}_1_0", new_run_id()
    dead_proc, dead_dir = _plant(dead_run, tmp_path)
    live_proc, live_dir = _plant(live_run, tmp_path)
    try:
        swept = sweep((tmp_path,))
        assert dead_proc.wait(timeout=10) == -signal.SIGTERM
        # membership, not equality: a run killed elsewhere on the machine (another test
        # worker, another suite) may have left processes this sweep rightly removes too
        assert dead_proc.pid in swept.processes
        assert live_proc.pid not in swept.processes
        assert not dead_dir.exists()
        assert str(dead_dir) in swept.directories
        assert live_proc.poll() is None
        assert live_dir.exists()
    finally:
        for proc in (dead_proc, live_proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_run_stops_its_own_orphans_and_never_another_runs(tmp_path: Path) -> None:
    # a stop signal between fork and the PID being recorded leaves a process only its run
    # id names: close() stops those, and only those (another live run's stay)
    mine, other = new_run_id(), new_run_id()
    mine_proc, _ = _plant(mine, tmp_path)
    other_proc, _ = _plant(other, tmp_path)
    try:
        assert stop_own(mine) == [mine_proc.pid]
        assert mine_proc.wait(timeout=10) == -signal.SIGTERM
        assert other_proc.poll() is None
    finally:
        for proc in (mine_proc, other_proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_sweep_leaves_names_of_other_shapes_alone(tmp_path: Path) -> None:
    # an older version of this suite named runs smx-<pid hex><n>-: never guess at those
    other = tmp_path / "smx-1a2b0-httpbin-3"
    other.mkdir()
    sweep((tmp_path,))
    assert other.exists()


@requires_local_mesh
@pytest.mark.parametrize("path", ["cli", "pytest"])
def test_a_report_unwritable_after_the_run_is_exit_2_after_the_verdict(
    path: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()  # writable when checked, before anything starts
    report = str(out / "report.json")
    if path == "cli":
        cli = [sys.executable, "-m", "securemetrics_e2e", "run", "--scenario", ONE_UNIT]
        proc = _start([*cli, "--report", report])
    else:
        argv = pytest_command("-q", "scenarios")
        proc = _start([*argv, "--scenario", ONE_UNIT, "--sm-report", report])
    _wait_deployed(proc)
    out.rmdir()
    out.write_text("")  # the directory is gone: the report cannot be written any more
    stdout, stderr = _finish(proc)
    assert proc.returncode == 2, stdout + stderr
    assert "securemetrics-e2e verdict: CONFORMANT" in stdout
    shown = stdout + stderr
    assert f"securemetrics-e2e: error: could not write report {report}: " in shown
    assert "Traceback" not in shown
    assert _leftovers(proc.pid) == {"namespaces": [], "processes": [], "directories": []}


@requires_local_mesh
def test_a_network_deletes_a_namespace_it_made_but_never_recorded() -> None:
    # a stop signal between `ip netns add` and the name being recorded: close() still
    # finds it by the run's prefix, and leaves another run's namespace alone
    network, other = PodNetwork(new_run_id()), PodNetwork(new_run_id())
    stray = f"smx-{network.run_id}-httpbin-9"
    subprocess.run(["ip", "netns", "add", stray], check=True)
    try:
        network.close()
        assert stray not in os.listdir(NETNS_DIR)
        assert other.node in os.listdir(NETNS_DIR)
    finally:
        other.close()
        subprocess.run(["ip", "netns", "del", stray], capture_output=True, check=False)


class _SignalledWhenCollected:
    def __del__(self) -> None:
        # the handler runs inside raise_signal (it checks for signals on return), so its
        # KeyboardInterrupt leaves this finalizer, where Python prints it "ignored"
        signal.raise_signal(signal.SIGTERM)


def test_a_stop_a_finalizer_swallowed_ends_the_next_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    swallowed: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: swallowed.append(u.exc_value))
    restore = signals.install()
    try:
        _SignalledWhenCollected()  # collected at once: the stop lands in its __del__
        assert [type(e) for e in swallowed] == [KeyboardInterrupt]
        assert signals.received() is signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM"):
            wait_for("anything", lambda: None, timeout=5)
    finally:
        signals.take()  # this process goes on: no later wait may raise the stop
        restore()


def test_a_checkpoint_never_cuts_cleanup_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "unraisablehook", lambda u: None)
    restore = signals.install()
    try:
        _SignalledWhenCollected()
        try:
            raise KeyboardInterrupt("stopped by SIGTERM")
        except KeyboardInterrupt:  # the stop on its way up: cleanup waits run
            assert wait_for("cleanup", lambda: "done", timeout=5) == "done"
        with ThreadPoolExecutor(1) as pool:  # a background window's thread never raises it
            assert pool.submit(wait_for, "window", lambda: 1, timeout=5).result() == 1
        signals.take()  # the session took the stop: teardown waits run
        assert wait_for("teardown", lambda: "done", timeout=5) == "done"
    finally:
        signals.take()
        restore()
