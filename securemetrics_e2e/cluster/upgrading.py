"""The upgrade scenario's operation on a live cluster, a part of :class:`.backend.ClusterBackend`.

``upgrade`` runs the plan's upgrade and switch phases (:func:`.upgrade.upgrade_phase_steps`)
with the run's tools, moves the backend onto the new version (and the undo stack onto
its istioctl) and finds the workloads' new pods (:func:`.locate.relocate`).
"""

from __future__ import annotations

from securemetrics_e2e.backend import Deployment
from securemetrics_e2e.catalog import UPGRADE, Scenario, UnitKey, upgraded_spec
from securemetrics_e2e.cluster import istio
from securemetrics_e2e.cluster.kube import KubeAPI
from securemetrics_e2e.cluster.layout import ScraperPlan
from securemetrics_e2e.cluster.locate import Active, relocate
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.cluster.probing import Prober
from securemetrics_e2e.cluster.setup import (
    UNINSTALL_STEP,
    KindHandle,
    PhaseTimer,
    Runner,
    Undo,
    removes_istio,
)
from securemetrics_e2e.cluster.tools import ToolCache, istioctl_spec, resolve_tool
from securemetrics_e2e.cluster.upgrade import (
    UPGRADE_PHASES,
    canary_revision,
    run_upgrade,
    upgrade_phase_steps,
)
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.timeouts import Timeouts
from securemetrics_e2e.versions import Capabilities, IstioVersion, capabilities


class UpgradeOperations:
    """``upgrade_versions`` and ``upgrade`` over the state the backend holds."""

    options: ClusterOptions
    timeouts: Timeouts
    version: IstioVersion
    caps: Capabilities
    api: KubeAPI
    target: istio.KubeTarget
    kubectl: str
    istioctl: str | None
    cache: ToolCache
    istio_namespace: str
    trust_domain: str
    istio_installed_by_run: bool
    undo: Undo
    timer: PhaseTimer
    kind: KindHandle | None
    run: Runner
    scraper: ScraperPlan
    prober: Prober
    _upgrade: tuple[IstioVersion, IstioVersion] | None
    _upgrade_istioctl: str | None
    _active: dict[UnitKey, Active]

    def scope_reason(self, scenario: Scenario) -> str | None:
        raise NotImplementedError

    def upgrade_versions(self) -> tuple[IstioVersion, IstioVersion]:
        """(the version this run started on, the one it upgrades to)."""
        if self._upgrade is None:
            raise UsageError(self.scope_reason(UPGRADE) or "this is not an upgrade run")
        return self._upgrade

    def upgrade(self, deployment: Deployment) -> Deployment:
        """Upgrade Istio and move ``deployment`` (the upgrade scenario) onto it.

        Runs the ``upgrade`` phase (istioctl in place or by canary revision, then a
        restart of the workload, never of the scraper), moves this backend to the new
        version, runs the ``switch`` phase (native secure ports where the new version
        has them), and returns the deployment with its new pods and specs. The steps
        are the plan's (:func:`.upgrade.upgrade_phase_steps`), for the cluster as
        connected: this run's kubeconfig, context and Istio namespace.
        """
        old, new = self.upgrade_versions()
        key = deployment.unit.key
        active = self._active.get(key)
        if deployment.scenario.name != UPGRADE.name or active is None:
            raise UsageError(
                f"upgrade() moves the deployed {UPGRADE.name} scenario; "
                f"{deployment.unit.id} is not it "
                "(deploy it first)"
            )
        if self.version != old:
            raise SecureMetricsError(f"this run already upgraded Istio {old} to {self.version}")
        steps = upgrade_phase_steps(
            self.options,
            active.plan,
            self.target,
            scraper_namespace=self.scraper.namespace,
            istio_namespace=self.istio_namespace,
        )
        old_ctl = self.istioctl or str(resolve_tool(istioctl_spec(str(old)), self.cache).path)
        new_ctl = self._upgrade_istioctl or str(
            resolve_tool(istioctl_spec(str(new)), self.cache).path
        )
        tools = {f"istioctl-{old}": old_ctl, f"istioctl-{new}": new_ctl, "kubectl": self.kubectl}
        replaced = {w.pod_name for w in deployment.workloads}

        def execute(phase: str) -> None:
            run_upgrade(
                steps,
                self.api,
                tools=tools,
                run=self.run,
                rollout_timeout=self.timeouts.rollout,
                progress=self.timer.progress,
                phases=(phase,),
            )

        upgrade, switch = UPGRADE_PHASES
        with self.timer.phase(f"upgrade Istio {old} -> {new}"):
            if self.options.canary:
                self._undo_canary(new, new_ctl)
            execute(upgrade)
            self._now_on(new, new_ctl)
            execute(switch)
            self.prober.forget(deployment.namespace)  # its port-forwards led to the old pod
            specs = {
                w.name: upgraded_spec(w.spec, self.caps.native_secure_ports)
                for w in deployment.workloads
            }
            hint = (
                f" (is the default revision tag on {canary_revision(self.version)}?)"
                if self.options.canary
                else ""
            )
            workloads = tuple(
                relocate(
                    self.api,
                    active.plan,
                    specs,
                    replaced,
                    version=str(self.version),
                    trust_domain=self.trust_domain,
                    timeout=self.timeouts.rollout,
                    canary_hint=hint,
                )
            )
        upgraded = Deployment(
            deployment.scenario,
            deployment.mtls_mode,
            deployment.namespace,
            workloads,
            deployment.variant,
        )
        self._active[key] = Active(active.plan, upgraded)
        return upgraded

    def _now_on(self, version: IstioVersion, istioctl: str) -> None:
        """The control plane runs ``version`` now: so does everything judged from here."""
        self.version = version
        self.caps = capabilities(version)
        self.istioctl = istioctl
        if not (self.istio_installed_by_run and removes_istio(self.options, self.kind)):
            return  # a control plane the run found is upgraded and left so, never removed
        # what this run installed, removed revision by revision with the istioctl of what
        # runs now (never --purge: istio.uninstall_command)
        uninstall = istio.uninstall_command(istioctl, self.target, revision=None)
        self.undo.replace(UNINSTALL_STEP, lambda: self.run(uninstall))

    def _undo_canary(self, new: IstioVersion, istioctl: str) -> None:
        """Before the canary is installed: its revision and the default tag the run sets
        are the run's to remove (newest first: the tag, then the revision)."""
        if not (self.istio_installed_by_run and removes_istio(self.options, self.kind)):
            return
        rev = canary_revision(new)
        canary = istio.uninstall_command(istioctl, self.target, revision=rev)
        self.undo.push(f"{UNINSTALL_STEP} {rev}", lambda: self.run(canary))
        untag = istio.tag_remove_command(istioctl, self.target, "default")
        self.undo.push("istioctl tag remove default", lambda: self.run(untag))
