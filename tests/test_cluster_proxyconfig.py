"""The Gateway API ProxyConfig path waits for the generated Deployment's environment
before its rollout, on a FAKE Kubernetes API (tests/fakekube.py).

:class:`Istiod` plays what istiod's deployment controller does when the Gateway is
applied (pilot/pkg/config/kube/gatewaycommon/deploymentcontroller.go): it generates
``<gateway>-istio``, first from a push context that has not seen the ProxyConfig yet
(no env), and with the ProxyConfig's variables only from its ``rerender_after``-th read
on, or never (ISTIO-FACTS.md "Gateways": nothing watches ProxyConfig for it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.catalog import MtlsMode, VariantId, scenario
from securemetrics_e2e.cluster import pins
from securemetrics_e2e.cluster.errors import DeployFailed
from securemetrics_e2e.cluster.layout import variant_plan
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.plan import render_plan
from securemetrics_e2e.cluster.proxyconfig import EnvWait, env_waits, proxy_env
from securemetrics_e2e.versions import resolve
from tests.fakekube import FakeKube
from tests.test_cluster_backend import Controller, _backend, fake

__all__ = ["fake"]  # the backend tests' cluster: istio-system, an ingress gateway, ...

GATEWAY = "secure-gw"
SECURE_ENV = ("ENVOY_SECURE_MERGED_METRICS_PORT", "ENVOY_SECURE_METRICS_PORT")
#: the run unit that applies a ProxyConfig (the documented one, spec.infrastructure
#: annotations, has nothing to wait for: those never reach the agent's environment)
PROXYCONFIG = next(v for v in scenario("gateway-api").variants if v.id is VariantId.PROXYCONFIG)


def test_env_waits_follow_the_rendered_proxy_config() -> None:
    plan = variant_plan(
        scenario("gateway-api"), MtlsMode.PERMISSIVE, resolve("1.31"), "r1", variant=PROXYCONFIG
    )
    assert env_waits(plan.manifests) == [
        EnvWait(f"{GATEWAY}-istio", "sm-gateway-api-permissive-proxyconfig-r1", SECURE_ENV)
    ]
    documented = variant_plan(scenario("gateway-api"), MtlsMode.PERMISSIVE, resolve("1.31"), "r1")
    assert env_waits(documented.manifests) == []
    other = variant_plan(scenario("native-gateway"), MtlsMode.PERMISSIVE, resolve("1.31"), "r1")
    assert env_waits(other.manifests) == []


def test_plan_waits_for_the_env_before_the_rollout(tmp_path: Path) -> None:
    options = ClusterOptions(istio_version="1.31", run_id="r1", cache_dir=tmp_path)
    text = render_plan(options, [scenario("gateway-api")]).render_text()
    env = text.index(
        f"wait until deployment/{GATEWAY}-istio in sm-gateway-api-permissive-proxyconfig-r1"
    )
    assert "istio-proxy env carries ENVOY_SECURE_MERGED_METRICS_PORT" in text
    assert env < text.index("wait for rollouts", env)


class Istiod:
    """Generates the gateway's Deployment when the Gateway is applied (see module doc)."""

    def __init__(self, fake: FakeKube, rerender_after: int | None) -> None:
        self.fake, self.rerender_after, self.reads = fake, rerender_after, 0
        self.controller = Controller(fake)
        fake.on_get["Deployment"] = self.on_get
        self._apply = fake.apply
        fake.apply = self.apply  # type: ignore[method-assign]

    def apply(self, obj: Any, **kw: Any) -> Any:
        done = self._apply(obj, **kw)
        if obj["kind"] == "Gateway" and obj["apiVersion"].startswith("gateway.networking"):
            self._render(obj["metadata"]["namespace"], env=False)
        return done

    def _render(self, ns: str, *, env: bool) -> None:
        labels = {"gateway.networking.k8s.io/gateway-name": GATEWAY}
        proxy: dict[str, Any] = {"name": "istio-proxy", "image": "proxyv2:1.31.1"}
        if env:
            proxy["env"] = [{"name": n, "value": "1509x"} for n in SECURE_ENV]
        self._apply(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": f"{GATEWAY}-istio", "namespace": ns},
                "spec": {
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": {"containers": [proxy]}},
                },
            },
            field_manager="istiod",
        )

    def on_get(self, fake: FakeKube, dep: dict[str, Any]) -> None:
        if dep["metadata"]["name"] == f"{GATEWAY}-istio":
            self.reads += 1
            if self.rerender_after is not None and self.reads == self.rerender_after:
                self._render(dep["metadata"]["namespace"], env=True)
                dep.update(
                    fake.find("Deployment", f"{GATEWAY}-istio", dep["metadata"]["namespace"])
                )
        self.controller(fake, dep)  # ready at once: a rollout alone would pass


def _crd(fake: FakeKube) -> None:
    fake.add(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": pins.GATEWAY_CRD,
                "annotations": {pins.GATEWAY_BUNDLE_ANNOTATION: "v1.6.0"},
            },
        }
    )


def test_deploy_waits_until_the_generated_deployment_carries_the_env(
    fake: FakeKube, tmp_path: Path
) -> None:
    _crd(fake)
    istiod = Istiod(fake, rerender_after=3)
    backend = _backend(fake, tmp_path)
    dep = backend.deploy(scenario("gateway-api"), MtlsMode.PERMISSIVE, PROXYCONFIG)
    live = fake.find("Deployment", f"{GATEWAY}-istio", dep.namespace)
    assert live is not None
    assert set(SECURE_ENV) <= proxy_env(live)  # deployed only once re-rendered with them
    assert istiod.reads >= 3
    backend.teardown(dep)
    backend.close()


def test_deploy_fails_when_the_env_never_comes(fake: FakeKube, tmp_path: Path) -> None:
    _crd(fake)
    Istiod(fake, rerender_after=None)
    backend = _backend(fake, tmp_path)
    backend.timeouts = dataclasses.replace(backend.timeouts, rollout=2)
    with pytest.raises(DeployFailed, match=r"never held within 2s.*does not watch ProxyConfig"):
        backend.deploy(scenario("gateway-api"), MtlsMode.PERMISSIVE, PROXYCONFIG)
    backend.close()
