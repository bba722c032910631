"""Istio on the cluster: istioctl commands, detecting an installed control plane,
Gateway API CRDs and the Prometheus Operator bundle.

Commands are built here as argument lists and run by the backend, so the plan shows
exactly what the backend would run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from securemetrics_e2e.cluster.errors import DownloadFailed
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.cluster.pins import (
    GATEWAY_BUNDLE_ANNOTATION,
    GATEWAY_CRD,
    OPERATOR_SELECTOR,
    PROMETHEUS_OPERATOR_BUNDLE,
    SERVICEMONITOR_CRD,
    gateway_api_files,
)
from securemetrics_e2e.cluster.tools import ToolCache, fetch_pinned

ISTIOD_SELECTOR = "app=istiod"
#: the revision a control plane installed without ``--set revision`` carries: Istio's
#: charts label it ``istio.io/rev: default`` and istioctl lists it so
#: (istioctl/pkg/tag/revision.go renderWithDefault(..., DefaultRevisionName)), which is
#: why ``istioctl uninstall --revision default`` removes exactly that control plane
DEFAULT_REVISION = "default"
REVISION_LABEL = "istio.io/rev"
#: the MutatingWebhookConfiguration ``istioctl tag set default`` creates: it makes
#: ``istio-injection=enabled`` namespaces inject from the revision in its
#: ``istio.io/rev`` label (istioctl/pkg/tag/tag.go setTag, "istio-revision-tag-<tag>")
DEFAULT_TAG_WEBHOOK = "istio-revision-tag-default"
ADMISSION_API = "admissionregistration.k8s.io/v1"
INGRESS_GATEWAY = "istio-ingressgateway"
INGRESS_SELECTOR = "app=istio-ingressgateway"
CRD_API = "apiextensions.k8s.io/v1"
_VERSION_IN_TAG = re.compile(r":v?(\d+\.\d+\.\d+(?:-(?:alpha|beta|rc)\.\d+)?)")


@dataclass(frozen=True)
class KubeTarget:
    """How istioctl and kubectl find the cluster."""

    kubeconfig: Path | None
    context: str | None

    def args(self) -> list[str]:
        out = []
        if self.kubeconfig is not None:
            out += ["--kubeconfig", str(self.kubeconfig)]
        if self.context:
            out += ["--context", self.context]
        return out


@dataclass(frozen=True)
class InstalledIstio:
    """An istiod found on the cluster."""

    version: str | None  # from its image tag; None when the tag names no version
    namespace: str
    revision: str | None
    image: str


def install_command(
    istioctl: str,
    target: KubeTarget,
    *,
    hub: str | None = None,
    tag: str | None = None,
    revision: str | None = None,
    verb: str = "install",
    profile: str = "default",
) -> list[str]:
    """``istioctl install`` with ``profile`` (default: istiod + istio-ingressgateway).

    ``verb="upgrade"``: the in-place upgrade, which istio.io runs with the same flags as
    the install (``istioctl upgrade`` is an alias of ``install``). ``profile="minimal"``
    installs istiod only (a canary revision beside a running control plane).
    """
    cmd = [istioctl, verb, "-y", *target.args(), "--set", f"profile={profile}"]
    if hub:
        cmd += ["--set", f"hub={hub}"]
    if tag:
        cmd += ["--set", f"tag={tag}"]
    if revision:
        cmd += ["--set", f"revision={revision}"]
    return cmd


def uninstall_command(istioctl: str, target: KubeTarget, *, revision: str | None) -> list[str]:
    """Remove the one control-plane revision :func:`install_command` installed.

    Never ``--purge``: it removes every revision and the cluster-wide resources
    (operator/pkg/uninstall/prune.go GetPrunedResources with includeClusterResources),
    a vendor's control plane included (ISTIO-FACTS.md "Existing clusters"). By
    revision, istioctl prunes only the objects labelled ``istio.io/rev=<revision>`` of
    the pilot and gateway components (operator/cmd/mesh/uninstall.go runUninstall); a
    revision-less install is revision ``default``.
    """
    cmd = [istioctl, "uninstall", "-y", *target.args()]
    return [*cmd, "--revision", revision or DEFAULT_REVISION]


def tag_set_command(istioctl: str, target: KubeTarget, tag: str, revision: str) -> list[str]:
    return [istioctl, "tag", "set", tag, *target.args(), "--revision", revision, "--overwrite"]


def tag_remove_command(istioctl: str, target: KubeTarget, tag: str) -> list[str]:
    """Remove a revision tag the run set: ``istioctl tag set`` makes it user-managed, so
    no uninstall removes it (istioctl/pkg/tag/generate.go GenerateOptions.UserManaged)."""
    return [istioctl, "tag", "remove", tag, "-y", *target.args()]


def analyze_command(istioctl: str, target: KubeTarget, namespace: str) -> list[str]:
    return [istioctl, "analyze", *target.args(), "-n", namespace]


def listeners_command(istioctl: str, target: KubeTarget, pod: str, namespace: str) -> list[str]:
    return [istioctl, "proxy-config", "listeners", *target.args(), pod, "-n", namespace]


def version_from_image(image: str) -> str | None:
    match = _VERSION_IN_TAG.search(image.split("@", 1)[0])
    return match.group(1) if match else None


def installed_istiods(api: KubeAPI) -> list[InstalledIstio]:
    """Every istiod Deployment on the cluster, of any revision, in any namespace:
    ``istiod`` (revision-less, labelled ``istio.io/rev: default``) and ``istiod-<rev>``
    (labelled ``istio.io/rev: <rev>``); both carry ``app: istiod`` (Istio's
    manifests/charts/istio-control/istio-discovery/templates/deployment.yaml)."""
    found = []
    for dep in api.list("apps/v1", "Deployment", None, label_selector=ISTIOD_SELECTOR):
        meta = dep.get("metadata") or {}
        labels = meta.get("labels") or {}
        rev = labels.get(REVISION_LABEL)
        rev = None if rev in (None, "", DEFAULT_REVISION) else str(rev)
        containers = (((dep.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "containers"
        ) or [{}]
        image = str(containers[0].get("image", ""))
        found.append(
            InstalledIstio(version_from_image(image), str(meta.get("namespace", "")), rev, image)
        )
    return found


def default_tag_revision(api: KubeAPI) -> str | None:
    """The revision the ``default`` revision tag points at, if the tag exists."""
    hook = api.get(ADMISSION_API, "MutatingWebhookConfiguration", DEFAULT_TAG_WEBHOOK)
    if hook is None:
        return None
    rev = ((hook.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)
    return None if rev in (None, "", DEFAULT_REVISION) else str(rev)


def detect_istio(api: KubeAPI, revision: str | None = None) -> InstalledIstio | None:
    """The istiod serving ``revision``; without one, the istiod that injects namespaces
    labelled ``istio-injection=enabled``: the revision the ``default`` tag points at, or
    else the revision-less ``istiod`` (ISTIO-FACTS.md "Existing clusters")."""
    found = installed_istiods(api)
    if revision is None:
        revision = default_tag_revision(api)
    return next((i for i in found if i.revision == revision), None)


def trust_domain(api: KubeAPI, istio_namespace: str, revision: str | None) -> str:
    """The mesh's trust domain from the ``istio`` ConfigMap (``cluster.local`` by default)."""
    name = f"istio-{revision}" if revision else "istio"
    cm = api.get("v1", "ConfigMap", name, istio_namespace) or {}
    mesh_text = (cm.get("data") or {}).get("mesh", "")
    try:
        mesh = yaml.safe_load(mesh_text) if mesh_text else {}
    except yaml.YAMLError:
        mesh = {}
    domain = (mesh or {}).get("trustDomain") if isinstance(mesh, dict) else None
    return str(domain) if domain else "cluster.local"


