"""An upgrade run of the cluster backend, end to end on a FAKE Kubernetes API
(tests/fakekube.py): no cluster can run here.

:class:`Mesh` plays what the run drives from outside the API (istioctl, ``kubectl
rollout restart``) and what a cluster does in answer (istiod Deployments appear or
change, the sidecar injector moves to the version its default revision runs, the
deployment controller replaces pods). Every command the backend runs goes through it
and is recorded; nothing is executed. What is checked is the backend's control flow:
which version it installs first, which steps the upgrade runs and in which order,
that it finds the restarted pod and judges it with the upgraded spec, that the scraper
keeps its pod, and that bad options stop the run before any command.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from securemetrics_e2e.catalog import (
    ENVOY_JOB,
    SCENARIOS,
    UPGRADE,
    Feature,
    MetricsMode,
    MtlsMode,
    RunUnit,
    scenario,
)
from securemetrics_e2e.cluster import istio, pins
from securemetrics_e2e.cluster import steps as steps_module
from securemetrics_e2e.cluster import upgrading as upgrading_module
from securemetrics_e2e.cluster.backend import ClusterBackend
from securemetrics_e2e.cluster.bootstrap import PreparedCluster, backend_on, make_cluster_backend
from securemetrics_e2e.cluster.errors import DeployFailed, DownloadFailed, IstioConflict
from securemetrics_e2e.cluster.kube import FIELD_MANAGER
from securemetrics_e2e.cluster.layout import common_kubernetes, kind_identity
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.rotation import parse_go_duration
from securemetrics_e2e.cluster.setup import PhaseTimer, Undo
from securemetrics_e2e.cluster.tools import Platform, ToolCache, istioctl_spec
from securemetrics_e2e.cluster.upgrade import UPGRADE_PHASES, upgrade_plan
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.upgrade_window import UpgradingBackend
from securemetrics_e2e.versions import resolve
from tests.fakekube import FakeKube, namespace
from tests.pytestcmd import pytest_command
from tests.tlsservers import closed_port

RUN = "upr0n"
NS = f"sm-upgrade-permissive-{RUN}"
SCRAPER_NS = f"sm-scraper-{RUN}"
_ISTIOCTL_VERSION = re.compile(r"tools/istioctl/([^/]+)/")


class Mesh:
    """Plays istioctl, kubectl and the cluster's answers to them on a FakeKube.

    ``move_tag=False`` plays a default revision tag that did not move: the injector
    keeps injecting the old proxies.
    """

    def __init__(self, fake: FakeKube, *, move_tag: bool = True) -> None:
        self.fake = fake
        self.move_tag = move_tag
        self.commands: list[list[str]] = []
        self.injector: str | None = None  # the proxy version new pods get
        self.revisions: dict[str, str] = {}
        self.ip = 10
        fake.on_get["Deployment"] = self.controller

    # -- commands ----------------------------------------------------------------------

    def __call__(self, argv: Sequence[str]) -> object:
        argv = list(argv)
        self.commands.append(argv)
        self.fake.calls.append(("run", *argv))
        tool = Path(argv[0]).name
        if tool == "istioctl":
            found = _ISTIOCTL_VERSION.search(argv[0])
            assert found is not None, f"not a resolved istioctl: {argv[0]}"
            self._istioctl(found[1], argv)
        elif tool == "kubectl" and "restart" in argv:
            name = argv[argv.index("restart") + 1].removeprefix("deployment/")
            ns = argv[argv.index("-n") + 1]
            restarted = {"kubectl.kubernetes.io/restartedAt": f"restart-{len(self.commands)}"}
            self.fake.patch(
                "apps/v1",
                "Deployment",
                name,
                ns,
                {"spec": {"template": {"metadata": {"annotations": restarted}}}},
            )
        return ""

    def _istioctl(self, version: str, argv: list[str]) -> None:
        verb = argv[1]
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        revision = next((s.split("=", 1)[1] for s in sets if s.startswith("revision=")), None)
        if verb in ("install", "upgrade") and revision is None:
            self.control_plane("istiod", version)
            self.deployment("istio-ingressgateway", "istio-system", "proxyv2", version)
            self.injector = version
        elif verb == "install":
            assert revision is not None
            self.control_plane(f"istiod-{revision}", version, revision)
            self.revisions[revision] = version
        elif verb == "tag" and self.move_tag:
            self.injector = self.revisions[argv[argv.index("--revision") + 1]]

    def control_plane(self, name: str, version: str, revision: str | None = None) -> None:
        labels = {"app": "istiod", **({"istio.io/rev": revision} if revision else {})}
        self.deployment(name, "istio-system", "pilot", version, labels)

    def deployment(
        self,
        name: str,
        ns: str,
        image: str,
        version: str,
        labels: dict[str, str] | None = None,
    ) -> None:
        labels = labels or {"app": name}
        # istioctl's field manager, not the run's: the tests tell the run's applies apart
        self.fake.apply(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": labels["app"]}},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "containers": [
                                {"name": "main", "image": f"docker.io/istio/{image}:{version}"}
                            ]
                        },
                    },
                },
            },
            field_manager="istioctl",
        )

    # -- the cluster's answers -----------------------------------------------------------

    def controller(self, fake: FakeKube, dep: dict[str, Any]) -> None:
        """One pod per Deployment generation, injected when its namespace asks for it."""
        meta, spec = dep["metadata"], dep["spec"]
        ns, generation = meta["namespace"], meta.get("generation", 1)
        template = spec.get("template") or {}
        pod_name = f"{meta['name']}-{generation}"
        if fake.find("Pod", pod_name, ns) is None:
            for old in fake.list("v1", "Pod", ns):
                if re.fullmatch(rf"{re.escape(meta['name'])}-\d+", old["metadata"]["name"]):
                    fake.delete("v1", "Pod", old["metadata"]["name"], ns)
            containers = [
                {"name": c.get("name"), "image": c.get("image")}
                for c in (template.get("spec") or {}).get("containers") or []
            ]
            labels = (fake.find("Namespace", ns) or {}).get("metadata", {}).get("labels") or {}
            if labels.get("istio-injection") == "enabled":
                image = f"docker.io/istio/proxyv2:{self.injector}"
                containers.append({"name": "istio-proxy", "image": image})
            self.ip += 1
            fake.add(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": pod_name,
                        "namespace": ns,
                        "labels": dict((template.get("metadata") or {}).get("labels") or {}),
                        "creationTimestamp": f"2026-11-21T10:{self.ip:02}:00Z",
                    },
                    "spec": {"containers": containers},
                    "status": {"phase": "Running", "podIP": f"10.244.0.{self.ip}"},
                }
            )
        dep["status"] = {
            "observedGeneration": generation,
            "replicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 1,
            "readyReplicas": 1,
        }

    def pods(self, ns: str) -> list[str]:
        return sorted(k[3] for k in self.fake.objects if k[1] == "Pod" and k[2] == ns)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no istioctl found on PATH
    monkeypatch.setattr(Platform, "current", classmethod(lambda cls: cls("linux", "amd64")))


def _seed_istioctl(cache: ToolCache, *versions: str) -> dict[str, str]:
    """Verified-looking cached istioctl binaries (never executed: Mesh runs commands)."""
    paths = {}
    for version in versions:
        target = cache.path_for(istioctl_spec(version))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"#!/bin/sh\necho 'never run: istioctl {version}'\nexit 1\n")
        target.chmod(0o755)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        target.with_name("istioctl.sha256").write_text(digest + "\n")
        paths[version] = str(target)
    return paths


@pytest.fixture
def fake() -> FakeKube:
    kube = FakeKube()
    for name in ("kube-system", "istio-system"):
        kube.add(namespace(name))
    return kube


def _options(tmp_path: Path, **kw: Any) -> ClusterOptions:
    values: dict[str, Any] = {
        "mode": "existing",
        "run_id": RUN,
        "cache_dir": tmp_path / "cache",
        "artifacts_dir": tmp_path / "artifacts",
        "rollout_timeout": 10,
        "upgrade_from": "1.30",
        "istio_version": "1.31",
    }
    values.update(kw)
    return ClusterOptions(**values)


def _start(tmp_path: Path, fake: FakeKube, mesh: Mesh, **kw: Any) -> ClusterBackend:
    return backend_on(
        _options(tmp_path, **kw),
        PreparedCluster(fake, istio.KubeTarget(None, None), Path("kubectl"), None),
        timer=PhaseTimer(lambda line: None),
        cache=ToolCache(tmp_path / "cache"),
        undo=Undo(),
        run=mesh,
    )


def _scraper(fake: FakeKube) -> tuple[int, list[str]]:
    dep = fake.find("Deployment", "prometheus", SCRAPER_NS)
    assert dep is not None
    pods = sorted(k[3] for k in fake.objects if k[1] == "Pod" and k[2] == SCRAPER_NS)
    return int(dep["metadata"]["generation"]), pods


# -- setting up: the older version first -----------------------------------------------------


def test_upgrade_run_installs_the_older_istio_first(fake: FakeKube, tmp_path: Path) -> None:
    ctl = _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    mesh = Mesh(fake)
    backend = _start(tmp_path, fake, mesh)
    assert mesh.commands == [[ctl["1.30.5"], "install", "-y", "--set", "profile=default"]]
    installed = fake.calls.index(("run", *mesh.commands[0]))
    first_apply = next(
        i for i, c in enumerate(fake.calls) if c[:3] == ("apply", "Namespace", SCRAPER_NS)
    )
    assert installed < first_apply  # Istio before the scraper
    assert backend.version == resolve("1.30.5")
    assert backend.istioctl == ctl["1.30.5"]
    assert backend.upgrade_versions() == (resolve("1.30.5"), resolve("1.31.1"))
    assert backend.istio_installed_by_run
    assert Feature.MESH_UPGRADE in backend.features
    assert Feature.NATIVE_SECURE_PORTS not in backend.features  # 1.30 has none yet
    # continuity is judged in the interval the deployed scraper really scrapes at
    (config,) = [m for m in backend.scraper.manifests if m["kind"] == "ConfigMap"]
    interval = yaml.safe_load(config["data"]["prometheus.yml"])["global"]["scrape_interval"]
    assert backend.scrape_interval_s == parse_go_duration(interval).total_seconds()
    assert isinstance(backend, UpgradingBackend)
    facts = backend.describe()
    assert facts["upgrade"] == "Istio 1.30.5 -> 1.31.1 (in place)"
    assert facts["istio_version"] == "1.30.5"
    # the scraper's proxy came from the older injector
    (scraper_pod,) = mesh.pods(SCRAPER_NS)
    proxy = fake.find("Pod", scraper_pod, SCRAPER_NS)
    assert proxy is not None
    assert "docker.io/istio/proxyv2:1.30.5" in [c["image"] for c in proxy["spec"]["containers"]]
    backend.close()
    # only the revision it installed (istio.uninstall_command: never --purge)
    assert mesh.commands[-1] == [ctl["1.30.5"], "uninstall", "-y", "--revision", "default"]


def test_kind_cluster_runs_a_kubernetes_both_versions_support() -> None:
    upgrade = ClusterOptions(upgrade_from="1.28", istio_version="1.29")
    name, image = kind_identity(upgrade)
    assert name == "sm-e2e-upgrade-28-29"
    assert image == pins.node_image(common_kubernetes(resolve("1.28"), resolve("1.29")))
    assert "kindest/node:v1.34." in image  # 1.29 alone would take 1.35, which 1.28 lacks
    plain_name, plain_image = kind_identity(ClusterOptions(istio_version="1.29"))
    assert (plain_name, "kindest/node:v1.35." in plain_image) == ("sm-e2e-1-29", True)
    given = ClusterOptions(upgrade_from="1.28", istio_version="1.29", kind_image="my/node:1")
    assert kind_identity(given)[1] == "my/node:1"


def test_installed_older_istio_is_upgraded_not_reinstalled(fake: FakeKube, tmp_path: Path) -> None:
    ctl = _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    mesh = Mesh(fake)
    mesh(["/opt/tools/istioctl/1.30.5/x/istioctl", "install", "-y"])  # installed earlier
    mesh.commands.clear()
    backend = _start(tmp_path, fake, mesh)
    assert mesh.commands == []
    assert not backend.istio_installed_by_run
    dep = backend.deploy(UPGRADE, MtlsMode.PERMISSIVE)
    backend.upgrade(dep)
    assert [c[1] for c in mesh.commands] == ["upgrade", "rollout"]
    assert mesh.commands[0][0] == ctl["1.31.1"]
    backend.close()
    assert [c for c in mesh.commands if "uninstall" in c] == []  # not ours to remove


@pytest.mark.parametrize(
    ("image", "labels", "problem"),
    [
        ("docker.io/istio/pilot:1.31.1", {"app": "istiod"}, "already runs Istio 1.31.1"),
        (
            "docker.io/istio/pilot:1.30.5",
            {"app": "istiod", "istio.io/rev": "stable"},
            "istio-system, revision stable",
        ),
        ("registry.local/pilot@sha256:" + "a" * 64, {"app": "istiod"}, "(version unknown)"),
    ],
)
def test_any_other_istio_is_refused_before_anything_runs(
    fake: FakeKube, tmp_path: Path, image: str, labels: dict[str, str], problem: str
) -> None:
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    mesh = Mesh(fake)
    fake.add(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "istiod", "namespace": "istio-system", "labels": labels},
            "spec": {"template": {"spec": {"containers": [{"name": "discovery", "image": image}]}}},
        }
    )
    with pytest.raises(IstioConflict) as caught:
        _start(tmp_path, fake, mesh)
    message = str(caught.value)
    assert problem in message
    assert "an upgrade run installs and upgrades Istio itself" in message
    assert "use a cluster without Istio, or one running Istio 1.30.5 in istio-system" in message
    assert mesh.commands == []
    assert [c for c in fake.calls if c[0] in ("apply", "patch", "delete")] == []


def test_the_newer_istioctl_is_resolved_before_anything_is_installed(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download that fails must not come after minutes of setup, inside the window."""
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5")  # 1.31.1 is not cached
    with closed_port() as port:
        monkeypatch.setenv("SECUREMETRICS_E2E_ISTIO_BASE_URL", f"http://127.0.0.1:{port}")
        mesh = Mesh(fake)
        with pytest.raises(DownloadFailed, match=re.escape("cannot download istioctl 1.31.1")):
            _start(tmp_path, fake, mesh)
    assert mesh.commands == []
    assert [c for c in fake.calls if c[0] in ("apply", "patch", "delete")] == []


