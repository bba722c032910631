"""The cluster backend's error paths (real: no Docker here, real sockets, real files) and
its control flow on a FAKE Kubernetes API (tests/fakekube.py): fail fast on
ImagePullBackOff with diagnostics captured before teardown, and cleanup that removes
only what the run labelled, restoring what it patched.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from securemetrics_e2e.backend import Deployment
from securemetrics_e2e.catalog import MtlsMode, RunUnit, scenario
from securemetrics_e2e.cluster import istio
from securemetrics_e2e.cluster.backend import ClusterBackend
from securemetrics_e2e.cluster.bootstrap import make_cluster_backend
from securemetrics_e2e.cluster.errors import (
    ClusterUnreachable,
    DeployFailed,
    KubeconfigInvalid,
    NoContainerRuntime,
)
from securemetrics_e2e.cluster.kube import FIELD_MANAGER, RUN_LABEL
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.setup import PhaseTimer
from securemetrics_e2e.cluster.tools import ToolCache
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.versions import UnsupportedIstioVersion, resolve
from tests.fakekube import FakeKube, event, namespace
from tests.pytestcmd import pytest_command
from tests.tlsservers import closed_port

RUN = "fake01"


# -- error paths: within 5 s, nothing left behind -----------------------------------------


@pytest.fixture
def clean_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _fails_fast(options: ClusterOptions, error: type[SecureMetricsError]) -> str:
    lines: list[str] = []
    # fast by construction: refused before any tool, download or cluster call (no wall
    # clock: on a loaded machine it would time the imports)
    with pytest.raises(error) as caught:
        make_cluster_backend(options, progress=lines.append)
    return str(caught.value)


def test_kind_without_docker(
    clean_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("KIND_EXPERIMENTAL_PROVIDER", raising=False)
    cache = tmp_path / "cache"
    message = _fails_fast(
        ClusterOptions(mode="kind", run_id=RUN, cache_dir=cache), NoContainerRuntime
    )
    assert "`docker` is not on PATH" in message
    assert "--kubeconfig" in message  # the alternative is named
    assert list(clean_dir.iterdir()) == []  # no .pytest-kind, nothing
    assert not cache.exists()  # no download was started


def test_missing_docker_names_the_flag_of_the_entry_point_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's flag is --backend, pytest's (and nox -s e2e's) --sm-backend."""
    from securemetrics_e2e.cluster.setup import existing_cluster_hint

    assert "--sm-backend existing" in existing_cluster_hint("/usr/bin/pytest")
    cli = existing_cluster_hint("/venv/bin/securemetrics-e2e")
    assert "run --backend existing" in cli
    assert "--sm-backend" not in cli
    assert existing_cluster_hint("/x/securemetrics_e2e/__main__.py") == cli
    # the real CLI, end to end: the message it prints names its own flag
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "SECUREMETRICS_E2E_CACHE": str(tmp_path / "c")}
    env.pop("KIND_EXPERIMENTAL_PROVIDER", None)
    done = subprocess.run(
        [sys.executable, "-m", "securemetrics_e2e", "run", "--backend", "kind"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "`docker` is not on PATH" in out
    assert "securemetrics-e2e run --backend existing --kubeconfig PATH" in out
    assert "--sm-backend" not in out


def test_kind_with_podman_provider_names_podman(
    clean_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("KIND_EXPERIMENTAL_PROVIDER", "podman")
    message = _fails_fast(ClusterOptions(mode="kind", run_id=RUN), NoContainerRuntime)
    assert "`podman` is not on PATH" in message


def test_existing_with_unparsable_kubeconfig(clean_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("clusters: [\n")
    message = _fails_fast(
        ClusterOptions(mode="existing", kubeconfig=bad, run_id=RUN, cache_dir=tmp_path / "c"),
        KubeconfigInvalid,
    )
    assert str(bad) in message
    assert list(clean_dir.iterdir()) == []
    assert not (tmp_path / "c").exists()


def test_existing_with_unreachable_api_server(clean_dir: Path, tmp_path: Path) -> None:
    with closed_port() as port:
        config = tmp_path / "kubeconfig"
        config.write_text(
            yaml.safe_dump(
                {
                    "current-context": "lab",
                    "clusters": [
                        {"name": "lab", "cluster": {"server": f"https://127.0.0.1:{port}"}}
                    ],
                    "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "u"}}],
                    "users": [{"name": "u", "user": {"token": "x"}}],
                }
            )
        )
        message = _fails_fast(
            ClusterOptions(
                mode="existing", kubeconfig=config, run_id=RUN, cache_dir=tmp_path / "c"
            ),
            ClusterUnreachable,
        )
    assert f"https://127.0.0.1:{port}" in message
    assert list(clean_dir.iterdir()) == []


@pytest.mark.parametrize("mode", ["kind", "existing"])
def test_unknown_istio_version(clean_dir: Path, mode: str) -> None:
    message = _fails_fast(
        ClusterOptions(mode=mode, istio_version="1.22.3", run_id=RUN), UnsupportedIstioVersion
    )
    assert "'1.22.3'" in message
    assert "1.31.1" in message  # the supported versions are listed
    assert list(clean_dir.iterdir()) == []


# -- through pytest: the plugin turns these into one line and exit status 2 -----------------

_CONFTEST_TEST = textwrap.dedent(
    """
    def test_uses_the_backend(sm_backend):
        pass
    """
)


def _pytest(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_backend_use.py").write_text(_CONFTEST_TEST)
    return subprocess.run(
        pytest_command("-p", "no:benchmark", "-q", "test_backend_use.py", *args),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_pytest_reports_a_bad_kubeconfig_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("users: {\n")
    done = _pytest(tmp_path, "--sm-backend", "existing", "--kubeconfig", str(bad))
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "is not valid YAML" in output
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kubeconfig", "test_backend_use.py"]


def test_pytest_plan_prints_and_touches_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    done = _pytest(
        tmp_path,
        "--sm-backend",
        "kind",
        "--plan",
        "--istio-version",
        "1.30",
        "--scenario",
        "legacy-sidecar",
        env={
            "PATH": f"{empty}:{Path(sys.executable).parent}",
            "SECUREMETRICS_E2E_CACHE": str(tmp_path / "cache"),
        },
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "securemetrics-e2e cluster plan" in output
    assert "deploy legacy-sidecar[PERMISSIVE/as-documented]" in output
    assert "deploy legacy-sidecar[STRICT/as-documented]" in output
    assert "istioctl-1.30.5-linux-amd64.tar.gz" in output or "istioctl-1.30.5-" in output
    assert "Traceback" not in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "test_backend_use.py"]


# -- control flow on the fake API ------------------------------------------------------------

ISTIO_TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"app": "istio-ingressgateway", "istio": "ingressgateway"}},
    "spec": {"containers": [{"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.31.1"}]},
}


class Controller:
    """Plays the deployment controller and kubelet on FakeKube: one pod per Deployment."""

    def __init__(self, fake: FakeKube, broken: set[str] | None = None) -> None:
        self.fake = fake
        self.broken = broken or set()
        self.ip = 10
        fake.on_get["Deployment"] = self

    def __call__(self, fake: FakeKube, dep: dict[str, Any]) -> None:
        meta = dep["metadata"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        pod_name = f"{meta['name']}-{meta.get('generation', 1)}"
        if fake.find("Pod", pod_name, meta["namespace"]) is None:
            for old in fake.list("v1", "Pod", meta["namespace"]):
                if old["metadata"]["name"].startswith(meta["name"] + "-"):
                    fake.delete("v1", "Pod", old["metadata"]["name"], meta["namespace"])
            self.ip += 1
            pod: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": pod_name, "namespace": meta["namespace"], "labels": labels},
                "spec": {
                    k: v
                    for k, v in dep["spec"]["template"].get("spec", {}).items()
                    if k == "serviceAccountName"
                },
                "status": {"phase": "Running", "podIP": f"10.244.0.{self.ip}"},
            }
            if meta["name"] in self.broken:
                pod["status"] = {
                    "phase": "Pending",
                    "containerStatuses": [
                        {
                            "name": meta["name"],
                            "restartCount": 0,
                            "state": {
                                "waiting": {
                                    "reason": "ImagePullBackOff",
                                    "message": "Back-off pulling image",
                                }
                            },
                        },
                        {"name": "istio-proxy", "restartCount": 2, "state": {"running": {}}},
                    ],
                }
                fake.add(
                    event(
                        meta["namespace"],
                        pod_name,
                        "Failed",
                        "manifest unknown",
                        "2026-11-21T10:00:00Z",
                    )
                )
                fake.logs_by_container[(pod_name, "istio-proxy", True)] = "previous proxy log"
            fake.add(pod)
        ready = 0 if meta["name"] in self.broken else 1
        dep["status"] = {
            "observedGeneration": meta.get("generation", 1),
            "replicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": ready,
            "readyReplicas": ready,
        }


@pytest.fixture
def fake() -> FakeKube:
    kube = FakeKube()
    for name, labels in [
        ("kube-system", {}),
        ("istio-system", {}),
        ("prod", {"istio-injection": "enabled"}),
        ("sm-native-sidecar-strict-other1", {RUN_LABEL: "other1"}),
    ]:
        kube.add(namespace(name, labels))
    kube.add(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "istio-ingressgateway", "namespace": "istio-system"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "istio-ingressgateway"}},
                "template": copy.deepcopy(ISTIO_TEMPLATE),
            },
        }
    )
    return kube


