"""An existing cluster is somebody's production: the run removes only what it created.

Plans (``--plan`` and the plan the backend would follow once it has looked) for Istio
1.30 and 1.31, kind and existing, plain runs and upgrade runs in place and by canary,
with and without a detected control plane: no ``--purge`` anywhere, and every removal
names something the same plan creates. Then the backend on a FAKE Kubernetes API
(tests/fakekube.py, driven by the upgrade tests' ``Mesh``): the ``default`` revision
tag and revisioned control planes are detected and used, a control plane other than
the one asked for stops the run before any command, and teardown of a found control
plane runs no istioctl at all. Istio's rules: ISTIO-FACTS.md "Existing clusters",
istioctl/pkg/tag/revision.go, operator/cmd/mesh/uninstall.go.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.catalog import SCENARIOS
from securemetrics_e2e.cluster import istio
from securemetrics_e2e.cluster.bootstrap import PreparedCluster, backend_on
from securemetrics_e2e.cluster.errors import IstioConflict
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.plan import render_plan
from securemetrics_e2e.cluster.setup import PhaseTimer, Undo
from securemetrics_e2e.cluster.steps import Detected, Plan
from securemetrics_e2e.cluster.tools import ToolCache
from tests.fakekube import FakeKube
from tests.test_cluster_upgrade_run import Mesh, _isolated, _seed_istioctl, fake
from tests.test_cluster_upgrade_run import _options as upgrade_options

# the upgrade tests' fixtures: no istioctl on PATH (linux-amd64); istio-system exists
__all__ = ["_isolated", "fake"]

RUN = "safe1"
FOUND = istio.InstalledIstio("1.31.1", "istio-system", None, "docker.io/istio/pilot:1.31.1")
FOUND_OLD = istio.InstalledIstio("1.30.5", "istio-system", None, "docker.io/istio/pilot:1.30.5")


def _flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def _installed_revisions(plan: Plan) -> set[str]:
    """Revisions the plan's steps install (a revision-less install is ``default``)."""
    revisions = set()
    for command in (c for s in plan.steps for c in s.commands):
        if re.fullmatch(r"istioctl.*", Path(command[0]).name) and command[1] in (
            "install",
            "upgrade",
        ):
            sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
            rev = next((s.split("=", 1)[1] for s in sets if s.startswith("revision=")), None)
            revisions.add(rev or istio.DEFAULT_REVISION)
    return revisions


def _tags_set(plan: Plan) -> set[str]:
    return {c[3] for s in plan.steps for c in s.commands if c[1:3] == ["tag", "set"]}


def assert_removes_only_its_own(plan: Plan) -> None:
    """Every teardown removal names what the same plan creates; no --purge anywhere."""
    assert not any("--purge" in c for c in plan.commands()), plan.render_text()
    installed, tags = _installed_revisions(plan), _tags_set(plan)
    created = {m["metadata"]["name"] for m in plan.manifests() if m.get("kind") == "Namespace"}
    for step in plan.teardown:
        for command in step.commands:
            verb = command[1:3]
            if command[1] == "uninstall":
                assert _flag(command, "--revision") in installed, (command, installed)
            elif verb == ["tag", "remove"]:
                assert command[3] in tags, (command, tags)
            elif verb == ["delete", "cluster"]:
                assert plan.options.mode == "kind", command
            else:
                pytest.fail(f"teardown runs {command}, which removes nothing the run made")
        if "delete the namespaces" in step.title:
            named = set(re.findall(r"sm-[a-z0-9-]+", step.title.split(":", 1)[1]))
            assert named <= created, named - created


def _options(mode: str, **kw: Any) -> ClusterOptions:
    values: dict[str, Any] = {"mode": mode, "run_id": RUN}
    if mode == "existing":
        values["kubeconfig"] = Path("/nonexistent/kubeconfig")
    values.update(kw)
    return ClusterOptions(**values)


@pytest.mark.parametrize("version", ["1.30", "1.31"])
@pytest.mark.parametrize("mode", ["kind", "existing"])
@pytest.mark.parametrize("revision", [None, "r1"])
@pytest.mark.parametrize("detected", [None, Detected(None), Detected(FOUND)], ids=str)
def test_no_plan_removes_what_the_run_did_not_create(
    tmp_path: Path, version: str, mode: str, revision: str | None, detected: Detected | None
) -> None:
    options = _options(mode, istio_version=version, revision=revision, cache_dir=tmp_path)
    plan = render_plan(options, detected=detected)
    assert_removes_only_its_own(plan)
    uninstalls = [c for c in plan.commands() if c[1] == "uninstall"]
    if detected is not None and detected.istio is not None:
        assert uninstalls == []  # a found control plane is used and left alone
        assert not any(c[1] == "install" for c in plan.commands())
    else:
        assert [_flag(c, "--revision") for c in uninstalls] == [revision or "default"]
    text = plan.render_text()
    assert "CREATES (teardown removes these and nothing else)" in text
    assert f"sm-scraper-{RUN}" in text.split("STEPS", 1)[0]