# -- bad options: nothing runs ------------------------------------------------------------

BAD = [
    (
        {"upgrade_from": None, "canary": True},
        "--canary only chooses how an upgrade run upgrades: add --upgrade-from",
    ),
    ({"revision": "canary"}, "--istio-revision cannot be combined with --upgrade-from"),
    ({"tag": "1.31.1-distroless"}, "--istio-tag cannot be combined with --upgrade-from"),
    ({"istioctl_bin": Path("/usr/bin/istioctl")}, "--istioctl-bin cannot be combined"),
    ({"upgrade_from": "1.28"}, "one minor at a time: 1.28.10 -> 1.29 -> 1.30 -> 1.31"),
    ({"upgrade_from": "1.31", "istio_version": "1.30"}, "from an older minor to a newer one"),
]


@pytest.mark.parametrize(("bad", "message"), BAD, ids=[m[:24] for _, m in BAD])
def test_bad_options_fail_before_any_command(
    fake: FakeKube,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bad: dict[str, Any],
    message: str,
) -> None:
    mesh = Mesh(fake)
    with pytest.raises(UsageError, match=re.escape(message)):
        _start(tmp_path, fake, mesh, **bad)
    assert mesh.commands == []
    assert fake.calls == []
    # from the top: refused before the container runtime is even looked for (there is
    # none here: a later check would raise NoContainerRuntime instead)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(UsageError, match=re.escape(message)):
        make_cluster_backend(_options(tmp_path, mode="kind", **bad))
    assert list(work.iterdir()) == []
    assert not (tmp_path / "cache").exists()


