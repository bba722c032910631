"""The cluster backend's options, from pytest's command line or from code.

pytest-kind-ng already registers ``--cluster-name``, ``--keep-cluster``,
``--kubeconfig``, ``--kind-image``, ``--kind-bin`` and ``--kind-kubectl-bin``; they are
read, not registered again. :func:`add_cluster_options` adds the rest.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from securemetrics_e2e.errors import UsageError

MODES = ("kind", "existing")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_IMAGE_PART = re.compile(r"[A-Za-z0-9._/:@-]+")


@dataclass(frozen=True)
class ClusterOptions:
    """Everything that decides what the cluster backend does."""

    mode: str = "kind"  # "kind": create or reuse a kind cluster; "existing": a kubeconfig's
    istio_version: str | None = None  # None: the installed one if any, else the default
    kubeconfig: Path | None = None
    context: str | None = None
    keep_cluster: bool = False  # keep the kind cluster and what the run installed in it
    cluster_name: str | None = None  # kind; default: one per Istio minor
    kind_image: str | None = None  # kind; default: the pinned image for the Istio version
    kind_bin: Path | None = None
    kubectl_bin: Path | None = None
    istioctl_bin: Path | None = None
    hub: str | None = None  # istioctl install --set hub=...
    tag: str | None = None  # istioctl install --set tag=...
    revision: str | None = None  # istioctl install --set revision=...
    artifacts_dir: Path = Path("artifacts")
    plan_only: bool = False
    cache_dir: Path | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))
    rollout_timeout: float = 300.0

    def validated(self) -> ClusterOptions:
        """Check every value; raise :class:`UsageError` naming the option and the fix."""
        if self.mode not in MODES:
            raise UsageError(
                f"cluster mode {self.mode!r} is unknown; use one of {', '.join(MODES)}"
            )
        for option, value in (
            ("--istio-revision", self.revision),
            ("--cluster-name", self.cluster_name),
        ):
            if value is not None and (not _DNS_LABEL.fullmatch(value) or len(value) > 40):
                raise UsageError(
                    f"{option} {value!r} must be a DNS label (lower-case letters, digits, '-'; "
                    "at most 40 characters)"
                )
        for option, value in (
            ("--istio-hub", self.hub),
            ("--istio-tag", self.tag),
            ("--kind-image", self.kind_image),
        ):
            if value is not None and not _IMAGE_PART.fullmatch(value):
                raise UsageError(f"{option} {value!r} is not an image reference or tag")
        if not re.fullmatch(r"[a-z0-9]{1,12}", self.run_id):
            raise UsageError(f"run id {self.run_id!r} must be 1-12 lower-case letters or digits")
        if self.rollout_timeout <= 0:
            raise UsageError("--rollout-timeout must be positive (seconds)")
        return self

    def with_version(self, version: str) -> ClusterOptions:
        return replace(self, istio_version=version)


def add_cluster_options(group: Any) -> None:
    """Register the cluster backend's options on a pytest option group."""
    group.addoption(
        "--kube-context",
        default=None,
        help="existing cluster: the kubeconfig context to use (default: its current context)",
    )
    group.addoption(
        "--istioctl-bin",
        default=None,
        help="use this istioctl instead of a matching one on PATH or the pinned download",
    )
    group.addoption("--istio-hub", default=None, help="install Istio images from this hub")
    group.addoption("--istio-tag", default=None, help="install Istio images with this tag")
    group.addoption(
        "--istio-revision", default=None, help="install (or use) this Istio control-plane revision"
    )
    group.addoption(
        "--sm-artifacts",
        default="artifacts",
        help="directory for diagnostics captured on failure (default: ./artifacts)",
    )
    group.addoption(
        "--rollout-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for a scenario's workloads to roll out (default: 300)",
    )
    group.addoption(
        "--plan",
        action="store_true",
        default=False,
        help="print every command and manifest the cluster run would execute or apply, "
        "in order, and exit without touching anything",
    )


def options_from_pytest(config: Any, version: str | None) -> ClusterOptions:
    """ClusterOptions from pytest's options (ours and pytest-kind-ng's)."""

    def opt(name: str) -> Any:
        try:
            return config.getoption(name)
        except ValueError:  # an option whose plugin is not loaded
            return None

    def path(name: str) -> Path | None:
        value = opt(name)
        return Path(value) if value else None

    backend = opt("--sm-backend") or "kind"
    explicit_version = opt("--istio-version")
    return ClusterOptions(
        mode="existing" if backend == "existing" else "kind",
        # an existing cluster with Istio installed is run against as it is, unless a
        # version was asked for explicitly
        istio_version=explicit_version or (version if backend != "existing" else None),
        kubeconfig=path("--kubeconfig"),
        context=opt("--kube-context"),
        keep_cluster=bool(opt("--keep-cluster")),
        cluster_name=opt("--cluster-name") if opt("--cluster-name") != "pytest-kind" else None,
        kind_image=opt("--kind-image"),
        kind_bin=path("--kind-bin"),
        kubectl_bin=path("--kind-kubectl-bin"),
        istioctl_bin=path("--istioctl-bin"),
        hub=opt("--istio-hub"),
        tag=opt("--istio-tag"),
        revision=opt("--istio-revision"),
        artifacts_dir=Path(opt("--sm-artifacts") or "artifacts"),
        plan_only=bool(opt("--plan")),
        rollout_timeout=float(opt("--rollout-timeout") or 300.0),
    ).validated()