def _backend(fake: FakeKube, tmp_path: Path) -> ClusterBackend:
    options = ClusterOptions(
        mode="existing",
        run_id=RUN,
        artifacts_dir=tmp_path / "artifacts",
        cache_dir=tmp_path / "cache",
        rollout_timeout=60,
    )
    return ClusterBackend(
        options,
        version=resolve("1.31.1"),
        api=fake,
        target=istio.KubeTarget(None, None),
        kubectl="kubectl",
        istioctl=None,
        cache=ToolCache(tmp_path / "cache"),
        timer=PhaseTimer(lambda line: None),
    )


def _namespaces(fake: FakeKube) -> set[str]:
    return {k[3] for k in fake.objects if k[1] == "Namespace"}


BEFORE = {"kube-system", "istio-system", "prod", "sm-native-sidecar-strict-other1"}


def test_image_pull_backoff_fails_fast_with_diagnostics_then_cleans_up(
    fake: FakeKube, tmp_path: Path
) -> None:
    Controller(fake, broken={"httpbin"})
    backend = _backend(fake, tmp_path)
    with pytest.raises(DeployFailed) as caught:
        backend.deploy(scenario("native-sidecar"), MtlsMode.STRICT)
    text = str(caught.value)
    assert "timed out" not in text  # the fail-fast path, not the 60 s rollout timeout
    ns = f"sm-native-sidecar-strict-{RUN}"
    assert f"pod httpbin-1 in {ns}: container httpbin is ImagePullBackOff" in text
    assert "Warning Failed: manifest unknown" in text
    artifacts = caught.value.artifacts
    assert artifacts is not None
    assert f"diagnostics: {artifacts}" in text
    # captured BEFORE teardown: the pod is in the capture although it is gone now
    pods = list(yaml.safe_load_all((artifacts / ns / "pods.yaml").read_text()))
    assert [p["metadata"]["name"] for p in pods] == ["httpbin-1"]
    assert "manifest unknown" in (artifacts / ns / "events.txt").read_text()
    assert (artifacts / ns / "logs" / "httpbin-1.istio-proxy.previous.log").read_text() == (
        "previous proxy log"
    )
    assert "ImagePullBackOff" in (artifacts / "reason.txt").read_text()
    # the failed variant's namespace is removed, and nothing else
    assert ns not in _namespaces(fake)
    assert _namespaces(fake) == BEFORE
    backend.close()
    assert _namespaces(fake) == BEFORE


