"""The pods a deployed variant runs, as the backend seam's workloads.

A located pod becomes a :class:`~securemetrics_e2e.backend.Workload` with the identity
istiod signs for it; after an upgrade, :func:`relocate` waits for each workload's new
pod and checks it runs the new version's proxy.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from securemetrics_e2e.backend import Deployment, Workload
from securemetrics_e2e.catalog import WorkloadSpec
from securemetrics_e2e.cluster import istio
from securemetrics_e2e.cluster.errors import DeployFailed
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.cluster.layout import VariantPlan, WorkloadLocator
from securemetrics_e2e.cluster.resources import running_pods
from securemetrics_e2e.istionames import PROXY_CONTAINER
from securemetrics_e2e.spiffe import SpiffeId
from securemetrics_e2e.waiting import NotYet, wait_for


@dataclass
class Active:
    """A deployed run unit: the plan it was deployed from and what the seam returned."""

    plan: VariantPlan
    deployment: Deployment


def workload_of(spec: WorkloadSpec, loc: WorkloadLocator, pod: Obj, trust_domain: str) -> Workload:
    """The workload a located pod runs, with the identity istiod signs for it.

    The SPIFFE ID is ``spiffe://<trust domain>/ns/<pod namespace>/sa/<pod's
    spec.serviceAccountName>``: istiod signs the service account of the pod's token
    (security/pkg/server/ca/authenticate/kubeauth/kube_jwt.go), so it is read from
    the pod, not assumed: istioctl names the ingress gateway's account
    ``istio-ingressgateway-service-account``, the Helm ``gateway`` chart names it
    after the release (ISTIO-FACTS.md "Gateways"). The catalog's name is only the
    fallback for a pod that names none (Kubernetes then runs it as ``default``).
    """
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    account = str((pod.get("spec") or {}).get("serviceAccountName") or "")
    return Workload(
        spec=spec,
        namespace=loc.namespace,
        pod_name=str(meta.get("name", "")),
        pod_ip=str(status.get("podIP", "")),
        spiffe_id=SpiffeId.for_workload(
            trust_domain, loc.namespace, account or loc.service_account
        ),
    )


def locate(api: KubeAPI, plan: VariantPlan, trust_domain: str) -> list[Workload]:
    """Each workload of ``plan`` on its first running pod."""
    specs = {w.name: w for w in plan.scenario.workloads}
    found = []
    for loc in plan.locators:
        pods = running_pods(api, loc.namespace, loc.selector)
        if not pods:
            raise DeployFailed(f"no running pod of {loc.name} ({loc.selector}) in {loc.namespace}")
        found.append(workload_of(specs[loc.name], loc, pods[0], trust_domain))
    return found


def proxy_image(pod: Obj) -> str | None:
    """The image of the pod's istio-proxy (a container, or a native-sidecar init container)."""
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        if container.get("name") == PROXY_CONTAINER:
            return str(container.get("image", "")) or None
    return None


def relocate(
    api: KubeAPI,
    plan: VariantPlan,
    specs: dict[str, WorkloadSpec],
    replaced: Collection[str],
    *,
    version: str,
    trust_domain: str,
    timeout: float,
    canary_hint: str = "",
) -> Sequence[Workload]:
    """The workloads' new pods (not one of ``replaced``), each checked to run Istio
    ``version``'s proxy, with ``specs`` (by workload name) the upgrade switched them to.
    ``canary_hint`` ends the error of a pod still on the old proxy."""
    found = []
    for loc in plan.locators:

        def new_pod(loc: WorkloadLocator = loc) -> Obj:
            pods = [
                p
                for p in running_pods(api, loc.namespace, loc.selector)
                if (p.get("metadata") or {}).get("name") not in replaced
            ]
            if not pods:
                raise NotYet(f"no running pod of {loc.name} other than {sorted(replaced)}")
            return pods[0]

        pod = wait_for(
            f"the restarted pod of {loc.name} in {loc.namespace}",
            new_pod,
            timeout=timeout,
            interval=0.2,
            max_interval=2.0,
        )
        meta = pod.get("metadata") or {}
        image = proxy_image(pod)
        running = istio.version_from_image(image) if image else None
        if running is not None and running != version:
            raise DeployFailed(
                f"pod {meta.get('name')} in {loc.namespace} runs {PROXY_CONTAINER} {image} "
                f"after the upgrade, not Istio {version}: the sidecar injector still serves "
                f"the old version{canary_hint}"
            )
        found.append(workload_of(specs[loc.name], loc, pod, trust_domain))
    return found
