"""Named timeouts: one table, parsed the same on the CLI and the pytest path."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from securemetrics_e2e.backend import Origin, Workload
from securemetrics_e2e.catalog import MtlsMode, scenario
from securemetrics_e2e.cli import main
from securemetrics_e2e.cluster.options import options_from_pytest
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.local.envoy import Envoy
from securemetrics_e2e.local.netns import LoopbackNetwork
from securemetrics_e2e.local.owner import new_run_id
from securemetrics_e2e.spiffe import SpiffeId
from securemetrics_e2e.timeouts import CLUSTER, LOCAL, TIMEOUTS, apply, effective, parse
from securemetrics_e2e.waiting import WaitTimeout
from tests.fakekube import FakeKube
from tests.localmesh import requires_local_mesh
from tests.pytestcmd import pytest_command
from tests.test_cluster_backend import _backend, fake

__all__ = ["fake"]  # the backend tests' cluster (a fixture)
ROOT = Path(__file__).resolve().parent.parent
NAMES = ["target-up", "rollout", "scraper-ready", "scrape-request", "plaintext-request"]


def test_every_timeout_is_named_once_with_what_it_bounds() -> None:
    assert [t.name for t in TIMEOUTS] == NAMES
    assert all(t.bounds for t in TIMEOUTS)
    assert list(LOCAL.effective()) == list(CLUSTER.effective()) == NAMES


def test_an_override_reaches_the_backend() -> None:
    backend = LocalBackend()
    assert effective(backend) == LOCAL.effective()  # the local backend's own scale
    assert effective(backend)["target-up"] == 15.0
    apply(backend, parse(["target-up=2.5", "rollout=4,plaintext-request=0.5"]))
    assert effective(backend) == {
        **LOCAL.effective(), "target-up": 2.5, "rollout": 4.0, "plaintext-request": 0.5
    }  # fmt: skip


@requires_local_mesh
def test_a_rollout_override_bounds_the_local_proxy_wait(tmp_path: Path) -> None:
    # What bounds each pod's Envoy /ready wait is read back from the running pods, not
    # inferred from a deploy failing: an Envoy is sometimes ready at the very first poll
    # on a loaded machine, so "rollout=0.001 fails the deploy" held only by luck.
    backend = LocalBackend(network="loopback", workdir=tmp_path)
    apply(backend, parse(["rollout=37.5"]))
    try:
        deployment = backend.deploy(scenario("native-sidecar"), MtlsMode.PERMISSIVE)
        bounds = {backend.runtime_of(w).envoy.ready_timeout for w in deployment.workloads}
        assert bounds == {37.5}
    finally:
        backend.close()


@requires_local_mesh
def test_envoy_ready_wait_ends_at_its_bound(tmp_path: Path) -> None:
    # the other half: the bound ends the wait (no Envoy runs here, so it is never ready)
    network = LoopbackNetwork(new_run_id())
    try:
        pod = network.add_pod("nobody")
        envoy = Envoy(pod, tmp_path, {}, ready_timeout=0.2)
        with pytest.raises(WaitTimeout, match=r"after 0\.2s waiting for Envoy in pod .* /ready"):
            envoy.wait_ready()
    finally:
        network.close()


def test_a_rollout_override_reaches_the_cluster_options() -> None:
    class Config:
        def __init__(self, **given: object) -> None:
            self.given = {f"--{k.replace('_', '-')}": v for k, v in given.items()}

        def getoption(self, name: str, default: object = None) -> object:
            return self.given.get(name, default)

    def rollout(**given: object) -> float:
        return options_from_pytest(Config(sm_backend="kind", **given), "1.31.1").rollout_timeout

    assert rollout() == CLUSTER.rollout
    assert rollout(rollout_timeout=50.0) == 50.0
    assert rollout(rollout_timeout=50.0, timeout=["target-up=9,rollout=7"]) == 7.0


def test_request_overrides_reach_the_cluster_probe(fake: FakeKube, tmp_path: Path) -> None:
    backend = _backend(fake, tmp_path)
    apply(backend, parse(["plaintext-request=7"]))
    spec = scenario("native-sidecar").workloads[0]
    sid = SpiffeId.parse("spiffe://cluster.local/ns/ns1/sa/httpbin")
    workload = Workload(spec, "ns1", "httpbin-1", "10.244.0.9", sid)
    with pytest.raises(SecureMetricsError, match="curl could not run"):  # the fake has no curl
        backend.plaintext(workload, 15090, Origin.INSIDE_POD)
    curls = [c[3] for c in fake.calls if c[0] == "exec" and c[3].startswith("curl")]
    assert curls
    assert "--max-time 7 " in curls[-1]
    backend.close()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("target-up", "expected name=seconds"),
        ("rolout=5", "expected name=seconds with a name among: " + ", ".join(NAMES)),
        ("target-up=soon", "seconds must be a number above 0"),
        ("target-up=0", "seconds must be a number above 0"),
    ],
)
def test_a_bad_timeout_is_a_usage_error(value: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        parse([value])


def test_cli_and_pytest_refuse_a_bad_timeout_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--timeout", "target-up=-1"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    done = subprocess.run(
        pytest_command("scenarios", "--timeout", "nope=1"),
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("securemetrics-e2e: --timeout 'nope=1'")
