"""Control flow of run-labelled cleanup and rollout waits, driven through FakeKube.

FakeKube is a fake Kubernetes API at the client seam (see tests/fakekube.py); these
tests check only what the backend does with what the API reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.cluster.errors import DeployFailed
from securemetrics_e2e.cluster.kube import RUN_LABEL
from securemetrics_e2e.cluster.resources import (
    Workload,
    delete_objects,
    delete_run_namespaces,
    fatal_containers,
    namespace_manifest,
    wait_rollouts,
    with_run_label,
)
from tests.fakekube import FakeKube, deployment, event, namespace, pod, selector_matches

RUN = "r1a2b3"


def _cluster(ignore_selectors: bool = False) -> FakeKube:
    fake = FakeKube(ignore_selectors=ignore_selectors)
    for name, labels in [
        ("kube-system", {}),
        ("istio-system", {}),
        ("prod", {"team": "payments"}),
        ("sm-native-sidecar-strict-r1a2b3", {RUN_LABEL: RUN}),
        ("sm-legacy-sidecar-permissive-r1a2b3", {RUN_LABEL: RUN}),
        ("sm-native-sidecar-strict-other", {RUN_LABEL: "other"}),  # another run's
        ("looks-like-ours-r1a2b3", {"securemetrics-e2e.io/run-x": RUN}),
    ]:
        fake.add(namespace(name, labels))
    return fake


@pytest.mark.parametrize("ignore_selectors", [False, True])
def test_cleanup_deletes_only_this_runs_namespaces(ignore_selectors: bool) -> None:
    fake = _cluster(ignore_selectors)
    deleted = delete_run_namespaces(fake, RUN)
    assert sorted(deleted) == [
        "sm-legacy-sidecar-permissive-r1a2b3",
        "sm-native-sidecar-strict-r1a2b3",
    ]
    remaining = sorted(k[3] for k in fake.objects if k[1] == "Namespace")
    assert remaining == [
        "istio-system",
        "kube-system",
        "looks-like-ours-r1a2b3",
        "prod",
        "sm-native-sidecar-strict-other",
    ]
    assert ("list", "Namespace", "None", f"{RUN_LABEL}={RUN}") in fake.calls


def test_cleanup_refuses_an_empty_run_id() -> None:
    fake = _cluster()
    with pytest.raises(ValueError, match="without a run id"):
        delete_run_namespaces(fake, "")
    assert fake.deleted == []


def test_delete_objects_spares_what_the_run_did_not_create() -> None:
    fake = FakeKube()
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "gateways.gateway.networking.k8s.io"},
    }
    fake.add(crd)  # installed by someone else: no run label
    mine = with_run_label(
        {**crd, "metadata": {"name": "httproutes.gateway.networking.k8s.io"}}, RUN
    )
    fake.add(mine)
    deleted = delete_objects(fake, [crd, mine], RUN)
    assert deleted == ["CustomResourceDefinition/httproutes.gateway.networking.k8s.io"]
    assert fake.find("CustomResourceDefinition", "gateways.gateway.networking.k8s.io")


def test_namespace_manifest_labels() -> None:
    plain = namespace_manifest("sm-a", RUN)
    assert plain["metadata"]["labels"] == {
        "istio-injection": "enabled",
        RUN_LABEL: RUN,
        "app.kubernetes.io/managed-by": "securemetrics-e2e",
    }
    revisioned = namespace_manifest("sm-b", RUN, revision="canary")
    assert revisioned["metadata"]["labels"]["istio.io/rev"] == "canary"
    assert "istio-injection" not in revisioned["metadata"]["labels"]


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=b", {"a": "b"}, True),
        ("a=b,c=d", {"a": "b"}, False),
        ("a in (x, y)", {"a": "y"}, True),
        ("a notin (x)", {"a": "x"}, False),
        ("!a", {}, True),
        ("a", {}, False),
    ],
)
def test_fake_selector_semantics(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert selector_matches(selector, labels) is expected


# -- rollouts --------------------------------------------------------------------------------

NS = "sm-native-sidecar-strict-r1a2b3"


def _stuck_cluster(reason: str, init: bool = False) -> FakeKube:
    fake = FakeKube()
    fake.add(deployment("httpbin", NS, "httpbin"))
    message = (
        'Back-off pulling image "docker.io/mccutchen/go-httpbin:v9.9.9"'
        if "Image" in reason
        else "back-off 40s restarting failed container"
    )
    waiting = {"istio-validation" if init else "httpbin": (reason, message)}
    fake.add(
        pod(
            "httpbin-7d9c-abcde",
            NS,
            "httpbin",
            waiting=None if init else waiting,
            init_waiting=waiting if init else None,
        )
    )
    fake.add(
        event(
            NS,
            "httpbin-7d9c-abcde",
            "Failed",
            'Failed to pull image "docker.io/mccutchen/go-httpbin:v9.9.9": not found',
            "2026-11-21T10:00:02Z",
            count=3,
        )
    )
    fake.add(
        event(
            NS, "httpbin-7d9c-abcde", "Scheduled", "Successfully assigned", "2026-11-21T10:00:00Z"
        )
    )
    fake.add(event(NS, "other-pod", "Failed", "unrelated", "2026-11-21T10:00:01Z"))
    return fake


@pytest.mark.parametrize(
    ("reason", "init"),
    [("ImagePullBackOff", False), ("CrashLoopBackOff", False), ("CrashLoopBackOff", True)],
)
def test_rollout_fails_fast_with_pod_events(reason: str, init: bool, tmp_path: Path) -> None:
    fake = _stuck_cluster(reason, init)
    seen_pods_at_capture: list[int] = []

    def capture(message: str) -> Path:
        # diagnostics run before the error propagates: the pod is still there
        seen_pods_at_capture.append(len(fake.list("v1", "Pod", NS)))
        (tmp_path / "reason.txt").write_text(message)
        return tmp_path

    with pytest.raises(DeployFailed) as caught:
        wait_rollouts(
            fake, [Workload("Deployment", "httpbin", NS)], timeout=120, on_failure=capture
        )
    text = str(caught.value)
    assert "timed out" not in text  # the fail-fast path, not the 120 s timeout
    container = "istio-validation" if init else "httpbin"
    assert f"pod httpbin-7d9c-abcde in {NS}: container {container} is {reason}" in text
    assert "Warning Failed: Failed to pull image" in text
    assert "(x3)" in text
    assert "Normal Scheduled: Successfully assigned" in text
    assert text.index("Scheduled") < text.index("Failed to pull")  # oldest first
    assert "unrelated" not in text
    assert f"diagnostics: {tmp_path}" in text
    assert caught.value.artifacts == tmp_path
    assert seen_pods_at_capture == [1]
    assert (tmp_path / "reason.txt").read_text().startswith("deployment cannot become ready")


def test_rollout_waits_for_readiness_and_a_late_controller() -> None:
    fake = FakeKube()
    polls = {"n": 0}

    def controller(kube: FakeKube, obj: dict[str, Any]) -> None:
        if obj["metadata"]["name"] != "httpbin":
            return
        polls["n"] += 1
        if polls["n"] == 2:  # istiod creates the Gateway API deployment late
            kube.add(deployment("secure-gw-istio", NS, "secure-gw", ready=1))
        if polls["n"] >= 3:
            obj["status"]["availableReplicas"] = 1

    fake.on_get["Deployment"] = controller
    fake.add(deployment("httpbin", NS, "httpbin"))
    fake.add(pod("httpbin-1", NS, "httpbin", phase="Running"))
    wait_rollouts(
        fake,
        [Workload("Deployment", "httpbin", NS), Workload("Deployment", "secure-gw-istio", NS)],
        timeout=10,
        interval=0.01,
    )
    assert polls["n"] == 3


def test_rollout_timeout_reports_state_and_events(tmp_path: Path) -> None:
    fake = FakeKube()
    fake.add(deployment("httpbin", NS, "httpbin"))
    fake.add(pod("httpbin-1", NS, "httpbin", phase="Pending"))
    fake.add(
        event(
            NS, "httpbin-1", "FailedScheduling", "0/1 nodes are available", "2026-11-21T10:00:00Z"
        )
    )
    with pytest.raises(DeployFailed) as caught:
        wait_rollouts(
            fake,
            [Workload("Deployment", "httpbin", NS)],
            timeout=0.5,
            interval=0.05,
            on_failure=lambda message: tmp_path,
        )
    text = str(caught.value)
    assert "did not finish within 0.5s" in text
    assert "0/1 ready" in text
    assert "pod httpbin-1: Pending" in text
    assert "FailedScheduling: 0/1 nodes are available" in text


def test_statefulset_needs_current_revision() -> None:
    fake = FakeKube()
    sts = deployment("prometheus-sm", NS, "prometheus")
    sts["kind"] = "StatefulSet"
    sts["status"].update(readyReplicas=1, currentRevision="a", updateRevision="b")
    fake.add(sts)
    with pytest.raises(DeployFailed, match="did not finish"):
        wait_rollouts(
            fake, [Workload("StatefulSet", "prometheus-sm", NS)], timeout=0.3, interval=0.05
        )
    fake.find("StatefulSet", "prometheus-sm", NS)["status"]["currentRevision"] = "b"  # type: ignore[index]
    wait_rollouts(fake, [Workload("StatefulSet", "prometheus-sm", NS)], timeout=2, interval=0.05)


def test_fatal_containers_ignores_transient_reasons() -> None:
    pods = [
        pod("a", NS, "x", waiting={"c": ("ContainerCreating", "")}),
        pod("b", NS, "x", waiting={"c": ("ErrImagePull", "one failed pull is retried")}),
        pod("c", NS, "x", waiting={"c": ("ImagePullBackOff", "")}),
    ]
    assert [s.pod for s in fatal_containers(pods)] == ["c"]
