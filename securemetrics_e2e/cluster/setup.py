"""Bringing a cluster to the point where scenarios can be deployed.

In order, each failing fast with a clear error and undoing what was done so far:
the Istio version; for kind, a container runtime that answers, then the tools and the
cluster (pytest-kind-ng's ``KindCluster``, created or reused); for an existing cluster,
its kubeconfig and API server; then Istio (detected, or installed with istioctl).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securemetrics_e2e.cluster import istio
from securemetrics_e2e.cluster.errors import DeployFailed, IstioConflict, NoContainerRuntime
from securemetrics_e2e.cluster.kube import KubeAPI
from securemetrics_e2e.cluster.options import ClusterOptions
from securemetrics_e2e.errors import EnvironmentProblem

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class PhaseTimer:
    """Named phases with their wall time, reported as each ends."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self.progress(f"[cluster] {name} ...")
        ok = False
        try:
            yield
            ok = True
        finally:
            elapsed = time.monotonic() - started
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            self.progress(f"[cluster] {name}: {'done' if ok else 'FAILED'} in {elapsed:.1f}s")

    def summary(self) -> str:
        total = sum(self.timings.values())
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
        return f"[cluster] phase timings: {parts}; total {total:.1f}s"


@dataclass
class Undo:
    """What setup and deploys did that must be reversed, newest first."""

    steps: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    def push(self, what: str, action: Callable[[], object]) -> None:
        self.steps.append((what, action))

    def replace(self, what: str, action: Callable[[], object]) -> bool:
        """Swap the action of the step named ``what`` in place (its turn is kept)."""
        for index, (name, _) in enumerate(self.steps):
            if name == what:
                self.steps[index] = (what, action)
                return True
        return False

    def run(self, progress: Progress) -> list[str]:
        errors = []
        while self.steps:
            what, action = self.steps.pop()
            try:
                action()
            except Exception as exc:  # keep undoing the rest
                errors.append(f"{what}: {type(exc).__name__}: {exc}")
                progress(f"[cluster] cleanup step failed: {what}: {exc}")
        return errors


def container_runtime() -> str:
    """The CLI kind uses: ``KIND_EXPERIMENTAL_PROVIDER`` (podman, nerdctl) or docker."""
    provider = os.environ.get("KIND_EXPERIMENTAL_PROVIDER", "docker").strip() or "docker"
    return provider if provider in ("podman", "nerdctl") else "docker"


def existing_cluster_hint(argv0: str | None = None) -> str:
    """How to name an existing cluster in the entry point this process was started by:
    the ``securemetrics-e2e`` CLI (console script or ``python -m securemetrics_e2e``) takes
    ``--backend existing``; pytest and ``nox -s e2e`` take ``--sm-backend existing``."""
    path = Path(argv0 if argv0 is not None else (sys.argv[0] if sys.argv else ""))
    cli = path.name == "securemetrics-e2e" or (
        path.name == "__main__.py" and path.parent.name == "securemetrics_e2e"
    )
    if cli:
        return "securemetrics-e2e run --backend existing --kubeconfig PATH"
    return "--sm-backend existing --kubeconfig PATH (nox -s e2e -- --kubeconfig PATH)"