def test_deploy_labels_everything_and_teardown_removes_only_it(
    fake: FakeKube, tmp_path: Path
) -> None:
    Controller(fake)
    backend = _backend(fake, tmp_path)
    dep = backend.deploy(scenario("native-sidecar"), MtlsMode.PERMISSIVE)
    ns = f"sm-native-sidecar-permissive-{RUN}"
    assert dep.namespace == ns
    workload = dep.workload("httpbin")
    assert workload.pod_name == "httpbin-1"
    assert workload.pod_ip.startswith("10.244.0.")
    assert str(workload.spiffe_id) == f"spiffe://cluster.local/ns/{ns}/sa/httpbin"
    applied = [c for c in fake.calls if c[0] == "apply"]
    assert applied
    for (_, kind, _, name), obj in fake.objects.items():
        if kind not in ("Pod", "Event") and name not in BEFORE and name != "istio-ingressgateway":
            assert obj["metadata"]["labels"][RUN_LABEL] == RUN, (kind, name)
    assert backend.deploy(scenario("native-sidecar"), MtlsMode.PERMISSIVE) is dep  # once
    backend.teardown(dep)
    backend.teardown(dep)  # safe twice
    assert _namespaces(fake) == BEFORE
    backend.close()
    assert _namespaces(fake) == BEFORE
    assert {k[3] for k in fake.deleted if k[1] == "Namespace"} == {ns}