# -- what a run leaves out ------------------------------------------------------------------


def test_scope_of_an_upgrade_run(fake: FakeKube, tmp_path: Path) -> None:
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    backend = _start(tmp_path, fake, Mesh(fake))
    assert backend.scope_reason(UPGRADE) is None
    for s in SCENARIOS:
        if s.name != "upgrade":
            assert backend.scope_reason(s) == (
                "an upgrade run (--upgrade-from 1.30.5) deploys only the upgrade scenario: "
                "run the others without --upgrade-from"
            )
    applies = len([c for c in fake.calls if c[0] == "apply"])
    with pytest.raises(UsageError, match="deploys only the upgrade scenario"):
        backend.deploy(scenario("legacy-sidecar"), MtlsMode.PERMISSIVE)
    strict = RunUnit(scenario("legacy-sidecar"), MtlsMode.STRICT)
    results = backend.deploy_many([strict])
    assert isinstance(results[strict.key], UsageError)
    assert len([c for c in fake.calls if c[0] == "apply"]) == applies
    backend.close()


def test_scope_outside_an_upgrade_run(tmp_path: Path) -> None:
    fake = FakeKube()
    options = ClusterOptions(mode="existing", istio_version="1.31.1", run_id=RUN)
    backend = ClusterBackend(
        options,
        version=resolve("1.31.1"),
        api=fake,
        target=istio.KubeTarget(None, None),
        kubectl="kubectl",
        istioctl=None,
        cache=ToolCache(tmp_path / "cache"),
        timer=PhaseTimer(lambda line: None),
        run=Mesh(fake),
    )
    reason = (
        "the upgrade scenario needs an upgrade run: add --upgrade-from "
        "<previous minor, e.g. 1.30.5>"
    )
    assert backend.scope_reason(UPGRADE) == reason
    assert backend.scope_reason(scenario("native-sidecar")) is None
    assert Feature.MESH_UPGRADE in backend.features
    with pytest.raises(UsageError, match=re.escape(reason)):
        backend.upgrade_versions()
    with pytest.raises(UsageError, match="needs an upgrade run"):
        backend.deploy(UPGRADE, MtlsMode.PERMISSIVE)
    assert [c for c in fake.calls if c[0] == "apply"] == []


