"""Whether a run unit can run on a backend at an Istio version, and why not.

One place for the rule, used by the check runner (to skip with the reason), the CLI's
``plan`` and ``list`` and the cluster plan: a run unit needs its scenario's features plus what its
mTLS mode and variant need (:attr:`RunUnit.features`); version-gated features come from
the Istio version, the others from the backend. An upgrade needs a supported minor
before the version to start from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from securemetrics_e2e.catalog import CLUSTER_ONLY, Feature, RunUnit

if TYPE_CHECKING:
    from securemetrics_e2e.backend import Backend

VERSION_GATED = frozenset({Feature.NATIVE_SECURE_PORTS, Feature.LOCALHOST_ONLY_METRICS})


def version_features(version: str) -> frozenset[Feature]:
    """The version-gated features Istio ``version`` has."""
    from securemetrics_e2e.versions import capabilities, resolve

    caps = capabilities(resolve(version))
    features = set()
    if caps.native_secure_ports:
        features.add(Feature.NATIVE_SECURE_PORTS)
    if caps.localhost_only_metrics:
        features.add(Feature.LOCALHOST_ONLY_METRICS)
    return frozenset(features)


def skip_reason(
    unit: RunUnit,
    *,
    backend: str,
    backend_features: frozenset[Feature],
    version: str,
) -> str | None:
    """Why the run unit cannot run, or None when it can."""
    needed = unit.features
    lacking_version = needed & VERSION_GATED - version_features(version)
    if lacking_version:
        names = ", ".join(sorted(f.value for f in lacking_version))
        return f"Istio {version} lacks {names} (needs Istio >= 1.31.0)"
    if Feature.MESH_UPGRADE in needed:
        from securemetrics_e2e.errors import UsageError
        from securemetrics_e2e.versions import previous_minor, resolve

        try:
            previous_minor(resolve(version))
        except UsageError as exc:
            return f"no upgrade to Istio {version}: {exc}"
    return lacking_reason(
        needed - VERSION_GATED, backend=backend, backend_features=backend_features
    )


def lacking_reason(
    needed: frozenset[Feature], *, backend: str, backend_features: frozenset[Feature]
) -> str | None:
    """Why ``backend`` cannot give what ``needed`` names (a run unit's or a check's
    features), or None when it can: the one wording of a missing backend feature."""
    lacking = needed - backend_features
    if not lacking:
        return None
    names = ", ".join(sorted(f.value for f in lacking))
    why = "cluster-only" if lacking <= CLUSTER_ONLY else "not available on this backend"
    return f"backend {backend} cannot provide {names} ({why})"


def unit_skip_reason(unit: RunUnit, backend: Backend, version: str) -> str | None:
    """Why ``unit`` cannot run on ``backend`` at ``version`` (this run's scope, then the
    rule above), or None when it can."""
    return backend.scope_reason(unit.scenario) or skip_reason(
        unit, backend=backend.name, backend_features=backend.features, version=version
    )