def test_gateway_identity_is_its_pods_service_account(fake: FakeKube, tmp_path: Path) -> None:
    """The Helm gateway chart names the account after the release: the expected SPIFFE
    ID follows the pod, not istioctl's istio-ingressgateway-service-account."""
    Controller(fake)
    gateway = fake.find("Deployment", "istio-ingressgateway", "istio-system")
    assert gateway is not None
    gateway["spec"]["template"]["spec"]["serviceAccountName"] = "edge-gw"
    backend = _backend(fake, tmp_path)
    dep = backend.deploy(scenario("native-gateway"), MtlsMode.PERMISSIVE)
    identity = str(dep.workload("istio-ingressgateway").spiffe_id)
    assert identity == "spiffe://cluster.local/ns/istio-system/sa/edge-gw"
    backend.teardown(dep)
    backend.close()


def test_gateway_patch_is_restored_and_exclusive(fake: FakeKube, tmp_path: Path) -> None:
    Controller(fake)
    backend = _backend(fake, tmp_path)
    dep = backend.deploy(scenario("native-gateway"), MtlsMode.PERMISSIVE)
    gateway = fake.find("Deployment", "istio-ingressgateway", "istio-system")
    assert gateway is not None
    assert gateway["spec"]["template"] != ISTIO_TEMPLATE  # patched
    assert dep.workload("istio-ingressgateway").namespace == "istio-system"
    with pytest.raises(
        DeployFailed, match=r"legacy-gateway\[PERMISSIVE/as-documented\] changes .* native-gateway"
    ):
        backend.deploy(scenario("legacy-gateway"), MtlsMode.PERMISSIVE)
    fake.calls.clear()
    backend.teardown(dep)
    gateway = fake.find("Deployment", "istio-ingressgateway", "istio-system")
    assert gateway is not None  # never deleted: not the run's
    assert gateway["spec"]["template"] == ISTIO_TEMPLATE  # restored as read before patching
    legacy = backend.deploy(scenario("legacy-gateway"), MtlsMode.PERMISSIVE)
    restored = fake.calls.index(("patch", "Deployment", "istio-ingressgateway", "json"))
    awaited = fake.calls.index(
        ("get", "Deployment", "istio-ingressgateway", "istio-system"), restored
    )
    server = fake.calls.index(("apply", "Gateway", "istio-ingressgateway-metrics", FIELD_MANAGER))
    assert restored < awaited < server  # the restored rollout before the 15091 server
    outside = [
        (k[1], k[3])
        for k, o in fake.objects.items()
        if k[2] == "istio-system" and RUN_LABEL in o["metadata"].get("labels", {})
    ]
    assert sorted(outside) == [
        ("Gateway", "istio-ingressgateway-metrics"),
        ("ServiceEntry", "istio-ingressgateway-admin"),
        ("VirtualService", "istio-ingressgateway-metrics"),
    ]
    backend.teardown(legacy)
    assert not [
        k for k, o in fake.objects.items() if o["metadata"].get("labels", {}).get(RUN_LABEL) == RUN
    ]
    assert "istio-system" in _namespaces(fake)
    gateway = fake.find("Deployment", "istio-ingressgateway", "istio-system")
    assert gateway is not None
    assert gateway["spec"]["template"] == ISTIO_TEMPLATE
    backend.close()


def test_skipped_variant_is_refused(fake: FakeKube, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="lacks native-secure-ports"):
        _backend_for(fake, tmp_path, "1.30.5").deploy(scenario("hardened"), MtlsMode.STRICT)
    assert [c for c in fake.calls if c[0] == "apply"] == []


def _backend_for(fake: FakeKube, tmp_path: Path, version: str) -> ClusterBackend:
    backend = _backend(fake, tmp_path)
    return ClusterBackend(
        backend.options,
        version=resolve(version),
        api=fake,
        target=backend.target,
        kubectl="kubectl",
        istioctl=None,
        cache=backend.cache,
        timer=backend.timer,
    )