def check_container_runtime(timeout: float = 4.0) -> str:
    """Raise :class:`NoContainerRuntime` unless kind's container runtime answers."""
    binary = container_runtime()
    alternative = f"or run against an existing cluster: {existing_cluster_hint()}"
    path = shutil.which(binary)
    if path is None:
        raise NoContainerRuntime(
            f"kind needs a container runtime, and `{binary}` is not on PATH. Install Docker "
            f"(https://docs.docker.com/engine/install/) or Podman with "
            f"KIND_EXPERIMENTAL_PROVIDER=podman, {alternative}"
        )
    try:
        done = subprocess.run(
            [path, "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise NoContainerRuntime(
            f"`{binary} info` did not answer within {timeout:g}s: is its daemon running? "
            f"Start it, {alternative}"
        ) from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise NoContainerRuntime(
            f"`{binary} info` failed ({detail[-1] if detail else f'exit {done.returncode}'}): "
            f"start the {binary} daemon and check that this user may use it, {alternative}"
        )
    return done.stdout.strip()


def run_command(
    argv: Sequence[str], *, timeout: float, what: str, progress: Progress | None = None
) -> str:
    """Run a tool; raise :class:`DeployFailed` with its output when it fails."""
    if progress is not None:
        progress(f"[cluster] $ {' '.join(argv)}")
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        raise DeployFailed(f"{what} did not finish within {timeout:g}s:\n{out[-2000:]}") from None
    except OSError as exc:
        raise EnvironmentProblem(f"cannot run {argv[0]} for {what}: {exc}") from None
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise DeployFailed(f"{what} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


@dataclass
class KindHandle:
    """A kind cluster from pytest-kind-ng, and whether this run created it."""

    cluster: Any  # pytest_kind.KindCluster
    name: str
    created: bool
    kubeconfig: Path
    kind_dir_created: bool

    def delete(self) -> None:
        self.cluster.delete()
        if self.kind_dir_created:
            # pytest-kind-ng keeps the kubeconfig in .pytest-kind/<name>/: remove what
            # this run created there, and the parent only if nothing else is in it
            shutil.rmtree(self.kubeconfig.parent, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.kubeconfig.parent.parent.rmdir()


def kind_cluster(
    name: str, image: str, kind_bin: Path, kubectl_bin: Path, *, timer: PhaseTimer
) -> KindHandle:
    """Create the kind cluster, or reuse one of that name."""
    from pytest_kind import KindCluster

    base = Path(".pytest-kind")
    dir_existed = (base / name).exists()
    try:
        listed = subprocess.run(
            [str(kind_bin), "get", "clusters"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"`kind get clusters` failed: {exc}") from None
    if listed.returncode != 0:
        raise EnvironmentProblem(
            f"`kind get clusters` failed: {(listed.stderr or listed.stdout).strip()[-500:]}"
        )
    exists = name in listed.stdout.split()
    cluster = KindCluster(name, image=image, kind_path=kind_bin, kubectl_path=kubectl_bin)
    handle = KindHandle(cluster, name, not exists, Path(cluster.kubeconfig_path), not dir_existed)
    timer.progress(f"[cluster] {'reusing' if exists else 'creating'} kind cluster {name} ({image})")
    try:
        cluster.create()
    except subprocess.CalledProcessError as exc:
        with contextlib.suppress(Exception):
            if not exists:
                handle.delete()
        raise EnvironmentProblem(
            f"`kind create cluster --name={name}` failed with exit {exc.returncode}; its output "
            "is above. Check the container runtime's resources (memory, inotify limits: "
            "https://kind.sigs.k8s.io/docs/user/known-issues/)"
        ) from None
    return handle


def resolve_istio(
    api: KubeAPI,
    requested: str | None,
    revision: str | None,
) -> istio.InstalledIstio | None:
    """The installed istiod the run uses (for ``revision``, else the one serving
    ``istio-injection=enabled``), after checking it is the requested version.

    None only when the cluster runs no istiod at all: a control plane that is there but
    not the one asked for is refused, never installed beside (ISTIO-FACTS.md "Existing
    clusters": a second control plane changes which istiod injects and signs).
    """
    installed = istio.detect_istio(api, revision)
    if installed is None:
        others = istio.installed_istiods(api)
        if not others:
            return None
        found = "; ".join(
            f"istiod image {i.image} in {i.namespace}, revision {i.revision or 'default'}"
            for i in others
        )
        wanted = f"revision {revision}" if revision else "a default revision (or tag)"
        revs = sorted({i.revision for i in others if i.revision})
        hint = f" (e.g. --istio-revision {revs[0]})" if revs else " (drop --istio-revision)"
        raise IstioConflict(
            f"the cluster runs Istio ({found}) but no istiod of {wanted}; the run uses an "
            f"installed control plane and never installs one beside it: pass the revision to "
            f"use{hint}, or use a cluster without Istio"
        )
    if requested and installed.version and installed.version != requested:
        where = installed.namespace + (
            f", revision {installed.revision}" if installed.revision else ""
        )
        raise IstioConflict(
            f"the cluster already runs Istio {installed.version} (istiod image "
            f"{installed.image} in {where}) "
            f"but --istio-version {requested} was asked for. Run without --istio-version to "
            "test the installed Istio, or use a cluster without Istio (the run never installs "
            "a control plane beside an installed one)"
        )
    return installed


#: runs one command of the run (istioctl, kubectl); raises when it fails
Runner = Callable[[Sequence[str]], object]
#: the Undo step that uninstalls what this run installed (replaced after an upgrade)
UNINSTALL_STEP = "istioctl uninstall"


def command_runner(progress: Progress | None, *, timeout: float = 900.0) -> Runner:
    """A :data:`Runner` that runs the command, shows it, and raises DeployFailed on failure."""

    def run(argv: Sequence[str]) -> object:
        what = " ".join([Path(argv[0]).name, *argv[1:2]])
        return run_command(argv, timeout=timeout, what=what, progress=progress)

    return run


def removes_istio(options: ClusterOptions, kind: KindHandle | None) -> bool:
    """Whether teardown uninstalls the revisions this run installed: not with
    --keep-cluster, and not on a kind cluster this run created (deleting the cluster
    removes them); on an existing or reused cluster, by revision only."""
    if options.keep_cluster:
        return False
    return not (kind is not None and kind.created)
