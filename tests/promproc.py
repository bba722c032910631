"""A real Prometheus process on loopback for tests, stopped by PID when done."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import yaml

from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

START_TIMEOUT = 30.0


def prometheus_binary() -> str:
    """The ``prometheus`` binary, or skip the calling test saying how to get it."""
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip(
            "no 'prometheus' binary on PATH: install it (Debian: apt-get install prometheus) "
            "to run the tests against a real Prometheus"
        )
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrometheusProcess:
    """``prometheus`` with ``config`` on 127.0.0.1:<free port>, storage under ``workdir``."""

    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.binary = prometheus_binary()
        self.workdir = workdir
        self.config_file = workdir / "prometheus.yml"
        self.log_file = workdir / "prometheus.log"
        self.config_file.write_text(yaml.safe_dump(config))
        self._proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, **kwargs: Any) -> PrometheusAPI:
        return PrometheusAPI(self.base_url, **kwargs)

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> Self:
        # The free port can be taken between probing and binding: retry on a new one.
        for _ in range(3):
            self.port = _free_port()
            self._start()
            try:
                self._wait_ready()
                return self
            except _Exited:
                self._stop()
                if "address already in use" not in self.log():
                    break
        raise RuntimeError(f"prometheus did not start; its log:\n{self.log()[-3000:]}")

    def _start(self) -> None:
        with self.log_file.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=info",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )

    def _wait_ready(self) -> None:
        api = self.api(timeout=1.0)

        def probe() -> None:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise _Exited(f"exited with {self._proc.returncode}")
            if not api.ready():
                raise NotYet(f"{api.base_url}/-/ready not 200 yet")

        try:
            wait_for("prometheus /-/ready", probe, timeout=START_TIMEOUT)
        except WaitTimeout as exc:
            self._stop()
            raise RuntimeError(f"{exc}; prometheus log:\n{self.log()[-3000:]}") from exc

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()


class _Exited(Exception):
    """Prometheus exited during startup (not retried by wait_for)."""
