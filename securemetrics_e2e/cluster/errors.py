"""Errors of the cluster backend. Each names the input at fault and what to do about it."""

from __future__ import annotations

from pathlib import Path

from securemetrics_e2e.errors import EnvironmentProblem, SecureMetricsError, UsageError


class DownloadFailed(EnvironmentProblem):
    """A tool or manifest could not be downloaded (network, HTTP status, bad checksum file)."""


class ChecksumMismatch(EnvironmentProblem):
    """A download's sha256 differs from the published (or pinned) one. Nothing was kept."""

    def __init__(
        self,
        *,
        what: str,
        version: str,
        url: str,
        expected: str,
        actual: str,
        source: str,
        hint: str,
    ) -> None:
        super().__init__(
            f"checksum mismatch for {what} {version} downloaded from {url}: expected sha256 "
            f"{expected} ({source}), got {actual}. The file was discarded. {hint}"
        )
        self.url = url
        self.expected = expected
        self.actual = actual


class NoContainerRuntime(EnvironmentProblem):
    """kind needs Docker (or Podman) and none answers."""


class KubeconfigInvalid(UsageError):
    """The kubeconfig file is missing, does not parse, or lacks the chosen context."""


class ClusterUnreachable(EnvironmentProblem):
    """The Kubernetes API server named by the kubeconfig does not answer."""


class IstioConflict(UsageError):
    """The cluster runs an Istio other than the one asked for."""


class DeployFailed(SecureMetricsError):
    """Workloads did not become ready; the message carries pod state and events.

    ``artifacts`` is the directory holding the diagnostics captured before teardown.
    """

    def __init__(self, message: str, artifacts: Path | None = None) -> None:
        if artifacts is not None:
            message = f"{message}\ndiagnostics: {artifacts}"
        super().__init__(message)
        self.artifacts = artifacts


class KubeAPIError(SecureMetricsError):
    """The Kubernetes API refused a request (other than 'not found')."""

    def __init__(self, action: str, status: int, reason: str) -> None:
        super().__init__(f"Kubernetes API refused to {action}: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason
