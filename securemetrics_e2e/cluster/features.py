"""What any cluster with Istio offers the scenarios, before version gating.

Its own module, beneath both the planning (:mod:`.layout`, which gates variants on it)
and the backend (:mod:`.backend`, which adds the version's features), so neither has to
import the other for it.
"""

from __future__ import annotations

from securemetrics_e2e.catalog import Feature

#: what any cluster with Istio offers, before version gating. Certificate rotation is not
#: driven on demand here (the suite cannot issue mesh certificates): the rotation
#: scenario's manifests give its workload and, by a saved-and-restored patch, the shared
#: scraper proxyMetadata SECRET_TTL (manifests.ROTATION_SECRET_TTL), and
#: :mod:`.rotation` waits for the agents' own renewals. tests/test_cluster_rotation.py
#: fails if those manifests stop setting it; ClusterBackend.run_rotation checks the
#: running istio-proxy containers for it before it waits. MESH_UPGRADE: istioctl
#: upgrades the control plane and a restart moves workloads onto the new proxies; which
#: run deploys the upgrade scenario is that run's scope (layout.run_scope_reason).
CLUSTER_FEATURES = frozenset(
    {
        Feature.POD_ISOLATION,
        Feature.INBOUND_CAPTURE,
        Feature.ISTIO_CONTROL_PLANE,
        Feature.PROMETHEUS_OPERATOR,
        Feature.CERT_ROTATION,
        Feature.MESH_UPGRADE,
    }
)
