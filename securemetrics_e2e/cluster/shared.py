"""What several variants share on a cluster: CRDs, the Prometheus Operator, Istio's gateway.

The Gateway API CRDs and the Prometheus Operator are installed once, when the first
variant needs them (or found installed), labelled with the run and undone at teardown
unless the cluster is kept. A variant that patches a Deployment of Istio's (the classic
ingress gateway) has its pod template saved first and restored when it goes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from securemetrics_e2e.cluster import istio, pins
from securemetrics_e2e.cluster.errors import DeployFailed
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.resources import (
    Rollout,
    delete_objects,
    wait_rollouts,
    with_run_label,
)
from securemetrics_e2e.cluster.setup import PhaseTimer, Undo
from securemetrics_e2e.cluster.tools import ToolCache
from securemetrics_e2e.waiting import NotYet, wait_for


class SharedInstalls:
    """Installs shared by the run's variants, each done once, and patched templates."""

    def __init__(
        self,
        api: KubeAPI,
        options: ClusterOptions,
        *,
        cache: ToolCache,
        timer: PhaseTimer,
        undo: Undo,
    ) -> None:
        self.api = api
        self.options = options
        self.cache = cache
        self.timer = timer
        self.undo = undo
        #: the Gateway API the run uses, as ``describe`` reports it (None: none yet)
        self.gateway_api: str | None = None
        self._operator_ready = False
        self._saved_templates: dict[tuple[str, str, str], Any] = {}

    def _apply_owned(self, objects: Sequence[Obj], what: str) -> None:
        labelled = [with_run_label(o, self.options.run_id) for o in objects]
        for obj in labelled:
            self.api.apply(obj)
        if not self.options.keep_cluster:
            self.undo.push(
                f"delete {what}", lambda: delete_objects(self.api, labelled, self.options.run_id)
            )

    def ensure_gateway_api(self, wanted: str, istio_version: str) -> None:
        """The Gateway API CRDs, ``wanted`` (the version Istio ``istio_version`` expects)
        installed unless some version is."""
        if self.gateway_api is not None:
            return
        installed = istio.gateway_api_installed(self.api)
        if installed is None:
            with self.timer.phase(f"Gateway API {wanted} CRDs"):
                objects = istio.gateway_api_objects(wanted, self.cache)
                self._apply_owned(objects, f"Gateway API {wanted} CRDs")
                self._wait_established(
                    [o for o in objects if o["kind"] == "CustomResourceDefinition"]
                )
            self.gateway_api = f"{wanted} (installed by this run)"
        else:
            if installed != wanted:
                self.timer.progress(
                    f"[cluster] note: Gateway API {installed} is installed; Istio "
                    f"{istio_version} expects {wanted} (istioctl analyze reports IST0176)"
                )
            self.gateway_api = f"{installed} (found installed)"

    def ensure_operator(self) -> None:
        """A running Prometheus Operator: the one found, or the pinned bundle installed."""
        if self._operator_ready:
            return
        crd, running = istio.operator_installed(self.api)
        if not running:
            with self.timer.phase(f"Prometheus Operator {pins.PROMETHEUS_OPERATOR_VERSION}"):
                objects = istio.operator_objects(self.cache, include_crds=not crd)
                self._apply_owned(objects, "the Prometheus Operator bundle")
                self._wait_established(
                    [o for o in objects if o["kind"] == "CustomResourceDefinition"]
                )
                deployments = [
                    Rollout(
                        "Deployment",
                        o["metadata"]["name"],
                        o["metadata"].get("namespace", "default"),
                    )
                    for o in objects
                    if o["kind"] == "Deployment"
                ]
                wait_rollouts(self.api, deployments, timeout=self.options.rollout_timeout)
        self._operator_ready = True

    def _wait_established(self, crds: Sequence[Obj], timeout: float = 60.0) -> None:
        def established() -> None:
            for crd in crds:
                live = self.api.get(
                    "apiextensions.k8s.io/v1", "CustomResourceDefinition", crd["metadata"]["name"]
                )
                conditions = ((live or {}).get("status") or {}).get("conditions") or []
                if not any(
                    c.get("type") == "Established" and c.get("status") == "True" for c in conditions
                ):
                    raise NotYet(f"CRD {crd['metadata']['name']} not established yet")

        wait_for("installed CRDs to be established", established, timeout=timeout)

    def patch(self, api_version: str, kind: str, name: str, namespace: str, body: Any) -> None:
        """Patch an object the run does not own, its pod template saved first."""
        key = (kind, namespace, name)
        live = self.api.get(api_version, kind, name, namespace)
        if live is None:
            raise DeployFailed(
                f"{kind.lower()}/{name} does not exist in {namespace}: Istio was installed "
                "without it (the default profile has it); install it or run other scenarios "
                "with --scenario"
            )
        self._saved_templates.setdefault(key, istio.deployment_template(live))
        self.api.patch(api_version, kind, name, namespace, dict(body), patch_type="strategic")

    def restore(self, api_version: str, kind: str, name: str, namespace: str) -> None:
        """Put back the pod template :meth:`patch` saved (nothing, if it saved none)."""
        saved = self._saved_templates.pop((kind, namespace, name), None)
        if saved is None:
            return
        self.api.patch(
            api_version,
            kind,
            name,
            namespace,
            [{"op": "replace", "path": "/spec/template", "value": saved}],
            patch_type="json",
        )