def test_deploy_many_applies_everything_before_waiting_and_defers_conflicts(
    fake: FakeKube, tmp_path: Path
) -> None:
    Controller(fake)
    backend = _backend(fake, tmp_path)
    wanted = [
        RunUnit(scenario("native-sidecar"), MtlsMode.PERMISSIVE),
        RunUnit(scenario("hardened"), MtlsMode.STRICT),
        RunUnit(scenario("native-gateway"), MtlsMode.PERMISSIVE),
        RunUnit(scenario("legacy-gateway"), MtlsMode.PERMISSIVE),  # holds the same gateway
    ]
    results = backend.deploy_many(wanted)
    assert set(results) == {u.key for u in wanted[:3]}
    assert all(not isinstance(r, Exception) for r in results.values())
    # every apply happened before the first rollout status was read
    first_read = next(
        i for i, c in enumerate(fake.calls) if c[:3] == ("get", "Deployment", "httpbin")
    )
    last_apply = max(i for i, c in enumerate(fake.calls) if c[0] in ("apply", "patch"))
    assert last_apply < first_read
    for result in results.values():
        assert not isinstance(result, Exception)
        backend.teardown(result)
    later = backend.deploy_many([wanted[3]])
    assert not isinstance(later[wanted[3].key], Exception)
    backend.close()
    assert _namespaces(fake) == BEFORE


def test_deploy_many_reports_each_failure_and_keeps_the_rest(
    fake: FakeKube, tmp_path: Path
) -> None:
    Controller(fake, broken={"httpbin"})
    backend = _backend(fake, tmp_path)
    sidecar = RunUnit(scenario("native-sidecar"), MtlsMode.STRICT)
    gateway = RunUnit(scenario("native-gateway"), MtlsMode.PERMISSIVE)
    results = backend.deploy_many([sidecar, gateway])
    failed = results[sidecar.key]
    assert isinstance(failed, DeployFailed)
    assert "ImagePullBackOff" in str(failed)
    assert not isinstance(results[gateway.key], Exception)
    assert f"sm-native-gateway-permissive-{RUN}" in _namespaces(fake)
    assert f"sm-native-sidecar-strict-{RUN}" not in _namespaces(fake)
    backend.close()
    assert _namespaces(fake) == BEFORE


def test_servicemonitor_is_judged_on_the_operators_prometheus(tmp_path: Path) -> None:
    backend = _backend(FakeKube(), tmp_path)
    sm = Deployment(scenario("servicemonitor"), MtlsMode.PERMISSIVE, "sm-servicemonitor-x", ())
    native = Deployment(scenario("native-sidecar"), MtlsMode.PERMISSIVE, "sm-native-x", ())
    assert backend.prometheus_for(sm).base_url.endswith(
        "/api/v1/namespaces/sm-servicemonitor-x/services/prometheus-operated:9090/proxy"
    )
    assert backend.prometheus_for(native).base_url == backend.prometheus().base_url


def test_injector_annotation_check_reads_the_admitted_pod(fake: FakeKube, tmp_path: Path) -> None:
    """SMC014 on the fake API: a pod the injector did not annotate fails it, naming the
    pod; once the admitted pod carries the merged port (what Istio's injector writes,
    pkg/kube/inject/webhook.go), it passes."""
    from securemetrics_e2e.checks import INJECTOR_ANNOTATION, CheckFailed

    Controller(fake)
    backend = _backend(fake, tmp_path)
    dep = backend.deploy(scenario("native-sidecar"), MtlsMode.PERMISSIVE)
    workload = dep.workload("httpbin")
    template = fake.find("Deployment", "httpbin", dep.namespace)
    assert template is not None  # the chart leaves secure-port to the injector
    annotations = template["spec"]["template"]["metadata"]["annotations"]
    assert "prometheus.istio.io/secure-port" not in annotations
    with pytest.raises(CheckFailed, match=r"SMC014.*httpbin-1 has prometheus.istio.io/secure-"):
        INJECTOR_ANNOTATION.run(backend, dep)
    pod = fake.find("Pod", workload.pod_name, dep.namespace)
    assert pod is not None
    pod["metadata"]["annotations"] = {"prometheus.istio.io/secure-port": "15091"}
    with pytest.raises(CheckFailed, match="'15091', expected '15092'"):
        INJECTOR_ANNOTATION.run(backend, dep)
    pod["metadata"]["annotations"]["prometheus.istio.io/secure-port"] = "15092"
    INJECTOR_ANNOTATION.run(backend, dep)
    assert backend.pod_annotations(workload) == {"prometheus.istio.io/secure-port": "15092"}
    backend.teardown(dep)
    backend.close()
