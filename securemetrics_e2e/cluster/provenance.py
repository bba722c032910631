"""What really ran on a cluster, read back from it for the report's provenance.

The images the plan asked for are not proof of what served: a vendor's registry mirror,
an admission controller or a stale tag can change them. So the report takes the images
and digests from the running pods' ``status.containerStatuses`` (``imageID`` carries the
digest the kubelet pulled): istiod's ``discovery`` container (Istio's
manifests/charts/istio-control/istio-discovery/templates/deployment.yaml), the scraper
pod's injected ``istio-proxy`` (the data plane that presented the mesh certificate) and
its ``prometheus-server``. The Istio version "reported by the cluster" is the one in the
running istiod image's tag.
"""

from __future__ import annotations

from typing import Any

from securemetrics_e2e.cluster.istio import ISTIOD_SELECTOR, REVISION_LABEL, version_from_image
from securemetrics_e2e.cluster.kube import KubeAPI
from securemetrics_e2e.cluster.resources import running_pods
from securemetrics_e2e.istionames import PROXY_CONTAINER

Obj = dict[str, Any]

#: istiod's container in Istio's discovery chart
DISCOVERY_CONTAINER = "discovery"
#: the scraper chart's Prometheus container (charts/secure-metrics-prometheus)
PROMETHEUS_CONTAINER = "prometheus-server"


def _digest(image_id: str) -> str:
    """``sha256:…`` from an imageID such as ``docker.io/istio/pilot@sha256:…`` ("" if none)."""
    _, sep, digest = image_id.rpartition("@")
    if sep:
        return digest
    return image_id if image_id.startswith("sha256:") else ""


def container_facts(pod: Obj, container: str) -> tuple[str, str]:
    """(image, digest) of ``container`` as the kubelet runs it; ("", "") when absent."""
    status = pod.get("status") or {}
    statuses = [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]
    for s in statuses:
        if s.get("name") == container:
            return str(s.get("image", "")), _digest(str(s.get("imageID", "")))
    return "", ""


def running_images(
    api: KubeAPI,
    *,
    istio_namespace: str,
    revision: str | None,
    scraper_namespace: str,
    scraper_selector: str,
) -> dict[str, str]:
    """The report's cluster facts: ``istiod_image``/``_digest``, ``proxy_image``/``_digest``,
    ``prometheus_image``/``_digest`` and ``istio_version_reported``; a fact the cluster
    does not show is left out rather than guessed."""
    facts: dict[str, str] = {}
    selector = ISTIOD_SELECTOR + (f",{REVISION_LABEL}={revision}" if revision else "")
    scraper = running_pods(api, scraper_namespace, scraper_selector)
    sources = (
        ("istiod", running_pods(api, istio_namespace, selector), DISCOVERY_CONTAINER),
        ("proxy", scraper, PROXY_CONTAINER),  # the data plane that presented its certificate
        ("prometheus", scraper, PROMETHEUS_CONTAINER),
    )
    for name, pods, container in sources:
        if not pods:
            continue
        image, digest = container_facts(pods[0], container)
        if image:
            facts[f"{name}_image"] = image
        if digest:
            facts[f"{name}_image_digest"] = digest
    reported = version_from_image(facts.get("istiod_image", ""))
    if reported:
        facts["istio_version_reported"] = reported
    return facts
