"""The backend registry: every place the conformance suite can run, by name.

A new backend is one entry here: its name (``--backend`` / ``--sm-backend``), how pytest
creates it, the pytest options it adds, the features it declares for ``list`` (before
one is created), and the nox session that runs it. The plugin, the CLI and ``list`` read
this table; none of them names a backend.

What a backend can do is declared in one form: its :attr:`Backend.features`, with the
operations behind each continuity feature a Protocol (``CERT_ROTATION``:
:class:`~securemetrics_e2e.continuity.RotatingBackend` or
:class:`~securemetrics_e2e.checkbodies.AwaitsRenewals`; ``MESH_UPGRADE``:
:class:`~securemetrics_e2e.upgrade_window.UpgradingBackend`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securemetrics_e2e.catalog import Feature
from securemetrics_e2e.errors import UsageError

if TYPE_CHECKING:
    from securemetrics_e2e.backend import Backend


@dataclass(frozen=True)
class BackendEntry:
    name: str
    description: str
    #: (pytest config, Istio version) -> the backend; may raise a SecureMetricsError
    create: Callable[[Any, str], Backend]
    #: adds the backend's options to the plugin's pytest option group
    add_options: Callable[[Any], None]
    #: the features it declares, for ``list`` (local network mode -> features)
    features: Callable[[str], frozenset[Feature]]
    #: the nox session that runs the conformance suite on it
    nox_session: str
    #: the option that picks it among the backends of its nox session (None: the default)
    picked_by: str | None = None


def _local_options(group: Any) -> None:
    group.addoption(
        "--local-network",
        default="auto",
        choices=("auto", "netns", "loopback"),
        help="local backend pods: network namespaces, or 127.0.0.0/8 addresses (default: auto)",
    )
    group.addoption(
        "--local-fault",
        default=None,
        help="negative control: deploy the local mesh with this seeded misconfiguration "
        "(the run must then be NOT CONFORMANT); see securemetrics_e2e.local.faults",
    )


def _local(config: Any, version: str) -> Backend:
    from securemetrics_e2e.local.backend import LocalBackend
    from securemetrics_e2e.local.faults import Fault

    fault_name = config.getoption("--local-fault")
    try:
        fault = Fault(fault_name) if fault_name else None
    except ValueError:
        known = ", ".join(f.value for f in Fault)
        raise UsageError(f"unknown --local-fault {fault_name!r}; known faults: {known}") from None
    artifacts = config.getoption("--sm-artifacts", default=None) or "artifacts"
    return LocalBackend(
        network=config.getoption("--local-network"),
        istio_version=version,
        upgrade_from=config.getoption("--upgrade-from"),
        fault=fault,
        artifacts_dir=Path(artifacts),
    )


def _local_features(network: str) -> frozenset[Feature]:
    from securemetrics_e2e.local.backend import LocalBackend

    return LocalBackend(network=network).features


def _cluster(config: Any, version: str) -> Backend:
    from securemetrics_e2e.cluster.pytestglue import backend_from_pytest

    backend: Backend = backend_from_pytest(config, version)
    return backend


def _cluster_options(group: Any) -> None:
    from securemetrics_e2e.cluster.options import add_cluster_options

    add_cluster_options(group)


def _cluster_features(network: str) -> frozenset[Feature]:
    from securemetrics_e2e.cluster.features import CLUSTER_FEATURES

    return CLUSTER_FEATURES  # version-gated features are judged against each version


def _no_options(group: Any) -> None:
    """The cluster backends share one set of options, added once by ``kind``."""


BACKENDS: dict[str, BackendEntry] = {
    e.name: e
    for e in (
        BackendEntry(
            "local",
            "real Envoy and Prometheus on this machine, pods as network namespaces",
            _local,
            _local_options,
            _local_features,
            nox_session="conformance",
        ),
        BackendEntry(
            "kind",
            "a kind cluster the run creates, with Istio installed by istioctl",
            _cluster,
            _cluster_options,
            _cluster_features,
            nox_session="e2e",
        ),
        BackendEntry(
            "existing",
            "an existing cluster (--kubeconfig, --context)",
            _cluster,
            _no_options,
            _cluster_features,
            nox_session="e2e",
            picked_by="--kubeconfig",
        ),
    )
}
NAMES: tuple[str, ...] = tuple(BACKENDS)


def backend_entry(name: str) -> BackendEntry:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r}; known: {', '.join(NAMES)}") from None


def session_backend(session: str, args: Sequence[str]) -> str:
    """The backend the nox ``session`` runs given its arguments: the one of that session
    whose ``picked_by`` option ``args`` carry, else the one without ``picked_by``."""
    entries = [e for e in BACKENDS.values() if e.nox_session == session]
    if not entries:
        raise UsageError(f"no backend runs in the nox session {session!r}")
    for entry in entries:
        if entry.picked_by and any(
            a == entry.picked_by or a.startswith(f"{entry.picked_by}=") for a in args
        ):
            return entry.name
    return next(e.name for e in entries if e.picked_by is None)
