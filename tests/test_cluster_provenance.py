"""A cluster report names what really ran: images and digests read back from the running
pods, on a FAKE Kubernetes API (tests/fakekube.py, a control-flow fake)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securemetrics_e2e.cluster.provenance import container_facts
from securemetrics_e2e.istionames import PROXY_CONTAINER
from securemetrics_e2e.report import ReportMeta, build_report, validate_report
from securemetrics_e2e.results import RunResult
from tests.fakekube import FakeKube
from tests.test_cluster_backend import _backend, fake

__all__ = ["fake"]

PILOT = "sha256:" + "1" * 64
PROXY = "sha256:" + "2" * 64
PROM = "sha256:" + "3" * 64


def _pod(name: str, ns: str, labels: dict[str, str], containers: dict[str, tuple[str, str]]) -> Any:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": c, "image": i} for c, (i, _) in containers.items()]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": c, "image": i, "imageID": d} for c, (i, d) in containers.items()
            ],
        },
    }


def test_container_facts_take_the_digest_the_kubelet_pulled() -> None:
    pod = _pod("p", "ns", {}, {"discovery": ("istio/pilot:1.31.1", f"istio/pilot@{PILOT}")})
    assert container_facts(pod, "discovery") == ("istio/pilot:1.31.1", PILOT)
    assert container_facts(pod, "absent") == ("", "")


def test_a_cluster_report_names_the_running_images_and_digests(
    fake: FakeKube, tmp_path: Path
) -> None:
    backend = _backend(fake, tmp_path)
    fake.add(
        _pod(
            "istiod-abc",
            "istio-system",
            {"app": "istiod"},
            {"discovery": ("docker.io/istio/pilot:1.31.1", f"docker.io/istio/pilot@{PILOT}")},
        )
    )
    fake.add(
        _pod(
            "prometheus-xyz",
            backend.scraper.namespace,
            {"app.kubernetes.io/name": "prometheus"},
            {
                PROXY_CONTAINER: ("docker.io/istio/proxyv2:1.31.1", f"x/proxyv2@{PROXY}"),
                "prometheus-server": ("docker.io/prom/prometheus:v3.10.0", f"x/p@{PROM}"),
            },
        )
    )
    facts = backend.describe()
    assert facts["istiod_image_digest"] == PILOT
    assert facts["proxy_image"] == "docker.io/istio/proxyv2:1.31.1"
    assert facts["istio_version_reported"] == "1.31.1"
    doc = build_report(RunResult(), ReportMeta.from_environment(facts))
    validate_report(doc)
    components = {c["name"]: c for c in doc["provenance"]["components"]}
    assert components["istiod"]["digest"] == PILOT
    assert components["proxy"]["digest"] == PROXY
    assert components["prometheus"] == {
        "name": "prometheus",
        "image": "docker.io/prom/prometheus:v3.10.0",
        "version": "v3.10.0",
        "digest": PROM,
    }
    assert doc["provenance"]["istioVersionReported"] == "1.31.1"
    backend.close()


def test_without_running_pods_nothing_is_guessed(fake: FakeKube, tmp_path: Path) -> None:
    backend = _backend(fake, tmp_path)
    facts = backend.describe()
    assert not any(k.endswith(("_image", "_image_digest")) for k in facts)
    assert "istio_version_reported" not in facts
    backend.close()
