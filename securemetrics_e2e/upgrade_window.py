"""Continuity across an Istio upgrade: verified before, verified after, never unscraped.

The failures users met across upgrades were targets that silently went away
(istio#19874) and scrapers that lost the certificates they were given (the 1.6 move to
SDS). The upgrade scenario deploys a workload with the configuration of the older minor
(the legacy workaround on 15091), verifies it, has the backend upgrade it (a cluster:
istioctl upgrade and a restart; the local backend: the pod replaced by one with the new
configuration), verifies the result, and measures from Prometheus that the workload's
namespace was never without a successful scrape by any of its pods.

Which backend does the upgrading is the backend's business (:class:`UpgradingBackend`);
what must hold before and after is decided here, with the suite's own checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from securemetrics_e2e.backend import Deployment
from securemetrics_e2e.continuity import Continuity, measure_namespace_continuity, wait_scraped
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.versions import IstioVersion


@runtime_checkable
class UpgradingBackend(Protocol):
    """What a backend offers to run the upgrade scenario."""

    name: str
    #: the scrape interval of the scraper's jobs, in seconds (continuity is judged in it)
    scrape_interval_s: float

    def upgrade_versions(self) -> tuple[IstioVersion, IstioVersion]:
        """The Istio version the scenario starts on and the one it upgrades to."""
        ...

    def upgrade(self, deployment: Deployment) -> Deployment:
        """Move ``deployment``'s workloads onto the newer version's proxies (switching to
        :func:`~securemetrics_e2e.catalog.upgraded_spec`) and return them, with the
        same namespace, once their proxies are ready."""
        ...

    def prometheus_for(self, deployment: Deployment) -> PrometheusAPI: ...


@dataclass(frozen=True)
class UpgradeRun:
    """What the upgrade scenario saw."""

    from_version: IstioVersion
    to_version: IstioVersion
    before: tuple[str, ...]  # problems found on the older version ("" = none)
    after: tuple[str, ...]  # problems found once upgraded
    continuity: Continuity | None  # None when the run stopped before upgrading
    switched: str = ""  # e.g. "legacy -> native", or "" when the configuration was kept
    upgrade_s: float = 0.0  # how long the backend took to upgrade (pods replaced)

    @property
    def ok(self) -> bool:
        return (
            not self.before
            and not self.after
            and self.continuity is not None
            and self.continuity.ok
        )

    def failure_message(self) -> str:
        parts = []
        if self.before:
            before = "; ".join(self.before)
            parts.append(f"before the upgrade (Istio {self.from_version}): {before}")
        if self.after:
            after = "; ".join(self.after)
            parts.append(f"after the upgrade to Istio {self.to_version}: {after}")
        if self.continuity is not None and not self.continuity.ok:
            parts.append(self.continuity.failure_message())
        return " | ".join(parts)


#: what must hold on the older version before the window opens, and on the newer after
#: scrapes of the new configuration the window includes after it is verified
SETTLE_SCRAPES = 3
BEFORE = ("mtls-scrape", "targets-up-merged", "targets-up-envoy")
AFTER = ("listeners-tls-only", "mtls-scrape", "targets-up-merged", "targets-up-envoy")


#: runs the named checks on a deployment and returns their problems ("" = none); the
#: checks module supplies it, so this module needs no import of the checks (no circle)
Verify = Callable[[Deployment, tuple[str, ...]], tuple[str, ...]]


def run_upgrade_window(
    backend: UpgradingBackend, deployment: Deployment, verify: Verify
) -> UpgradeRun:
    """Verify ``deployment``, upgrade it, verify again, and measure continuity between.

    The window opens once the older version is verified and closes once the newer one
    is; every job the workload had before is measured over all of it, a job only the
    new configuration has from its first sample.
    """
    names = sorted({w.name for w in deployment.workloads})
    if len(names) != 1:  # continuity is measured by the one workload's pod names
        raise UsageError(f"the upgrade scenario deploys one workload, not {names}")
    old, new = backend.upgrade_versions()
    api = backend.prometheus_for(deployment)
    before = verify(deployment, BEFORE)
    if before:
        return UpgradeRun(old, new, before, (), None)
    start = datetime.now(UTC)
    upgraded = backend.upgrade(deployment)
    upgrade_s = (datetime.now(UTC) - start).total_seconds()
    after = verify(upgraded, AFTER)
    # also when verification failed: the window then shows what the failure cost
    # so the new configuration is measured over more than its first scrape; a job
    # without a target for the new pods times out, leaving the loss in the window
    interval = backend.scrape_interval_s
    wait_scraped(
        api,
        upgraded.workloads,
        f"{SETTLE_SCRAPES} more scrapes of the upgraded pods",
        since=datetime.now(UTC) + timedelta(seconds=(SETTLE_SCRAPES - 1) * interval),
        up=False,
        timeout=(SETTLE_SCRAPES + 2) * interval,
    )
    end = datetime.now(UTC)
    jobs: dict[str, datetime | None] = {}
    for w in deployment.workloads:
        jobs.update(dict.fromkeys(w.spec.jobs, start))
    for w in upgraded.workloads:
        for job in w.spec.jobs:
            jobs.setdefault(job, None)
    continuity = measure_namespace_continuity(
        api, deployment.namespace, names[0], jobs, end, interval_s=backend.scrape_interval_s
    )
    modes = [
        f"{a.spec.mode} -> {b.spec.mode}"
        for a, b in zip(deployment.workloads, upgraded.workloads, strict=False)
        if a.spec.mode is not b.spec.mode
    ]
    return UpgradeRun(old, new, (), after, continuity, ", ".join(modes), upgrade_s)
