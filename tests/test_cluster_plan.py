"""The cluster plan for every supported Istio version and scenario: real content, no cluster.

``render_plan`` renders the real charts (Helm engine) and resolves nothing on the
network: these tests check which steps, commands and manifests it lists, that every
manifest is valid YAML carrying the run label, and that nothing was touched.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from securemetrics_e2e.catalog import SCENARIOS, Feature, MtlsMode, VariantId, scenario
from securemetrics_e2e.cluster import pins
from securemetrics_e2e.cluster.kube import RUN_LABEL
from securemetrics_e2e.cluster.layout import variant_plan
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.plan import render_plan
from securemetrics_e2e.cluster.steps import Plan
from securemetrics_e2e.cluster.tools import Platform, ToolCache
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.versions import capabilities, resolve, supported_versions, upgrade_pair

RUN = "t3st01"
NATIVE = {"native-sidecar", "native-gateway", "gateway-api", "hardened", "servicemonitor"}
OTHERS = {"legacy-sidecar", "legacy-gateway"}  # no native-port feature


@pytest.fixture(autouse=True)
def _no_tools_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # tools found on this machine's PATH would change the plan's tool lines
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(Platform, "current", classmethod(lambda cls: cls("linux", "amd64")))


def _plan(tmp_path: Path, version: str, **kw: object) -> Plan:
    options = ClusterOptions(
        istio_version=version,
        run_id=RUN,
        cache_dir=tmp_path / "cache",
        **kw,  # type: ignore[arg-type]
    )
    return render_plan(options, cache=ToolCache(tmp_path / "cache"))


def _deployed(plan: Plan) -> set[str]:
    return {v.scenario.name for v in plan.variants if v.skip is None}


@pytest.mark.parametrize("version", [str(v) for v in supported_versions()])
def test_scenarios_per_version(tmp_path: Path, version: str) -> None:
    plan = _plan(tmp_path, version)
    native = capabilities(version).native_secure_ports
    native_names = {s.name for s in SCENARIOS if Feature.NATIVE_SECURE_PORTS in s.features}
    assert native_names - {"rotation"} == NATIVE
    # rotation (agents renewing short-lived certificates) runs where native ports do
    assert _deployed(plan) == (NATIVE | OTHERS | {"rotation"} if native else OTHERS)
    skipped = dict(plan.skipped)
    # the upgrade scenario needs an upgrade run, whatever the version
    upgrade = skipped.pop("upgrade[PERMISSIVE/port-strict]")
    assert upgrade.startswith("the upgrade scenario needs an upgrade run")
    assert "--upgrade-from" in upgrade
    if version.startswith("1.28."):  # nothing older is supported
        assert "1.28.10 is the oldest supported" in upgrade
    else:
        assert f"e.g. 1.{int(version.split('.')[1]) - 1}." in upgrade
    if not native:
        assert "lacks native-secure-ports" in skipped.pop("rotation[PERMISSIVE/as-documented]")
    if not native:
        assert set(skipped) == {u.id for n in NATIVE for u in scenario(n).run_units()}
        assert all("lacks native-secure-ports" in reason for reason in skipped.values())
        assert "native-sidecar[STRICT/as-documented]: Istio" in plan.render_text()
    else:
        assert skipped == {}
    text = plan.render_text()
    for v in plan.variants:
        if v.skip is None:
            assert f"deploy {v.id} in namespace {v.namespace}" in text


@pytest.mark.parametrize("version", [str(v) for v in supported_versions()])
def test_versioned_downloads_and_images(tmp_path: Path, version: str) -> None:
    plan = _plan(tmp_path, version)
    text = plan.render_text()
    caps = capabilities(version)
    istioctl_url = (
        f"https://github.com/istio/istio/releases/download/{version}/"
        f"istioctl-{version}-linux-amd64.tar.gz"
    )
    assert f"{istioctl_url} (sha256 from {istioctl_url}.sha256)" in text
    image = pins.node_image(caps.kubernetes_range)
    assert f"--image={image}" in text
    minor = re.search(r"kindest/node:v(\d+\.\d+)\.", image)
    assert minor is not None
    assert minor.group(1) in caps.kubernetes_range
    assert "@sha256:" in image
    expected_image = {"1.28": "v1.34.11", "1.29": "v1.35.8", "1.30": "v1.36.4", "1.31": "v1.36.4"}
    assert f"kindest/node:{expected_image[version.rsplit('.', 1)[0]]}@" in image
    # Gateway API CRDs: only when the gateway-api scenario runs (native ports, 1.31+)
    crd_url = f"gateway-api/{caps.gateway_api_version}/config/crd/standard/"
    if caps.native_secure_ports:
        assert crd_url in text
        for item in pins.gateway_api_files(caps.gateway_api_version):
            assert f"{item.url} sha256 {item.sha256}" in text
    else:
        assert "gateway-api/" not in text
    # the operator bundle only when the servicemonitor scenario runs (native ports, 1.31+)
    bundle = pins.PROMETHEUS_OPERATOR_BUNDLE
    assert (f"{bundle.url} sha256 {bundle.sha256}" in text) == caps.native_secure_ports


def test_gateway_api_version_per_minor() -> None:
    expected = {"1.28": "v1.4.1", "1.29": "v1.4.1", "1.30": "v1.5.1", "1.31": "v1.6.0"}
    for version in supported_versions():
        wanted = expected[f"{version.major}.{version.minor}"]
        assert capabilities(version).gateway_api_version == wanted
        files = pins.gateway_api_files(wanted)
        assert any(f.url.endswith("gateway.networking.k8s.io_gateways.yaml") for f in files)
        assert all(f"/gateway-api/{wanted}/" in f.url for f in files)
        assert all(re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in files)


def _yaml_blocks(text: str) -> list[object]:
    """Every manifest printed in the plan, parsed back from the text."""
    docs: list[object] = []
    block: list[str] | None = None
    for line in [*text.splitlines(), "END"]:
        if line == "       ---":
            if block:
                docs += list(yaml.safe_load_all("\n".join(block) + "\n"))
            block = []
            continue
        if block is not None and line.startswith("       ") and not line.startswith("       $"):
            block.append(line[7:])
            continue
        if block:
            docs += list(yaml.safe_load_all("\n".join(block) + "\n"))
        block = None
    return [d for d in docs if d is not None]


@pytest.mark.parametrize("version", ["1.31.1", "1.28"])
def test_manifests_are_yaml_and_labelled(tmp_path: Path, version: str) -> None:
    plan = _plan(tmp_path, version)
    manifests = plan.manifests()
    assert manifests
    for obj in manifests:
        labels = obj["metadata"]["labels"]
        assert labels[RUN_LABEL] == RUN, obj["metadata"]
        assert labels["app.kubernetes.io/managed-by"] == "securemetrics-e2e"
    printed = _yaml_blocks(plan.render_text())
    assert printed == manifests  # the text shows exactly what is applied, in order
    namespaces = [o for o in manifests if o["kind"] == "Namespace"]
    assert all(n["metadata"]["labels"]["istio-injection"] == "enabled" for n in namespaces)
    assert {n["metadata"]["name"] for n in namespaces} == {f"sm-scraper-{RUN}"} | {
        v.namespace for v in plan.variants if v.skip is None
    }


def test_peer_authentication_per_mode(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.31.1")
    for v in plan.variants:
        if v.skip is not None:
            continue
        pa = [o for o in v.manifests if o["kind"] == "PeerAuthentication"]
        (namespace_wide,) = [p for p in pa if "selector" not in p["spec"]]
        assert namespace_wide["spec"]["mtls"]["mode"] == v.mtls_mode.value
        assert all(p["metadata"]["namespace"] == v.namespace for p in pa)
        # a port-* variant adds its workload policy; no other variant adds one
        port_variant = v.variant.id in (VariantId.PORT_PERMISSIVE, VariantId.PORT_STRICT)
        assert (len(pa) == 2) == port_variant
        first = v.variant.id is v.scenario.variants[0].id
        suffix = "" if first else f"-{v.variant.id}"
        assert v.namespace == f"sm-{v.scenario.name}-{v.mtls_mode.value.lower()}{suffix}-{RUN}"


def test_rollouts_and_locators(tmp_path: Path) -> None:
    version = resolve("1.31.1")
    gw = variant_plan(scenario("gateway-api"), MtlsMode.PERMISSIVE, version, RUN)
    assert [str(r) for r in gw.rollouts] == [f"deployment/secure-gw-istio in {gw.namespace}"]
    assert gw.locators[0].selector == "gateway.networking.k8s.io/gateway-name=secure-gw"
    assert gw.needs_gateway_api
    classic = variant_plan(scenario("native-gateway"), MtlsMode.PERMISSIVE, version, RUN)
    assert [str(r) for r in classic.rollouts] == ["deployment/istio-ingressgateway in istio-system"]
    assert classic.exclusive == {"Deployment/istio-system/istio-ingressgateway"}
    legacy_gw = variant_plan(scenario("legacy-gateway"), MtlsMode.PERMISSIVE, version, RUN)
    assert legacy_gw.exclusive & classic.exclusive  # never deployed at the same time
    sm = variant_plan(scenario("servicemonitor"), MtlsMode.STRICT, version, RUN)
    assert sm.needs_operator
    assert f"statefulset/prometheus-secure-metrics in {sm.namespace}" in [
        str(r) for r in sm.rollouts
    ]
    side = variant_plan(scenario("native-sidecar"), MtlsMode.STRICT, version, RUN)
    assert side.locators[0].selector == "app=httpbin,version=v1"
    assert side.locators[0].namespace == side.namespace


def test_command_order_and_teardown(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.30.5")
    commands = [" ".join(c) for c in plan.commands()]
    create = next(i for i, c in enumerate(commands) if c.startswith("kind create cluster"))
    install = next(i for i, c in enumerate(commands) if c.startswith("istioctl install"))
    uninstall = next(i for i, c in enumerate(commands) if c.startswith("istioctl uninstall"))
    delete = next(i for i, c in enumerate(commands) if c.startswith("kind delete cluster"))
    assert create < install < uninstall < delete
    assert commands[install] == (
        "istioctl install -y --kubeconfig .pytest-kind/sm-e2e-1-30/kubeconfig "
        "--context kind-sm-e2e-1-30 --set profile=default"
    )
    assert commands[0] == "docker info --format {{.ServerVersion}}"
    text = plan.render_text()
    assert text.index("TEARDOWN") < text.index("on any failure, before anything below")
    assert f"delete the namespaces labelled {RUN_LABEL}={RUN} (and only those)" in text


def test_keep_cluster_keeps_installs(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.31.1", keep_cluster=True)
    commands = [" ".join(c) for c in plan.commands()]
    assert not any(c.startswith(("kind delete", "istioctl uninstall")) for c in commands)
    assert "--keep-cluster: keep the cluster" in plan.render_text()


def test_existing_cluster_with_revision_hub_tag(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "vendor.kubeconfig"
    plan = _plan(
        tmp_path,
        "1.31.1",
        mode="existing",
        kubeconfig=kubeconfig,
        context="vendor-prod",
        hub="registry.example.com/istio",
        tag="1.31.1-vendor.2",
        revision="canary",
    )
    commands = [" ".join(c) for c in plan.commands()]
    assert not any(c.startswith(("kind ", "docker ")) for c in commands)
    install = next(c for c in commands if c.startswith("istioctl install"))
    assert install == (
        f"istioctl install -y --kubeconfig {kubeconfig} --context vendor-prod "
        "--set profile=default --set hub=registry.example.com/istio "
        "--set tag=1.31.1-vendor.2 --set revision=canary"
    )
    assert any(c.endswith("--revision canary") and "uninstall" in c for c in commands)
    namespaces = [o for o in plan.manifests() if o["kind"] == "Namespace"]
    assert all(n["metadata"]["labels"].get("istio.io/rev") == "canary" for n in namespaces)
    assert all("istio-injection" not in n["metadata"]["labels"] for n in namespaces)
    text = plan.render_text()
    assert "existing (never created or deleted)" in text
    assert "kind " not in text.split("TEARDOWN")[1]


def test_subset_of_scenarios(tmp_path: Path) -> None:
    options = ClusterOptions(istio_version="1.31", run_id=RUN, cache_dir=tmp_path / "c")
    plan = render_plan(options, [(scenario("hardened"), MtlsMode.STRICT)])
    assert [v.id for v in plan.variants] == [
        "hardened[STRICT/as-documented]",
        "hardened[STRICT/exclude-capture]",
        "hardened[STRICT/port-permissive]",
    ]
    assert "Gateway API CRDs" not in plan.render_text()
    assert len([o for o in plan.manifests() if o["kind"] == "Namespace"]) == 4


def test_plan_touches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    plan = _plan(tmp_path, "1.31.1")
    assert plan.render_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no cache, no .pytest-kind
    assert "download to" in plan.render_text()


def test_every_scenario_is_planned_in_every_mode(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "1.31.1")
    assert sorted(v.id for v in plan.variants) == sorted(
        u.id for s in SCENARIOS for u in s.run_units()
    )


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"istio_version": "1.19.0"}, "supported versions"),
        ({"istio_version": "banana"}, "is not a version"),
        ({"mode": "minikube"}, "cluster mode 'minikube' is unknown"),
        ({"revision": "Canary_1"}, "--istio-revision 'Canary_1' must be a DNS label"),
        ({"hub": "bad hub"}, "--istio-hub 'bad hub'"),
    ],
)
def test_bad_options(tmp_path: Path, kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(UsageError, match=re.escape(needle)):
        render_plan(ClusterOptions(run_id=RUN, cache_dir=tmp_path, **kwargs))  # type: ignore[arg-type]


def test_ci_matrix_covers_the_supported_minors() -> None:
    workflow = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "e2e.yml"
    text = workflow.read_text()
    yaml.safe_load(text)  # valid YAML
    minors = [f"{v.major}.{v.minor}" for v in supported_versions()]
    assert f"""'[{", ".join(f'"{m}"' for m in minors)}]'""" in text
    assert "--istio-version" in text
    assert "actions/upload-artifact" in text
    for path in ("reports/", "artifacts/"):
        assert path in text


def test_ci_upgrade_jobs_cover_every_supported_step() -> None:
    workflow = Path(__file__).resolve().parent.parent / ".github" / "workflows" / "e2e.yml"
    job = yaml.safe_load(workflow.read_text())["jobs"]["upgrade"]
    pairs = [(p["from"], p["to"]) for p in job["strategy"]["matrix"]["pair"]]
    minors = [f"{v.major}.{v.minor}" for v in supported_versions()]
    assert pairs == list(itertools.pairwise(minors))
    for old, new in pairs:
        upgrade_pair(old, new)  # raises if Istio does not support the step
    assert job["strategy"]["matrix"]["how"] == ["in-place", "canary"]
    commands = " ".join(str(step.get("run", "")) for step in job["steps"])
    assert "--upgrade-from" in commands
    assert "$CANARY" in commands


def test_gateway_scenarios_are_planned_one_after_the_other(tmp_path: Path) -> None:
    text = _plan(tmp_path, "1.31.1").render_text()
    assert (
        "only once native-gateway[PERMISSIVE/as-documented] is torn down and what it patched is "
        "restored and rolled out again: both change "
        "Deployment/istio-system/istio-ingressgateway"
    ) in text
    assert text.index("deploy native-gateway[PERMISSIVE/as-documented]") < text.index(
        "deploy legacy-gateway[PERMISSIVE/as-documented]"
    )


def _marks(objects: list[dict[str, object]]) -> set[str]:
    """What tells a variant's objects apart (the configuration each variant changes)."""
    marks = set()
    for o in objects:
        kind, spec = o["kind"], o.get("spec") or {}
        assert isinstance(spec, dict)
        if kind == "PeerAuthentication" and "portLevelMtls" in spec:
            marks.add(
                "portLevelMtls "
                + ",".join(f"{p}={m['mode']}" for p, m in spec["portLevelMtls"].items())
            )
        if kind in ("ProxyConfig", "PodMonitor"):
            marks.add(str(kind))
        if kind == "Deployment":
            template = spec["template"]["metadata"].get("annotations") or {}
            if "traffic.sidecar.istio.io/excludeInboundPorts" in template:
                marks.add("excludeInboundPorts")
        if kind == "Service":
            marks |= {f"port {p['name']}" for p in spec["ports"] if p["name"] == "tcp"}
    return marks


