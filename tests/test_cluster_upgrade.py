"""The upgrade run's plan per version pair, and its driver on a FAKE Kubernetes API
(tests/fakekube.py) with a recording command runner: no cluster, no istioctl run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.catalog import SCENARIOS, UPGRADE, MtlsMode, scenario
from securemetrics_e2e.cluster.kube import RUN_LABEL
from securemetrics_e2e.cluster.layout import common_kubernetes, variant_plan
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.plan import render_plan
from securemetrics_e2e.cluster.steps import Plan
from securemetrics_e2e.cluster.tools import Platform, ToolCache
from securemetrics_e2e.cluster.upgrade import (
    UPGRADE_PHASES,
    UpgradeStep,
    canary_revision,
    run_upgrade,
    upgrade_plan,
)
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.versions import resolve
from tests.fakekube import FakeKube

RUN = "up9rade"
NS = f"sm-upgrade-permissive-{RUN}"


@pytest.fixture(autouse=True)
def _no_tools_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(Platform, "current", classmethod(lambda cls: cls("linux", "amd64")))


def _plan(tmp_path: Path, old: str, new: str, *, canary: bool = False, **kw: Any) -> Plan:
    options = ClusterOptions(
        run_id=RUN,
        cache_dir=tmp_path / "cache",
        upgrade_from=old,
        istio_version=new,
        canary=canary,
        **kw,
    )
    return upgrade_plan(options, cache=ToolCache(tmp_path / "cache"))


def _annotations(step: Any) -> dict[str, str]:
    (dep,) = [m for m in step.manifests if m["kind"] == "Deployment"]
    return dict(dep["spec"]["template"]["metadata"]["annotations"])


def _step(plan: Plan, phase: str, index: int = 0) -> UpgradeStep:
    step = [s for s in plan.steps if s.phase == phase][index]
    assert isinstance(step, UpgradeStep)
    return step


def test_130_to_131_switches_to_native_ports(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30", "1.31")
    text = plan.render_text()
    for version in ("1.30.5", "1.31.1"):
        url = f"https://github.com/istio/istio/releases/download/{version}/istioctl-{version}-linux-amd64.tar.gz"
        assert f"{url} (sha256 from {url}.sha256)" in text
    assert "upgrade run: Istio 1.30.5 -> 1.31.1, in place" in text
    before = _step(plan, "before")
    assert _annotations(before)["prometheus.istio.io/secure-port"] == "15091"
    switch = _step(plan, "switch")
    native = _annotations(switch)
    # the legacy 15091 goes (server-side apply drops it); the injector sets 15092 on the pods
    assert "prometheus.istio.io/secure-port" not in native
    assert "ENVOY_SECURE_MERGED_METRICS_PORT" in native["proxy.istio.io/config"]
    # the legacy Sidecar and its port-strict policy go once the native pod runs
    assert [(o["kind"], o["metadata"]["name"]) for o in switch.delete] == [
        ("PeerAuthentication", "secure-metrics-ports"),
        ("Sidecar", "httpbin-secure-metrics"),
    ]
    assert "Namespace" not in [o["kind"] for o in switch.manifests]  # it stays as it is
    assert all(o["metadata"]["labels"][RUN_LABEL] == RUN for o in plan.manifests())
    assert _step(plan, "after").verify == "native on 1.31.1"


def test_before_deploys_what_the_backend_deploys(tmp_path: Path) -> None:
    """One rendering: the plan's legacy deployment is the upgrade variant on the old version."""
    plan = _plan(tmp_path, "1.30", "1.31")
    variant = variant_plan(UPGRADE, MtlsMode.PERMISSIVE, resolve("1.30.5"), RUN)
    before = _step(plan, "before")
    assert before.manifests == list(variant.manifests)
    assert before.rollouts == list(variant.rollouts)
    assert variant.namespace == NS
    assert plan.variants[0].namespace == NS
    assert f"deploy upgrade[PERMISSIVE/port-strict] on Istio 1.30.5 in {NS}" in plan.render_text()


