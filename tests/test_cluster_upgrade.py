"""The upgrade scenario's plan per version pair, and its driver on a FAKE Kubernetes API
(tests/fakekube.py) with a recording command runner: no cluster, no istioctl run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.cluster.kube import RUN_LABEL
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.plan import Plan
from securemetrics_e2e.cluster.tools import Platform, ToolCache
from securemetrics_e2e.cluster.upgrade import (
    UpgradeStep,
    canary_revision,
    common_kubernetes,
    render_upgrade_plan,
    run_upgrade,
)
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.versions import resolve
from tests.fakekube import FakeKube

RUN = "up9rade"


@pytest.fixture(autouse=True)
def _no_tools_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(Platform, "current", classmethod(lambda cls: cls("linux", "amd64")))


def _plan(tmp_path: Path, old: str, new: str, *, canary: bool = False) -> Plan:
    options = ClusterOptions(run_id=RUN, cache_dir=tmp_path / "cache")
    return render_upgrade_plan(
        options, old, new, canary=canary, cache=ToolCache(tmp_path / "cache")
    )


def _annotations(step: Any) -> dict[str, str]:
    (dep,) = [m for m in step.manifests if m["kind"] == "Deployment"]
    return dict(dep["spec"]["template"]["metadata"]["annotations"])


def _step(plan: Plan, phase: str) -> UpgradeStep:
    (step,) = [s for s in plan.steps if s.phase == phase]
    assert isinstance(step, UpgradeStep)
    return step


def test_130_to_131_switches_to_native_ports(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30", "1.31")
    text = plan.render_text()
    for version in ("1.30.5", "1.31.1"):
        url = f"https://github.com/istio/istio/releases/download/{version}/istioctl-{version}-linux-amd64.tar.gz"
        assert f"{url} (sha256 from {url}.sha256)" in text
    before = next(s for s in plan.steps if s.title.startswith("deploy legacy-sidecar"))
    assert _annotations(before)["prometheus.istio.io/secure-port"] == "15091"
    switch = _step(plan, "switch")
    native = _annotations(switch)
    assert native["prometheus.istio.io/secure-port"] == "15092"
    assert "ENVOY_SECURE_MERGED_METRICS_PORT" in native["proxy.istio.io/config"]
    assert [(o["kind"], o["metadata"]["name"]) for o in switch.delete] == [
        ("Sidecar", "httpbin-secure-metrics")
    ]
    assert all(o["metadata"]["labels"][RUN_LABEL] == RUN for o in plan.manifests())


def test_129_to_130_stays_legacy(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.29", "1.30")
    switch = _step(plan, "switch")
    assert switch.manifests == []
    assert switch.delete == []
    assert "keep the legacy configuration" in switch.title
    assert "verify on Istio 1.30.5: legacy-sidecar" in plan.render_text()


@pytest.mark.parametrize("canary", [False, True])
def test_more_than_one_minor_is_refused_naming_both(tmp_path: Path, canary: bool) -> None:
    with pytest.raises(UsageError) as caught:
        _plan(tmp_path, "1.28", "1.31", canary=canary)
    message = str(caught.value)
    assert "1.28.10 to 1.31.1" in message
    assert "one minor at a time: 1.28.10 -> 1.29 -> 1.30 -> 1.31" in message
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(("old", "new"), [("1.31", "1.30"), ("1.30.1", "1.30.5")])
def test_not_an_upgrade_of_the_minor(tmp_path: Path, old: str, new: str) -> None:
    with pytest.raises(UsageError, match="from an older minor to a newer one"):
        _plan(tmp_path, old, new)


def test_in_place_order_of_steps(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30", "1.31")
    assert [s.phase for s in plan.steps] == [
        "tools",
        "cluster",
        "istio",
        "scraper",
        "before",
        "before",
        "upgrade",
        "upgrade",
        "switch",
        "after",
    ]
    commands = [c[:2] for c in plan.commands()]
    assert commands.index(["istioctl-1.30.5", "install"]) < commands.index(
        ["istioctl-1.31.1", "upgrade"]
    )
    upgrade = next(c for c in plan.commands() if c[1] == "upgrade")
    assert "--set" in upgrade
    assert "profile=default" in upgrade
    restarts = [c for c in plan.commands() if "restart" in c]
    assert [c[-3] for c in restarts] == ["deployment/httpbin", "deployment/prometheus"]


def test_canary_installs_a_revision_and_moves_the_default_tag(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30", "1.31", canary=True)
    assert canary_revision(resolve("1.31.1")) == "1-31-1"
    install, tag = _step_commands(plan, "upgrade")[:2]
    assert install[:2] == ["istioctl-1.31.1", "install"]
    assert "revision=1-31-1" in install
    assert "profile=minimal" in install
    assert tag[:4] == ["istioctl-1.31.1", "tag", "set", "default"]
    assert tag[-3:] == ["--revision", "1-31-1", "--overwrite"]
    assert not any(c[1] == "upgrade" for c in plan.commands())
    assert "sm-upgrade-canary-" in plan.render_text()


def _step_commands(plan: Plan, phase: str) -> list[list[str]]:
    return [c for s in plan.steps if s.phase == phase for c in s.commands]


def test_common_kubernetes() -> None:
    both = common_kubernetes(resolve("1.28"), resolve("1.29"))
    assert (both.oldest, both.newest) == ("1.31", "1.34")


# -- the driver on the fake API -------------------------------------------------------------


class Ready:
    """Plays the deployment controller: every Deployment read is rolled out."""

    def __call__(self, fake: FakeKube, dep: dict[str, Any]) -> None:
        gen = dep["metadata"].get("generation", 1)
        dep["status"] = {
            "observedGeneration": gen,
            "replicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 1,
            "readyReplicas": 1,
        }
        dep.setdefault("spec", {}).setdefault("replicas", 1)


def _fake() -> FakeKube:
    fake = FakeKube()
    fake.on_get["Deployment"] = Ready()
    for name in ("istiod", "istiod-1-31-1", "istio-ingressgateway"):
        fake.add(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": "istio-system"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}}},
            }
        )
    return fake


def test_driver_runs_every_step_in_order(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30", "1.31")
    fake = _fake()
    ran: list[list[str]] = []
    checked: list[str] = []
    window = run_upgrade(
        plan,
        fake,
        tools={"istioctl-1.30.5": "/bin/ictl-old", "istioctl-1.31.1": "/bin/ictl-new"},
        run=lambda argv: ran.append(list(argv)),
        verify=checked.append,
        rollout_timeout=5,
    )
    assert [c[:2] for c in ran][:2] == [["/bin/ictl-old", "install"], ["/bin/ictl-new", "upgrade"]]
    assert checked == ["legacy-sidecar on 1.30.5", "native-sidecar on 1.31.1"]
    assert window.start < window.end
    ns = f"sm-upgrade-inplace-{RUN}"
    assert fake.find("Sidecar", "httpbin-secure-metrics", ns) is None  # legacy removed
    dep = fake.find("Deployment", "httpbin", ns)
    assert dep is not None
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.istio.io/secure-port"] == "15092"
    assert ("delete", "Sidecar", "httpbin-secure-metrics", ns) in fake.calls


def test_driver_stops_at_the_first_failed_verification(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30", "1.31")
    ran: list[list[str]] = []

    def verify(what: str) -> None:
        raise UsageError(f"check failed: {what}")

    with pytest.raises(UsageError, match=re.escape("check failed: legacy-sidecar on 1.30.5")):
        run_upgrade(
            plan,
            _fake(),
            tools={"istioctl-1.30.5": "old", "istioctl-1.31.1": "new"},
            run=lambda argv: ran.append(list(argv)),
            verify=verify,
            rollout_timeout=5,
        )
    assert [c[1] for c in ran] == ["install"]  # never upgraded


def test_driver_refuses_an_unresolved_istioctl(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30", "1.31")
    with pytest.raises(UsageError, match=re.escape("no binary given for istioctl-1.30.5")):
        run_upgrade(
            plan, _fake(), tools={}, run=lambda argv: None, verify=lambda w: None, rollout_timeout=5
        )
