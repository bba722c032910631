"""istioctl command lines, Istio detection, pinned node images and bundles.

Detection reads what a cluster reports, so it runs on the FAKE Kubernetes API
(tests/fakekube.py) holding the objects an istioctl install creates.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from securemetrics_e2e.cluster import istio, pins
from securemetrics_e2e.cluster.errors import DownloadFailed, IstioConflict
from securemetrics_e2e.cluster.setup import resolve_istio
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.versions import KubernetesRange
from tests.fakekube import FakeKube

TARGET = istio.KubeTarget(Path("/k/config"), "kind-sm")


def test_install_and_uninstall_commands() -> None:
    assert istio.install_command("istioctl", TARGET) == [
        "istioctl", "install", "-y", "--kubeconfig", "/k/config", "--context", "kind-sm",
        "--set", "profile=default",
    ]  # fmt: skip
    assert istio.install_command("istioctl", istio.KubeTarget(None, None), revision="r1")[-2:] == [
        "--set",
        "revision=r1",
    ]
    # a revision-less install is revision "default" (istioctl/pkg/tag/revision.go)
    assert istio.uninstall_command("istioctl", TARGET, revision=None)[-2:] == [
        "--revision",
        "default",
    ]
    assert istio.uninstall_command("istioctl", TARGET, revision="r1")[-2:] == ["--revision", "r1"]
    assert istio.analyze_command("istioctl", TARGET, "ns1")[-2:] == ["-n", "ns1"]
    assert istio.listeners_command("istioctl", TARGET, "pod-1", "ns1")[1:3] == [
        "proxy-config",
        "listeners",
    ]


@pytest.mark.parametrize(
    ("image", "version"),
    [
        ("docker.io/istio/pilot:1.31.1", "1.31.1"),
        ("docker.io/istio/pilot:1.30.5-distroless", "1.30.5"),
        ("gcr.io/vendor/pilot:1.31.0-rc.0@sha256:" + "a" * 64, "1.31.0-rc.0"),
        ("registry.example.com/pilot:latest", None),
    ],
)
def test_version_from_image(image: str, version: str | None) -> None:
    assert istio.version_from_image(image) == version


def _istiod(
    fake: FakeKube, image: str, revision: str | None = None, ns: str = "istio-system"
) -> None:
    labels = {"app": "istiod"}
    if revision:
        labels["istio.io/rev"] = revision
    fake.add(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": f"istiod-{revision}" if revision else "istiod",
                "namespace": ns,
                "labels": labels,
            },
            "spec": {"template": {"spec": {"containers": [{"name": "discovery", "image": image}]}}},
        }
    )


def test_detect_installed_istio_by_revision() -> None:
    fake = FakeKube()
    assert istio.detect_istio(fake) is None
    _istiod(fake, "docker.io/istio/pilot:1.30.5")
    _istiod(fake, "docker.io/istio/pilot:1.31.1", revision="canary", ns="istio-canary")
    default = istio.detect_istio(fake)
    assert default is not None
    assert (default.version, default.namespace, default.revision) == (
        "1.30.5",
        "istio-system",
        None,
    )
    canary = istio.detect_istio(fake, "canary")
    assert canary is not None
    assert (canary.version, canary.namespace) == ("1.31.1", "istio-canary")


def test_installed_istio_of_another_version_is_a_clear_conflict() -> None:
    fake = FakeKube()
    _istiod(fake, "docker.io/istio/pilot:1.30.5")
    assert resolve_istio(fake, None, None) is not None  # no version asked: run against it
    assert resolve_istio(fake, "1.30.5", None) is not None
    with pytest.raises(IstioConflict, match=r"already runs Istio 1\.30\.5 .* 1\.31\.1 was asked"):
        resolve_istio(fake, "1.31.1", None)


def test_trust_domain_from_mesh_config() -> None:
    fake = FakeKube()
    assert istio.trust_domain(fake, "istio-system", None) == "cluster.local"
    fake.add(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {
                "mesh": "defaultConfig:\n  discoveryAddress: istiod:15012\n"
                "trustDomain: corp.example\n"
            },
        }
    )
    assert istio.trust_domain(fake, "istio-system", None) == "corp.example"


def test_installed_gateway_api_and_operator_are_detected() -> None:
    fake = FakeKube()
    assert istio.gateway_api_installed(fake) is None
    assert istio.operator_installed(fake) == (False, False)
    fake.add(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": pins.GATEWAY_CRD,
                "annotations": {pins.GATEWAY_BUNDLE_ANNOTATION: "v1.5.1"},
            },
        }
    )
    fake.add(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "prometheus-operator",
                "namespace": "monitoring",
                "labels": {"app.kubernetes.io/name": "prometheus-operator"},
            },
        }
    )
    assert istio.gateway_api_installed(fake) == "v1.5.1"
    assert istio.operator_installed(fake) == (False, True)


def test_node_image_is_the_newest_inside_the_istio_range() -> None:
    assert pins.node_image(KubernetesRange("1.32", "1.36")).startswith(
        "kindest/node:v1.36.4@sha256:"
    )
    assert pins.node_image(KubernetesRange("1.30", "1.34")).startswith(
        "kindest/node:v1.34.11@sha256:"
    )
    with pytest.raises(UsageError, match="--kind-image"):
        pins.node_image(KubernetesRange("1.20", "1.25"))
    for image in pins.KIND_NODE_IMAGES.values():
        digest = image.rsplit("@sha256:", 1)[1]
        assert len(digest) == 64
        assert int(digest, 16) >= 0


def test_unpinned_gateway_api_version_names_the_manual_route() -> None:
    with pytest.raises(DownloadFailed, match=r"standard-install\.yaml"):
        pins.gateway_api_files("v9.9.9")


def test_operator_bundle_pin_is_well_formed() -> None:
    bundle = pins.PROMETHEUS_OPERATOR_BUNDLE
    assert bundle.url.endswith(f"/releases/download/{pins.PROMETHEUS_OPERATOR_VERSION}/bundle.yaml")
    assert len(bundle.sha256) == 64
    assert bundle.sha256 != hashlib.sha256(b"").hexdigest()


def test_parse_documents() -> None:
    objects = istio.parse_documents(
        b"---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n", "x"
    )
    assert [o["kind"] for o in objects] == ["Namespace"]
    with pytest.raises(DownloadFailed, match="no Kubernetes objects"):
        istio.parse_documents(b"# nothing\n", "https://example.invalid/empty.yaml")
    with pytest.raises(DownloadFailed, match="not valid YAML"):
        istio.parse_documents(b"a: [\n", "bad.yaml")
