"""A real Prometheus server running in the scraper pod."""

from __future__ import annotations

import shutil
from pathlib import Path

from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.local.netns import Pod
from securemetrics_e2e.local.process import ManagedProcess
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.timeouts import LOCAL

PROMETHEUS_PORT = 9090


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise EnvironmentProblem(
            "no `prometheus` on PATH: install the Debian package `prometheus` "
            "(apt-get install prometheus) or put any Prometheus 2.x/3.x binary on PATH"
        )
    return found


class PrometheusServer:
    def __init__(self, pod: Pod, workdir: Path, config_text: str) -> None:
        self.pod = pod
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(config_text)
        storage = workdir / "tsdb"
        storage.mkdir()
        self.url = f"http://{pod.ip}:{PROMETHEUS_PORT}"
        self.process = ManagedProcess(
            f"prometheus in pod {pod.name}",
            pod.command(
                [
                    prometheus_binary(),
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={storage}",
                    f"--web.listen-address={pod.ip}:{PROMETHEUS_PORT}",
                    # debug: Prometheus logs every failed scrape with its error ("Scrape
                    # failed"), while its targets API keeps only the last one; the
                    # diagnostics of a failed continuity window keep this log
                    "--log.level=debug",
                ]
            ),
            workdir / "prometheus.log",
            run_id=pod.run_id,
        )
        self.api = PrometheusAPI(self.url, runner=pod.call)

    def start(self, timeout: float = LOCAL.scraper_ready) -> None:
        self.process.start()
        try:
            self.api.wait_ready(timeout)
        except Exception as exc:
            code = self.process.exited()
            if code is not None:
                raise EnvironmentProblem(
                    f"Prometheus exited with {code}:\n{self.process.log_tail()}"
                ) from exc
            raise

    def stop(self) -> None:
        self.process.stop()
