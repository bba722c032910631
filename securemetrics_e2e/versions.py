"""Istio versions the suite supports, and what each one can do.

Support is decided per minor: a version is supported when its minor is in the table below,
so a patch newer than the table knows of (say 1.31.5 while the table says 1.31.1) is
accepted with the capabilities of its minor. A user who upgrades a patch expects the suite
to keep working, and Istio does not add or remove these features in patch releases.
Pre-releases of a supported minor (``1.31.0-rc.0``) are accepted too; they sort before the
release, so a feature that arrived "in 1.31.0" is not assumed present in its release
candidates.

Sources: istio.io release notes and ``data/compatibility/supportStatus.yml`` for patches
and Kubernetes ranges; ``sigs.k8s.io/gateway-api`` in each release's ``go.mod`` for the
Gateway API version; ``samples/addons/prometheus.yaml`` at each release tag for the image.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from packaging.version import Version

from securemetrics_e2e.errors import UsageError

_VERSION_RE = re.compile(
    r"v?(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)"
    r"(?:\.(?P<patch>0|[1-9]\d*)(?:-(?P<kind>alpha|beta|rc)\.(?P<num>0|[1-9]\d*))?)?"
)


class UnsupportedIstioVersion(UsageError):
    """An Istio version that is malformed or outside the supported minors."""

    def __init__(self, text: str, problem: str) -> None:
        supported = ", ".join(str(v) for v in supported_versions())
        super().__init__(
            f"Istio version {text!r} {problem}; supported versions: {supported} "
            "(any patch or pre-release of those minors is accepted, e.g. 1.31 or 1.31.0-rc.0)"
        )
        self.text = text


@functools.total_ordering
@dataclass(frozen=True)
class IstioVersion:
    """An Istio release version such as ``1.31.1`` or ``1.30.0-rc.0``.

    Ordered as :class:`packaging.version.Version` orders the same text, so
    pre-releases sort before their release (``1.31.0-rc.0 < 1.31.0``).
    """

    major: int
    minor: int
    patch: int
    pre: str | None = None  # "alpha.N", "beta.N" or "rc.N"

    def __post_init__(self) -> None:
        if min(self.major, self.minor, self.patch) < 0:
            raise UnsupportedIstioVersion(str(self), "has a negative component")
        if self.pre is not None and not re.fullmatch(r"(alpha|beta|rc)\.(0|[1-9]\d*)", self.pre):
            raise UnsupportedIstioVersion(
                str(self), "has a pre-release that is not alpha.N, beta.N or rc.N"
            )

    @classmethod
    def parse(cls, text: str) -> IstioVersion:
        """Parse ``X.Y.Z``, ``X.Y.Z-rc.N`` (or alpha/beta), or ``X.Y`` for its latest known patch.

        Any well-formed full version parses, supported or not (see :func:`resolve`);
        ``X.Y`` needs a minor in the table to pick the patch.
        """
        match = _VERSION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise UnsupportedIstioVersion(
                str(text), "is not a version like 1.31.1, 1.31 or 1.31.0-rc.0"
            )
        major, minor = int(match["major"]), int(match["minor"])
        if match["patch"] is None:
            release = _RELEASES.get((major, minor))
            if release is None:
                raise UnsupportedIstioVersion(
                    text, f"names minor {major}.{minor}, which is unknown"
                )
            return release.latest
        pre = f"{match['kind']}.{match['num']}" if match["kind"] else None
        return cls(major, minor, int(match["patch"]), pre)

    @property
    def minor_version(self) -> tuple[int, int]:
        return (self.major, self.minor)

    @property
    def is_prerelease(self) -> bool:
        return self.pre is not None

    def as_packaging(self) -> Version:
        return Version(str(self))

    def __str__(self) -> str:
        base = f"{self.major}.{self.minor}.{self.patch}"
        return f"{base}-{self.pre}" if self.pre else base

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, IstioVersion):
            return NotImplemented
        return self.as_packaging() < other.as_packaging()


@dataclass(frozen=True)
class KubernetesRange:
    """The Kubernetes minors an Istio minor is tested against, inclusive (``1.32``-``1.36``)."""

    oldest: str
    newest: str

    def minors(self) -> list[str]:
        first, last = Version(self.oldest), Version(self.newest)
        return [f"{first.major}.{m}" for m in range(first.minor, last.minor + 1)]

    def __contains__(self, kubernetes_version: object) -> bool:
        """Whether a Kubernetes version (``1.33`` or ``v1.33.2``) is in range, by minor."""
        if not isinstance(kubernetes_version, str):
            return False
        match = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?(?:[-+].*)?", kubernetes_version.strip())
        if match is None:
            return False
        minor = Version(f"{match[1]}.{match[2]}")
        return Version(self.oldest) <= minor <= Version(self.newest)

    def __str__(self) -> str:
        return f"{self.oldest}-{self.newest}"


@dataclass(frozen=True)
class _MinorRelease:
    latest: IstioVersion
    kubernetes: KubernetesRange
    gateway_api_version: str
    prometheus_image: str


def _release(
    latest: str, kubernetes: tuple[str, str], gateway_api: str, prometheus: str
) -> _MinorRelease:
    major, minor, patch = (int(p) for p in latest.split("."))
    return _MinorRelease(
        IstioVersion(major, minor, patch),
        KubernetesRange(*kubernetes),
        gateway_api,
        f"docker.io/prom/prometheus:{prometheus}",
    )


# Latest patches as of 2026-09 (ISTIO-FACTS.md). The 1.30 image is v3.10.0: that is what
# samples/addons/prometheus.yaml pins at the 1.30.0 and 1.30.3 tags (and still at
# 1.31.0-rc.0), so the 1.30 sample Prometheus is the same build the 1.31 one uses.
_RELEASES: dict[tuple[int, int], _MinorRelease] = {
    (1, 31): _release("1.31.1", ("1.32", "1.36"), "v1.6.0", "v3.10.0"),
    (1, 30): _release("1.30.5", ("1.32", "1.36"), "v1.5.1", "v3.10.0"),
    (1, 29): _release("1.29.8", ("1.31", "1.35"), "v1.4.1", "v3.8.1"),
    (1, 28): _release("1.28.10", ("1.30", "1.34"), "v1.4.1", "v3.5.0"),
}

# ENVOY_SECURE_METRICS_PORT / ENVOY_SECURE_MERGED_METRICS_PORT: istio/istio PR #60391.
NATIVE_SECURE_PORTS_SINCE = IstioVersion(1, 31, 0)
# METRICS_LOCALHOST_ACCESS_ONLY: istio/istio PR #50728.
LOCALHOST_ONLY_METRICS_SINCE = IstioVersion(1, 23, 0)


@dataclass(frozen=True)
class Capabilities:
    """What one Istio version offers the suite, and what it runs with."""

    version: IstioVersion
    native_secure_ports: bool
    localhost_only_metrics: bool
    kubernetes_range: KubernetesRange
    gateway_api_version: str  # the Gateway API CRD release to install, e.g. "v1.6.0"
    prometheus_image: str  # the image Istio's sample Prometheus of this minor pins


def supported_versions() -> list[IstioVersion]:
    """The latest known patch of each supported minor, oldest first."""
    return sorted(r.latest for r in _RELEASES.values())


DEFAULT_VERSION: IstioVersion = supported_versions()[-1]


def resolve(text: str) -> IstioVersion:
    """Parse ``text`` and insist that its minor is supported; raise UnsupportedIstioVersion."""
    version = IstioVersion.parse(text)
    if version.minor_version not in _RELEASES:
        raise UnsupportedIstioVersion(
            text, f"is in minor {version.major}.{version.minor}, which is not supported"
        )
    return version


def check_released(version: IstioVersion, *, custom_build: bool) -> None:
    """UsageError for a patch newer than any this table knows, unless it is a custom build.

    Such a patch is a typo (1.31.999) or a release after this table was written; the user
    says which: a custom build names its image tag (--tag / --istio-tag on a cluster).
    """
    release = _RELEASES.get(version.minor_version)
    if custom_build or release is None or version.is_prerelease or version <= release.latest:
        return
    raise UsageError(
        f"--istio-version {version}: the latest {version.major}.{version.minor} patch "
        f"this suite knows is {release.latest}; use a released version, or for a custom "
        "build on a cluster name its image with --tag (and --hub)"
    )


def capabilities(version: IstioVersion | str) -> Capabilities:
    """The capabilities of a supported version (text is resolved first)."""
    resolved = resolve(version) if isinstance(version, str) else version
    release = _RELEASES.get(resolved.minor_version)
    if release is None:
        raise UnsupportedIstioVersion(
            str(resolved), f"is in minor {resolved.major}.{resolved.minor}, which is not supported"
        )
    return Capabilities(
        version=resolved,
        native_secure_ports=resolved >= NATIVE_SECURE_PORTS_SINCE,
        localhost_only_metrics=resolved >= LOCALHOST_ONLY_METRICS_SINCE,
        kubernetes_range=release.kubernetes,
        gateway_api_version=release.gateway_api_version,
        prometheus_image=release.prometheus_image,
    )


#: istio.io in-place upgrades: "no more than one minor version less than the upgrade
#: version"; the canary page allows no more.
MAX_MINOR_STEP = 1


def upgrade_pair(from_text: str, to_text: str) -> tuple[IstioVersion, IstioVersion]:
    """Both versions resolved; an error naming both when Istio does not support the step."""
    old, new = resolve(from_text), resolve(to_text)
    gap = new.minor - old.minor if new.major == old.major else None
    if gap is None or gap < 1:
        raise UsageError(
            f"cannot upgrade Istio {old} to {new}: the upgrade scenario goes from an older "
            f"minor to a newer one (e.g. --upgrade-from {_previous(new)} for {new})"
        )
    if gap > MAX_MINOR_STEP:
        minors = [f"{old.major}.{m}" for m in range(old.minor + 1, new.minor + 1)]
        steps = " -> ".join([str(old), *minors])
        raise UsageError(
            f"cannot upgrade Istio {old} to {new} in one step: Istio supports in-place and "
            f"canary upgrades from the previous minor only (istio.io docs/setup/upgrade). "
            f"Upgrade one minor at a time: {steps}"
        )
    return old, new


def _previous(version: IstioVersion) -> str:
    try:
        return str(previous_minor(version))
    except UsageError:
        return "an older supported minor"


def previous_minor(version: IstioVersion) -> IstioVersion:
    """The latest known patch of the minor before ``version`` (the default upgrade start)."""
    older = [v for v in supported_versions() if v.minor == version.minor - 1]
    if not older:
        raise UsageError(
            f"no supported Istio minor precedes {version}; supported: "
            + ", ".join(str(v) for v in supported_versions())
        )
    return older[-1]