# -- Gateway API CRDs -------------------------------------------------------------------


def gateway_api_installed(api: KubeAPI) -> str | None:
    """The installed Gateway API bundle version ("unknown" without the annotation), or None."""
    crd = api.get(CRD_API, "CustomResourceDefinition", GATEWAY_CRD)
    if crd is None:
        return None
    annotations = (crd.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(GATEWAY_BUNDLE_ANNOTATION, "unknown"))


def gateway_api_objects(version: str, cache: ToolCache) -> list[Obj]:
    """The CRDs (and the safe-upgrades policy) of Gateway API ``version``, verified."""
    objects: list[Obj] = []
    for item in gateway_api_files(version):
        objects += parse_documents(fetch_pinned(item, cache), item.url)
    return objects


# -- Prometheus Operator ----------------------------------------------------------------


def operator_installed(api: KubeAPI) -> tuple[bool, bool]:
    """(ServiceMonitor CRD present, an operator Deployment present anywhere)."""
    crd = api.get(CRD_API, "CustomResourceDefinition", SERVICEMONITOR_CRD) is not None
    operators = api.list("apps/v1", "Deployment", None, label_selector=OPERATOR_SELECTOR)
    return crd, bool(operators)


def operator_objects(cache: ToolCache, *, include_crds: bool = True) -> list[Obj]:
    """The operator bundle's objects, verified; without CRDs when someone else owns them."""
    data = fetch_pinned(PROMETHEUS_OPERATOR_BUNDLE, cache)
    objects = parse_documents(data, PROMETHEUS_OPERATOR_BUNDLE.url)
    if not include_crds:
        objects = [o for o in objects if o.get("kind") != "CustomResourceDefinition"]
    return objects


def parse_documents(data: bytes | str, source: str) -> list[Obj]:
    try:
        docs = list(yaml.safe_load_all(data))
    except yaml.YAMLError as exc:
        raise DownloadFailed(f"{source} is not valid YAML: {exc}") from None
    objects = [d for d in docs if isinstance(d, dict) and d.get("kind")]
    if not objects:
        raise DownloadFailed(f"{source} holds no Kubernetes objects")
    return objects


def deployment_template(obj: Mapping[str, Any]) -> Any:
    return ((obj.get("spec") or {}).get("template")) or {}


def kinds(objects: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"{o.get('kind')}/{(o.get('metadata') or {}).get('name')}" for o in objects]