@pytest.mark.parametrize(("old", "new"), [("1.29", "1.30"), ("1.30", "1.31")])
@pytest.mark.parametrize("mode", ["kind", "existing"])
@pytest.mark.parametrize("canary", [False, True])
@pytest.mark.parametrize("detected", [None, Detected(None), Detected(FOUND_OLD)], ids=str)
def test_no_upgrade_plan_removes_what_the_run_did_not_create(
    tmp_path: Path, old: str, new: str, mode: str, canary: bool, detected: Detected | None
) -> None:
    options = _options(mode, upgrade_from=old, istio_version=new, canary=canary, cache_dir=tmp_path)
    if canary and detected is not None and detected.istio is not None:
        with pytest.raises(IstioConflict, match="beside the installed Istio"):
            render_plan(options, detected=detected)
        return
    plan = render_plan(options, detected=detected)
    assert_removes_only_its_own(plan)
    if detected is not None and detected.istio is not None:
        assert not any(c[1] == "uninstall" for c in plan.commands())


def test_plan_lists_what_it_creates_and_where(tmp_path: Path) -> None:
    plan = render_plan(_options("existing", istio_version="1.31", cache_dir=tmp_path))
    creates = "\n".join(plan.creates)
    assert "the existing cluster (never created or deleted)" in creates
    assert "only if no istiod runs: Istio control-plane revision default" in creates
    assert "deployment/istio-ingressgateway in istio-system" in creates
    assert "ClusterRole/prometheus-sm-scraper-safe1 in the cluster" in creates


# -- the backend on a fake API -------------------------------------------------------------


def _start(
    tmp_path: Path, fake: FakeKube, mesh: Mesh, lines: list[str] | None = None, **kw: Any
) -> Any:
    plain = {"upgrade_from": None, "istio_version": None, "run_id": RUN}
    sink = lines if lines is not None else []
    return backend_on(
        upgrade_options(tmp_path, **{**plain, **kw}),
        PreparedCluster(fake, istio.KubeTarget(None, None), Path("kubectl"), None),
        timer=PhaseTimer(sink.append),
        cache=ToolCache(tmp_path / "cache"),
        undo=Undo(),
        run=mesh,
        scenarios=[s for s in SCENARIOS if s.name == "native-gateway"],
    )


def _default_tag(fake: FakeKube, revision: str) -> None:
    """The webhook ``istioctl tag set default --revision <rev>`` creates (tag.go setTag)."""
    fake.add(
        {
            "apiVersion": istio.ADMISSION_API,
            "kind": "MutatingWebhookConfiguration",
            "metadata": {
                "name": istio.DEFAULT_TAG_WEBHOOK,
                "labels": {"istio.io/rev": revision, "istio.io/tag": "default"},
            },
        }
    )


def test_default_tag_control_plane_is_detected_and_used(fake: FakeKube, tmp_path: Path) -> None:
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.31.1")
    mesh = Mesh(fake)
    mesh.control_plane("istiod-prod", "1.31.1", "prod")
    mesh.injector = "1.31.1"
    _default_tag(fake, "prod")
    found = istio.detect_istio(fake)
    assert found is not None
    assert found.revision == "prod"
    lines: list[str] = []
    backend = _start(tmp_path, fake, mesh, lines, istio_version="1.31")
    assert mesh.commands == []  # nothing installed beside it
    assert not backend.istio_installed_by_run
    assert any("this run creates" in line for line in lines)
    assert any("no Istio: the installed control plane" in line for line in lines)
    backend.close()
    assert mesh.commands == []  # and nothing of it removed
    assert fake.find("Deployment", "istiod-prod", "istio-system") is not None


def test_revisioned_control_plane_is_used_by_its_revision(fake: FakeKube, tmp_path: Path) -> None:
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.31.1")
    mesh = Mesh(fake)
    mesh.control_plane("istiod-canary", "1.31.1", "canary")
    with pytest.raises(IstioConflict, match=r"revision canary.*--istio-revision canary"):
        _start(tmp_path, fake, mesh)
    assert mesh.commands == []
    assert fake.find("Namespace", f"sm-scraper-{RUN}") is None  # stopped before any apply
    backend = _start(tmp_path, fake, mesh, revision="canary")
    assert mesh.commands == []
    backend.close()
    assert mesh.commands == []


def test_installed_revision_less_istiod_is_never_removed(fake: FakeKube, tmp_path: Path) -> None:
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.31.1")
    mesh = Mesh(fake)
    mesh.control_plane("istiod", "1.31.1")
    mesh.injector = "1.31.1"
    with pytest.raises(IstioConflict, match="never installs one beside it"):
        _start(tmp_path, fake, mesh, revision="mine")  # would have installed beside it
    assert mesh.commands == []
    backend = _start(tmp_path, fake, mesh)
    backend.close()
    assert mesh.commands == []


def test_run_installed_istio_is_removed_by_its_revision_only(
    fake: FakeKube, tmp_path: Path
) -> None:
    ctl = _seed_istioctl(ToolCache(tmp_path / "cache"), "1.31.1")
    mesh = Mesh(fake)
    backend = _start(tmp_path, fake, mesh, istio_version="1.31", revision="sm")
    assert mesh.commands == [
        [ctl["1.31.1"], "install", "-y", "--set", "profile=default", "--set", "revision=sm"]
    ]
    backend.close()
    assert mesh.commands[-1] == [ctl["1.31.1"], "uninstall", "-y", "--revision", "sm"]


def test_canary_upgrade_refused_on_a_control_plane_it_did_not_install(
    fake: FakeKube, tmp_path: Path
) -> None:
    _seed_istioctl(ToolCache(tmp_path / "cache"), "1.30.5", "1.31.1")
    mesh = Mesh(fake)
    mesh.control_plane("istiod", "1.30.5")
    with pytest.raises(IstioConflict, match="upgrade it in place"):
        _start(tmp_path, fake, mesh, upgrade_from="1.30", istio_version="1.31", canary=True)
    assert mesh.commands == []