EXPECTED_MARKS = {
    VariantId.AS_DOCUMENTED: set(),
    VariantId.EXCLUDE_CAPTURE: {"excludeInboundPorts"},
    VariantId.PORT_PERMISSIVE: {"portLevelMtls 15091=PERMISSIVE,15092=PERMISSIVE"},
    VariantId.PORT_STRICT: {"portLevelMtls 15091=STRICT"},
    VariantId.PROXYCONFIG: {"ProxyConfig"},
    VariantId.TCP_APP_PORT: {"port tcp"},
    VariantId.PODMONITOR: {"PodMonitor"},
}


@pytest.mark.parametrize("version", ["1.30.5", "1.31.1"])
def test_cluster_plan_deploys_every_variant(tmp_path: Path, version: str) -> None:
    plan = _plan(tmp_path, version)
    native = capabilities(version).native_secure_ports
    deployed = {v.id: v for v in plan.variants if v.skip is None}
    for s in SCENARIOS:
        needs_native = Feature.NATIVE_SECURE_PORTS in s.features
        for unit in s.run_units():
            if s.name == "upgrade" or (needs_native and not native):
                assert unit.id not in deployed  # an upgrade run, or a version without ports
                continue
            v = deployed.pop(unit.id)
            assert _marks(list(v.manifests)) == EXPECTED_MARKS[unit.variant.id], unit.id
    assert deployed == {}
    if native:
        assert {u.variant.id for u in scenario("native-sidecar").run_units()} == {
            VariantId.AS_DOCUMENTED,
            VariantId.EXCLUDE_CAPTURE,
            VariantId.PORT_PERMISSIVE,
        }
