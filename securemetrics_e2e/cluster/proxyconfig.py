"""The Gateway API ProxyConfig path: wait for the environment before the rollout.

istiod renders a generated gateway Deployment from
``GetProxyConfigOrDefault(namespace, {gateway-name label}, nil, mesh)``
(pilot/pkg/config/kube/gatewaycommon/deploymentcontroller.go), and the istio-proxy env
comes from that ProxyConfig's ``proxyMetadata`` (kube-gateway.yaml). Nothing in istiod
watches ProxyConfig for this: the Deployment is rendered from the last push context, so
a Gateway applied right after its ProxyConfig may first be rendered without the
variables, roll out, and look ready while its ports stay shut (ISTIO-FACTS.md
"Gateways"). So before waiting for the rollout, wait until the generated Deployment's
istio-proxy container carries every ``ENVOY_SECURE_*`` variable the ProxyConfig sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from securemetrics_e2e.cluster.errors import DeployFailed
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.istionames import PROXY_CONTAINER
from securemetrics_e2e.manifests import GENERATED_GATEWAY_SUFFIX
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
SECURE_PREFIX = "ENVOY_SECURE_"


@dataclass(frozen=True)
class EnvWait:
    """A generated gateway Deployment and the variables its istio-proxy must carry."""

    deployment: str
    namespace: str
    names: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"deployment/{self.deployment} in {self.namespace}: istio-proxy env carries "
            + ", ".join(self.names)
        )


def env_waits(manifests: Iterable[Obj]) -> list[EnvWait]:
    """One wait per ProxyConfig that selects a gateway by name and sets ENVOY_SECURE_*."""
    waits = []
    for obj in manifests:
        if obj.get("kind") != "ProxyConfig":
            continue
        spec, meta = obj.get("spec") or {}, obj.get("metadata") or {}
        gateway = ((spec.get("selector") or {}).get("matchLabels") or {}).get(GATEWAY_NAME_LABEL)
        names = tuple(
            sorted(k for k in spec.get("environmentVariables") or {} if k.startswith(SECURE_PREFIX))
        )
        if gateway and names:
            deployment = f"{gateway}{GENERATED_GATEWAY_SUFFIX}"
            waits.append(EnvWait(deployment, str(meta.get("namespace", "")), names))
    return waits


def proxy_env(deployment: Obj) -> set[str]:
    """The env names of the istio-proxy container in a Deployment's pod template."""
    spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]:
        if container.get("name") == PROXY_CONTAINER:
            return {str(e.get("name")) for e in container.get("env") or []}
    return set()


def wait_for_env(api: KubeAPI, waits: Sequence[EnvWait], *, timeout: float) -> None:
    """Until every generated Deployment carries its variables; DeployFailed after ``timeout``."""
    for wait in waits:

        def carried(wait: EnvWait = wait) -> None:
            live = api.get("apps/v1", "Deployment", wait.deployment, wait.namespace)
            if live is None:
                raise NotYet(f"deployment/{wait.deployment} not generated yet")
            missing = [n for n in wait.names if n not in proxy_env(live)]
            if missing:
                raise NotYet(f"its istio-proxy env lacks {', '.join(missing)}")

        try:
            wait_for(wait.describe(), carried, timeout=timeout, interval=0.5, max_interval=3.0)
        except WaitTimeout as exc:
            raise DeployFailed(
                f"{wait.describe()} never held within {timeout:g}s ({exc}): istiod rendered the "
                "generated gateway without the ProxyConfig's environmentVariables (it renders "
                "from the last push context and does not watch ProxyConfig); re-apply the "
                "Gateway, or check that the ProxyConfig selects its gateway-name label"
            ) from None