def test_129_to_130_stays_legacy(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.29", "1.30")
    switch = _step(plan, "switch")
    assert switch.manifests == []
    assert switch.delete == []
    assert "keep the legacy configuration" in switch.title
    assert _step(plan, "after").verify == "legacy on 1.30.5"
    assert "verify on Istio 1.30.5: legacy port 15091" in plan.render_text()


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
    assert upgrade[upgrade.index("--set") + 1] == "profile=default"
    assert "sm-e2e-upgrade-30-31" in " ".join(upgrade)  # the kind cluster of this pair


def test_only_the_workload_is_restarted(tmp_path: Path) -> None:
    """The scraper's TSDB is an emptyDir: restarting it would lose the window's samples."""
    for canary in (False, True):
        plan = _plan(tmp_path, "1.30", "1.31", canary=canary)
        restarts = [c for c in plan.commands() if "restart" in c]
        assert restarts == [
            [
                "kubectl",
                "--kubeconfig",
                ".pytest-kind/sm-e2e-upgrade-30-31/kubeconfig",
                "--context",
                "kind-sm-e2e-upgrade-30-31",
                "rollout",
                "restart",
                "deployment/httpbin",
                "-n",
                NS,
            ]
        ]
        assert not any("prometheus" in " ".join(c) for c in plan.commands())
        restart = _step(plan, "upgrade", 1)
        assert [str(r) for r in restart.rollouts] == [f"deployment/httpbin in {NS}"]
        why = " ".join(restart.details)
        assert "emptyDir" in why
        assert "Control Plane/Data Plane Skew" in why
        assert ("beside revision 1-31-1" in why) is canary


def test_canary_installs_a_revision_and_moves_the_default_tag(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30", "1.31", canary=True)
    assert canary_revision(resolve("1.31.1")) == "1-31-1"
    install, tag = _step(plan, "upgrade").commands
    assert install[:2] == ["istioctl-1.31.1", "install"]
    assert "revision=1-31-1" in install
    assert "profile=minimal" in install
    assert tag[:4] == ["istioctl-1.31.1", "tag", "set", "default"]
    assert tag[-3:] == ["--revision", "1-31-1", "--overwrite"]
    assert [str(r) for r in _step(plan, "upgrade").rollouts] == [
        "deployment/istiod-1-31-1 in istio-system"
    ]
    assert not any(c[1] == "upgrade" for c in plan.commands())
    assert "canary revision 1-31-1" in plan.render_text()
    removal = [c for s in plan.teardown for c in s.commands if c[0].startswith("istioctl")]
    assert removal == [
        ["istioctl-1.31.1", "tag", "remove", "default", "-y", *_kind_target()],
        ["istioctl-1.31.1", "uninstall", "-y", *_kind_target(), "--revision", "1-31-1"],
        ["istioctl-1.31.1", "uninstall", "-y", *_kind_target(), "--revision", "default"],
    ]
    assert not any("--purge" in c for c in plan.commands())


def _kind_target() -> list[str]:
    name = "sm-e2e-upgrade-30-31"
    return ["--kubeconfig", f".pytest-kind/{name}/kubeconfig", "--context", f"kind-{name}"]


@pytest.mark.parametrize("canary", [False, True])
def test_hub_goes_to_both_versions(tmp_path: Path, canary: bool) -> None:
    plan = _plan(tmp_path, "1.30", "1.31", hub="mirror.example/istio", canary=canary)
    installs = [c for c in plan.commands() if c[1] in ("install", "upgrade")]
    assert [c[:2] for c in installs] == [
        ["istioctl-1.30.5", "install"],
        ["istioctl-1.31.1", "install" if canary else "upgrade"],
    ]
    assert all("hub=mirror.example/istio" in c for c in installs)


def test_existing_cluster_plan_uses_the_kubeconfig(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    plan = _plan(tmp_path, "1.30", "1.31", mode="existing", kubeconfig=config, context="lab")
    assert [s.phase for s in plan.steps][:3] == ["tools", "cluster", "istio"]
    upgrade = next(c for c in plan.commands() if c[1] == "upgrade")
    assert upgrade[3:7] == ["--kubeconfig", str(config), "--context", "lab"]
    assert "must run Kubernetes 1.32-1.36" in plan.render_text()
    assert "kind" not in [c[0] for c in plan.commands()]


def test_render_plan_of_an_upgrade_run_lists_the_others_as_skipped(tmp_path: Path) -> None:
    options = ClusterOptions(
        run_id=RUN, cache_dir=tmp_path / "cache", upgrade_from="1.30", istio_version="1.31"
    )
    plan = render_plan(options, cache=ToolCache(tmp_path / "cache"))
    assert [v.id for v in plan.variants if v.skip is None] == ["upgrade[PERMISSIVE/port-strict]"]
    skipped = dict(plan.skipped)
    others = {u.id for s in SCENARIOS if s.name != "upgrade" for u in s.run_units()}
    assert set(skipped) == others
    assert all(
        r == "an upgrade run (--upgrade-from 1.30.5) deploys only the upgrade scenario: run "
        "the others without --upgrade-from"
        for r in skipped.values()
    )
    assert [s.phase for s in plan.steps] == [s.phase for s in _plan(tmp_path, "1.30", "1.31").steps]


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


TOOLS = {
    "istioctl-1.30.5": "/bin/ictl-old",
    "istioctl-1.31.1": "/bin/ictl-new",
    "kubectl": "/bin/kubectl",
}


def _existing(tmp_path: Path, *, canary: bool = False) -> Plan:
    # an existing cluster: the driver runs no kind or docker command
    return _plan(tmp_path, "1.30", "1.31", canary=canary, mode="existing")


def test_driver_runs_every_step_in_order(tmp_path: Path) -> None:
    plan = _existing(tmp_path)
    fake = _fake()
    ran: list[list[str]] = []
    checked: list[str] = []
    window = run_upgrade(
        plan.steps,
        fake,
        tools=TOOLS,
        run=lambda argv: ran.append(list(argv)),
        verify=checked.append,
        rollout_timeout=5,
    )
    assert [c[:2] for c in ran] == [
        ["/bin/ictl-old", "install"],
        ["/bin/ictl-new", "upgrade"],
        ["/bin/kubectl", "rollout"],  # the plan's role name, resolved
    ]
    assert checked == ["legacy on 1.30.5", "native on 1.31.1"]
    assert window.start < window.end
    assert fake.find("Sidecar", "httpbin-secure-metrics", NS) is None  # legacy removed
    dep = fake.find("Deployment", "httpbin", NS)
    assert dep is not None
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.istio.io/secure-port" not in annotations  # the injector's to set
    # the Sidecar goes only once the native Deployment was applied and read as rolled out
    calls = fake.calls
    deleted = calls.index(("delete", "Sidecar", "httpbin-secure-metrics", NS))
    applied = max(i for i, c in enumerate(calls) if c[:3] == ("apply", "Deployment", "httpbin"))
    read = max(
        i for i, c in enumerate(calls[:deleted]) if c[:3] == ("get", "Deployment", "httpbin")
    )
    assert applied < read < deleted


@pytest.mark.parametrize("canary", [False, True])
def test_driver_runs_only_the_chosen_phases(tmp_path: Path, canary: bool) -> None:
    plan = _existing(tmp_path, canary=canary)
    fake = _fake()
    ran: list[list[str]] = []
    progress: list[str] = []
    checked: list[str] = []
    # what the backend does before the upgrade: the scraper, the legacy deployment
    run_upgrade(
        plan.steps,
        fake,
        tools=TOOLS,
        run=lambda argv: ran.append(list(argv)),
        rollout_timeout=5,
        verify=checked.append,
        phases=("scraper", "before"),
    )
    assert ran == []
    assert checked == ["legacy on 1.30.5"]
    assert fake.find("Sidecar", "httpbin-secure-metrics", NS) is not None
    fake.calls.clear()
    run_upgrade(
        plan.steps,
        fake,
        tools=TOOLS,
        run=lambda argv: ran.append(list(argv)),
        rollout_timeout=5,
        progress=progress.append,
        phases=UPGRADE_PHASES,
    )
    expected = (
        [["/bin/ictl-new", "install"], ["/bin/ictl-new", "tag"]]
        if canary
        else [["/bin/ictl-new", "upgrade"]]
    )
    assert [c[:2] for c in ran] == [*expected, ["/bin/kubectl", "rollout"]]
    assert ran[-1][-4:] == ["restart", "deployment/httpbin", "-n", NS]
    # nothing of the other phases: only the switch's objects, no second verification
    applied = {c[1] for c in fake.calls if c[0] == "apply"}
    assert applied == {"PeerAuthentication", "ServiceAccount", "Service", "Deployment"}
    assert checked == ["legacy on 1.30.5"]
    assert fake.find("Sidecar", "httpbin-secure-metrics", NS) is None
    assert ("delete", "Sidecar", "httpbin-secure-metrics", NS) in fake.calls
    # numbered as --plan prints them
    steps = [re.match(r"\[upgrade\] (\d+)\. \[(\w+)\]", line) for line in progress]
    numbered = [(str(n), s.phase) for n, s in enumerate(plan.steps, 1) if s.phase in UPGRADE_PHASES]
    assert [(m[1], m[2]) for m in steps if m] == numbered
    assert [p for _, p in numbered] == ["upgrade", "upgrade", "switch"]
    assert f"{numbered[0][0]:>3}. [upgrade]" in plan.render_text()


def test_driver_rejects_an_unknown_phase(tmp_path: Path) -> None:
    plan = _existing(tmp_path)
    ran: list[list[str]] = []
    with pytest.raises(UsageError, match="no phase upgrades; its phases: tools, cluster"):
        run_upgrade(
            plan.steps,
            _fake(),
            tools=TOOLS,
            run=lambda argv: ran.append(list(argv)),
            rollout_timeout=5,
            phases=("upgrades",),
        )
    assert ran == []


def test_driver_stops_at_the_first_failed_verification(tmp_path: Path) -> None:
    plan = _existing(tmp_path)
    ran: list[list[str]] = []

    def verify(what: str) -> None:
        raise UsageError(f"check failed: {what}")

    with pytest.raises(UsageError, match=re.escape("check failed: legacy on 1.30.5")):
        run_upgrade(
            plan.steps,
            _fake(),
            tools=TOOLS,
            run=lambda argv: ran.append(list(argv)),
            verify=verify,
            rollout_timeout=5,
        )
    assert [c[1] for c in ran] == ["install"]  # never upgraded


def test_driver_refuses_an_unresolved_istioctl(tmp_path: Path) -> None:
    plan = _existing(tmp_path)
    ran: list[list[str]] = []
    with pytest.raises(UsageError, match=re.escape("no binary given for istioctl-1.30.5")):
        run_upgrade(
            plan.steps,
            _fake(),
            tools={},
            run=lambda argv: ran.append(list(argv)),
            verify=lambda w: None,
            rollout_timeout=5,
        )
    assert ran == []


def test_upgrade_plan_needs_upgrade_from(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="needs --upgrade-from"):
        upgrade_plan(ClusterOptions(run_id=RUN), cache=ToolCache(tmp_path / "cache"))
    assert scenario("upgrade") is UPGRADE