# -- the upgrade itself ----------------------------------------------------------------------


def test_in_place_upgrade_moves_the_workload_to_native_ports(
    fake: FakeKube, tmp_path: Path
) -> None:
    ctl = _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    mesh = Mesh(fake)
    backend = _start(tmp_path, fake, mesh)
    dep = backend.deploy(UPGRADE, MtlsMode.PERMISSIVE)
    assert dep.namespace == NS
    (before,) = dep.workloads
    assert before.spec.mode is MetricsMode.LEGACY
    assert before.pod_name == "httpbin-1"
    assert fake.find("Sidecar", "httpbin-secure-metrics", NS) is not None
    scraper = _scraper(fake)
    mesh.commands.clear()

    upgraded = backend.upgrade(dep)

    assert mesh.commands == [
        [ctl["1.31.1"], "upgrade", "-y", "--set", "profile=default"],
        ["kubectl", "rollout", "restart", "deployment/httpbin", "-n", NS],
    ]
    # the scraper keeps its pod (and with it the window's samples)
    assert _scraper(fake) == scraper
    assert not any("prometheus" in " ".join(c) for c in mesh.commands)
    # relocated: the pod running now, with the new proxy and the native spec
    (after,) = upgraded.workloads
    assert mesh.pods(NS) == [after.pod_name]
    assert after.pod_name != before.pod_name
    pod = fake.find("Pod", after.pod_name, NS)
    assert pod is not None
    assert after.pod_ip == pod["status"]["podIP"] != before.pod_ip
    assert "docker.io/istio/proxyv2:1.31.1" in [c["image"] for c in pod["spec"]["containers"]]
    assert after.spec.mode is MetricsMode.NATIVE
    assert ENVOY_JOB in after.spec.jobs
    assert (upgraded.scenario, upgraded.namespace) == (UPGRADE, NS)
    assert str(after.spiffe_id) == f"spiffe://cluster.local/ns/{NS}/sa/httpbin"
    assert fake.find("Sidecar", "httpbin-secure-metrics", NS) is None
    live = fake.find("Deployment", "httpbin", NS)
    assert live is not None
    annotations = live["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.istio.io/secure-port" not in annotations  # the injector's to set
    # the backend now judges and tears down as Istio 1.31.1
    assert backend.version == resolve("1.31.1")
    assert Feature.NATIVE_SECURE_PORTS in backend.features
    assert backend.istioctl == ctl["1.31.1"]
    assert backend.describe()["istio_version"] == "1.31.1"
    assert backend.deploy(UPGRADE, MtlsMode.PERMISSIVE) is upgraded
    with pytest.raises(
        SecureMetricsError, match=re.escape("already upgraded Istio 1.30.5 to 1.31.1")
    ):
        backend.upgrade(dep)
    backend.close()
    assert mesh.commands[-1] == [ctl["1.31.1"], "uninstall", "-y", "--revision", "default"]
    assert fake.find("Namespace", NS) is None
    assert fake.find("Namespace", SCRAPER_NS) is None


def test_canary_upgrade_moves_the_default_tag_then_restarts(fake: FakeKube, tmp_path: Path) -> None:
    ctl = _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    mesh = Mesh(fake)
    backend = _start(tmp_path, fake, mesh, canary=True)
    assert backend.describe()["upgrade"] == "Istio 1.30.5 -> 1.31.1 (canary revision 1-31-1)"
    dep = backend.deploy(UPGRADE, MtlsMode.PERMISSIVE)
    scraper = _scraper(fake)
    mesh.commands.clear()
    upgraded = backend.upgrade(dep)
    assert mesh.commands == [
        [
            ctl["1.31.1"],
            "install",
            "-y",
            "--set",
            "profile=minimal",
            "--set",
            "revision=1-31-1",
        ],
        [ctl["1.31.1"], "tag", "set", "default", "--revision", "1-31-1", "--overwrite"],
        ["kubectl", "rollout", "restart", "deployment/httpbin", "-n", NS],
    ]
    assert _scraper(fake) == scraper
    istiod = fake.find("Deployment", "istiod", "istio-system")
    assert istiod is not None  # the old control plane keeps running beside the revision
    (after,) = upgraded.workloads
    assert after.pod_name == mesh.pods(NS)[0] != dep.workloads[0].pod_name
    assert after.spec.mode is MetricsMode.NATIVE
    backend.close()
    # what the run created, newest first: its tag, its canary revision, its first revision
    assert mesh.commands[-3:] == [
        [ctl["1.31.1"], "tag", "remove", "default", "-y"],
        [ctl["1.31.1"], "uninstall", "-y", "--revision", "1-31-1"],
        [ctl["1.31.1"], "uninstall", "-y", "--revision", "default"],
    ]


@pytest.mark.parametrize("canary", [False, True])
def test_upgrade_runs_the_plans_upgrade_and_switch_steps(
    fake: FakeKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, canary: bool
) -> None:
    """What the backend runs is what --plan prints for those phases, and building it
    resolves no tool again (the plan's tools step hashes binaries, may run istioctl)."""
    ctl = _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    plan = upgrade_plan(_options(tmp_path, canary=canary), cache=ToolCache(tmp_path / "cache"))
    mesh = Mesh(fake)
    backend = _start(tmp_path, fake, mesh, canary=canary)
    dep = backend.deploy(UPGRADE, MtlsMode.PERMISSIVE)
    mesh.commands.clear()
    fake.calls.clear()

    def no_resolution(*args: object, **kw: object) -> str:
        raise AssertionError("the upgrade resolved a tool again")

    monkeypatch.setattr(steps_module, "describe_resolution", no_resolution)
    monkeypatch.setattr(upgrading_module, "resolve_tool", no_resolution)
    backend.upgrade(dep)
    roles = {"istioctl-1.31.1": ctl["1.31.1"]}
    phase_steps = [s for s in plan.steps if s.phase in UPGRADE_PHASES]
    assert mesh.commands == [
        [roles.get(c[0], c[0]), *c[1:]] for s in phase_steps for c in s.commands
    ]
    applied = [c[1:3] for c in fake.calls if c[0] == "apply" and c[3] == FIELD_MANAGER]
    assert applied == [(m["kind"], m["metadata"]["name"]) for s in phase_steps for m in s.manifests]
    assert applied  # 1.30 -> 1.31 switches: the native objects are applied
    backend.close()


def test_129_to_130_keeps_the_legacy_configuration(fake: FakeKube, tmp_path: Path) -> None:
    ctl = _seed_istioctl(ToolCache(tmp_path / "cache"), "1.29.8", "1.30.5")
    mesh = Mesh(fake)
    backend = _start(tmp_path, fake, mesh, upgrade_from="1.29", istio_version="1.30")
    assert mesh.commands[0][:2] == [ctl["1.29.8"], "install"]
    dep = backend.deploy(UPGRADE, MtlsMode.PERMISSIVE)
    mesh.commands.clear()
    upgraded = backend.upgrade(dep)
    assert mesh.commands == [
        [ctl["1.30.5"], "upgrade", "-y", "--set", "profile=default"],
        ["kubectl", "rollout", "restart", "deployment/httpbin", "-n", NS],
    ]
    (after,) = upgraded.workloads
    assert after.spec.mode is MetricsMode.LEGACY
    assert after.spec.jobs == dep.workloads[0].spec.jobs
    assert after.pod_name == "httpbin-2"  # restarted once, nothing switched
    assert fake.find("Sidecar", "httpbin-secure-metrics", NS) is not None
    assert Feature.NATIVE_SECURE_PORTS not in backend.features
    backend.close()


def test_a_restart_still_on_the_old_proxy_fails_the_upgrade(fake: FakeKube, tmp_path: Path) -> None:
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    mesh = Mesh(fake, move_tag=False)
    backend = _start(tmp_path, fake, mesh, canary=True)
    dep = backend.deploy(UPGRADE, MtlsMode.PERMISSIVE)
    with pytest.raises(DeployFailed) as caught:
        backend.upgrade(dep)
    message = str(caught.value)
    assert "runs istio-proxy docker.io/istio/proxyv2:1.30.5 after the upgrade" in message
    assert "not Istio 1.31.1" in message
    assert "is the default revision tag on 1-31-1?" in message
    backend.close()


def test_upgrade_refuses_what_it_cannot_move(fake: FakeKube, tmp_path: Path) -> None:
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    mesh = Mesh(fake)
    backend = _start(tmp_path, fake, mesh)
    dep = backend.deploy(UPGRADE, MtlsMode.PERMISSIVE)
    backend.teardown(dep)
    mesh.commands.clear()
    with pytest.raises(UsageError, match="moves the deployed upgrade scenario"):
        backend.upgrade(dep)
    assert mesh.commands == []
    backend.close()


# -- --plan through pytest: the same steps, nothing touched ---------------------------------

_TEST = textwrap.dedent(
    """
    def test_uses_the_backend(sm_backend):
        pass
    """
)


def _pytest(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    work = tmp_path / "work"
    bin_dir = work / "bin"
    bin_dir.mkdir(parents=True)
    (work / "test_backend_use.py").write_text(_TEST)
    command = pytest_command("-p", "no:benchmark")
    command += ["-q", "test_backend_use.py", "--sm-backend", "kind", "--plan", *args]
    done = subprocess.run(
        command,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **os.environ,
            "PATH": f"{bin_dir}:{Path(sys.executable).parent}",
            "SECUREMETRICS_E2E_CACHE": str(tmp_path / "cache"),
        },
        check=False,
    )
    return done, work


@pytest.mark.parametrize("canary", [False, True])
def test_pytest_plan_prints_the_upgrade_run(tmp_path: Path, canary: bool) -> None:
    done, work = _pytest(
        tmp_path, "--upgrade-from", "1.30", "--istio-version", "1.31", *(["--canary"] * canary)
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    how = "canary revision 1-31-1" if canary else "in place"
    assert f"upgrade run: Istio 1.30.5 -> 1.31.1, {how}" in output
    assert re.search(r"\$ istioctl-1\.30\.5 install -y .*--set profile=default", output)
    upgrade = r"istioctl-1\.31\.1 tag set default" if canary else r"istioctl-1\.31\.1 upgrade -y"
    assert re.search(upgrade, output)
    assert "restart deployment/httpbin -n sm-upgrade-permissive-" in output
    assert "(the scraper is NOT restarted)" in output
    assert "restart deployment/prometheus" not in output
    assert (
        "native-sidecar[STRICT/as-documented]: an upgrade run (--upgrade-from 1.30.5) deploys "
        "only the upgrade scenario" in output
    )
    assert "Traceback" not in output
    assert sorted(p.name for p in work.iterdir()) == ["bin", "test_backend_use.py"]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--canary"], "--canary only chooses how an upgrade run upgrades"),
        (
            ["--upgrade-from", "1.30", "--scenario", "native-sidecar"],
            "--scenario selects native-sidecar: add --scenario upgrade or drop --upgrade-from",
        ),
    ],
)
def test_pytest_plan_refuses_bad_upgrade_options(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done, work = _pytest(tmp_path, *args)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert message in output
    assert "Traceback" not in output
    assert sorted(p.name for p in work.iterdir()) == ["bin", "test_backend_use.py"]
    assert not (tmp_path / "cache").exists()


def test_every_catalog_scenario_has_a_scope_decision() -> None:
    """Either run kind leaves out exactly one side: upgrade, or everything else."""
    upgrade = ClusterOptions(upgrade_from="1.30", istio_version="1.31")
    plain = ClusterOptions(istio_version="1.31")
    from securemetrics_e2e.cluster.layout import run_scope_reason

    for s in SCENARIOS:
        in_upgrade, in_plain = run_scope_reason(s, upgrade), run_scope_reason(s, plain)
        assert (in_upgrade is None) != (in_plain is None), s.name
        assert (in_upgrade is None) is (s.name == "upgrade")
