"""What stood in for the mesh on the local backend: binaries, paths and versions.

A local report must say exactly which Envoy and which Prometheus judged (Istio's proxy is
an Envoy build of its own, and a cluster's Prometheus may be v3 where Debian ships 2.42),
so that nobody reads it as a run of a distribution.
"""

from __future__ import annotations

from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.local.envoy import envoy_binary
from securemetrics_e2e.local.process import binary_version
from securemetrics_e2e.local.promserver import prometheus_binary

#: describe() keys the report turns into its provenance components
COMPONENTS = ("envoy", "prometheus")


def stand_ins() -> dict[str, str]:
    """``{"envoy": path, "envoy_version": ..., "prometheus": ..., ...}`` as found now."""
    found: dict[str, str] = {}
    for name, locate in (("envoy", envoy_binary), ("prometheus", prometheus_binary)):
        try:
            path = locate()
        except EnvironmentProblem:
            continue  # a run without it never started; nothing stood in
        found[name] = path
        found[f"{name}_version"] = binary_version(path)
    return found
