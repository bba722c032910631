"""The local backend leaves nothing behind and fails clearly on bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from securemetrics_e2e.catalog import MtlsMode, scenario
from securemetrics_e2e.errors import EnvironmentProblem, UsageError
from securemetrics_e2e.local.agent import start_agent
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.local.netns import LoopbackNetwork
from securemetrics_e2e.local.owner import run_processes
from securemetrics_e2e.results import Status
from securemetrics_e2e.runner import run_checks
from securemetrics_e2e.waiting import NotYet, wait_for
from tests.localmesh import child_pids, netns_names, requires_local_mesh
from tests.pytestcmd import pytest_command

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

#: the bound on a subprocess suite starting (imports, deploy) or stopping
STARTUP_BOUND = 120.0


def _owned(prefix: str) -> set[str]:
    return {n for n in netns_names() if n.startswith(prefix)}


@requires_local_mesh
def test_close_after_a_pass_leaves_no_process_namespace_or_file() -> None:
    # what this worker already runs (under xdist, a session fixture of an earlier test
    # file may hold a mesh): the test judges only the processes its backend started
    before = child_pids(os.getpid())
    backend = LocalBackend()
    with backend.deployed(scenario("native-sidecar"), MtlsMode.PERMISSIVE) as dep:
        outcomes = run_checks(backend, dep)
        prefix = f"smx-{backend.run_id}-"
        assert len(_owned(prefix)) == 3  # node, scraper, httpbin
        assert child_pids(os.getpid()) - before  # Envoy and Prometheus are running
        workdir = backend.workdir
    assert {o.status for o in outcomes} == {Status.PASS}
    assert _owned(prefix) == {prefix + "node", prefix + "prometheus"}  # scenario pod gone
    backend.close()
    assert _owned(prefix) == set()
    assert child_pids(os.getpid()) - before == set()
    assert backend.run_id not in run_processes().values()
    assert not workdir.exists()


@requires_local_mesh
def test_missing_prometheus_is_a_clear_error_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = child_pids(os.getpid())  # see test_close_after_a_pass_...
    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus
    backend = LocalBackend(network="loopback", workdir=tmp_path)
    with pytest.raises(EnvironmentProblem, match="Debian package `prometheus`"):
        backend.deploy(scenario("native-sidecar"), MtlsMode.PERMISSIVE)
    assert list(tmp_path.iterdir()) == []
    assert child_pids(os.getpid()) - before == set()
    assert backend.run_id not in run_processes().values()


def test_unknown_local_network_names_the_choices() -> None:
    with pytest.raises(UsageError, match="auto, netns or loopback"):
        LocalBackend(network="bridge")


def test_taken_port_gives_a_clear_error() -> None:
    pod = LoopbackNetwork("t").add_pod("httpbin")
    holder = socket.socket()
    holder.bind((pod.ip, 15020))
    holder.listen()
    try:
        with pytest.raises(EnvironmentProblem, match=r"15020 in pod httpbin: address in use"):
            start_agent(pod, pod.ip, app_port=None, localhost_only=False)
    finally:
        holder.close()


@requires_local_mesh
def test_two_backends_at_once_do_not_collide() -> None:
    results: dict[int, set[Status]] = {}

    def run(i: int) -> None:
        backend = LocalBackend()
        try:
            with backend.deployed(scenario("native-sidecar"), MtlsMode.PERMISSIVE) as dep:
                results[i] = {o.status for o in run_checks(backend, dep)}
        finally:
            backend.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: {Status.PASS}, 1: {Status.PASS}}


@requires_local_mesh
def test_loopback_fallback_runs_and_skips_what_needs_an_outside() -> None:
    backend = LocalBackend(network="loopback")
    try:
        with backend.deployed(scenario("hardened"), MtlsMode.PERMISSIVE) as dep:
            assert dep.workloads[0].pod_ip.startswith("127.")
            outcomes = {o.check: o for o in run_checks(backend, dep)}
    finally:
        backend.close()
    for check_id in ("hardened-envoy-stats-localhost", "hardened-agent-forbidden"):
        assert outcomes[check_id].status is Status.SKIP
        assert "pod-isolation" in outcomes[check_id].message
    assert outcomes["mtls-scrape"].status is Status.PASS
    assert outcomes["targets-up-merged"].status is Status.PASS


@requires_local_mesh
def test_sigint_to_a_running_suite_leaves_nothing_behind() -> None:
    proc = subprocess.Popen(
        pytest_command("-q", str(REPO / "scenarios"), "--scenario", "native-sidecar"),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    prefix = f"smx-{proc.pid:x}"
    try:

        def envoy_running() -> None:
            if not any(n.endswith("-node") for n in _owned(prefix)):
                raise NotYet("no pod network yet")
            names = [Path(f"/proc/{p}/comm").read_text().strip() for p in child_pids(proc.pid)]
            if "envoy" not in names:
                raise NotYet(f"children: {names}")

        # bounds, not waits: on a loaded machine a fresh interpreter's imports alone can
        # take tens of seconds, and the happy path returns as soon as Envoy runs
        wait_for("the suite to start Envoy", envoy_running, timeout=STARTUP_BOUND)
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=STARTUP_BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out.decode()
    assert _owned(prefix) == set(), out.decode()
    assert child_pids(proc.pid) == set()
