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
from securemetrics_e2e.timeouts import CLUSTER
from securemetrics_e2e.timeouts import parse as parse_timeouts
from securemetrics_e2e.versions import DEFAULT_VERSION, IstioVersion, upgrade_pair

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
    rollout_timeout: float = CLUSTER.rollout  # the named timeout "rollout"
    #: an upgrade run: install this older Istio, then upgrade it to ``istio_version``
    upgrade_from: str | None = None
    canary: bool = False  # with upgrade_from: a canary revision instead of in place

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
        self._validate_upgrade()
        return self

    def _validate_upgrade(self) -> None:
        if self.upgrade_from is None:
            if self.canary:
                raise UsageError(
                    "--canary only chooses how an upgrade run upgrades: add --upgrade-from "
                    "(e.g. --upgrade-from 1.30 --canary) or drop --canary"
                )
            return
        pair = self.upgrade_versions()
        assert pair is not None
        old, new = pair
        # one value cannot serve both versions of an upgrade run
        for option, value, why in (
            (
                "--istio-revision",
                self.revision,
                "the upgrade run chooses the revisions itself (in place: none; with "
                f"--canary: one named after Istio {new})",
            ),
            (
                "--istio-tag",
                self.tag,
                f"an image tag names one version, and the run installs {old} then {new} "
                "(--istio-hub applies to both)",
            ),
            (
                "--istioctl-bin",
                self.istioctl_bin,
                f"it names one istioctl, and the run needs istioctl {old} and {new}: each "
                "is taken from PATH when its version matches, else downloaded and verified",
            ),
        ):
            if value is not None:
                raise UsageError(f"{option} cannot be combined with --upgrade-from: {why}")

    def upgrade_versions(self) -> tuple[IstioVersion, IstioVersion] | None:
        """(older, newer) for an upgrade run, checked against Istio's one-minor rule."""
        if self.upgrade_from is None:
            return None
        target = self.istio_version or str(DEFAULT_VERSION)
        return upgrade_pair(self.upgrade_from, target)

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
        default=None,
        help="seconds to wait for a scenario's workloads to roll out (default: "
        f"{CLUSTER.rollout:g}); the same as --timeout rollout=SECONDS, which wins",
    )
    group.addoption(
        "--canary",
        action="store_true",
        default=False,
        help="with --upgrade-from: upgrade by a canary revision instead of in place",
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
    upgrade_from = config.getoption("--upgrade-from", default=None)
    # an existing cluster with Istio installed is run against as it is, unless a version
    # was asked for explicitly; an upgrade run always ends on the version of the run
    use_given = backend != "existing" or upgrade_from is not None
    return ClusterOptions(
        mode="existing" if backend == "existing" else "kind",
        istio_version=explicit_version or (version if use_given else None),
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
        rollout_timeout=float(
            parse_timeouts(opt("--timeout") or ()).get("rollout")
            or opt("--rollout-timeout")
            or CLUSTER.rollout
        ),
        upgrade_from=upgrade_from,
        canary=bool(opt("--canary")),
    ).validated()
