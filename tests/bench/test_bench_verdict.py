"""The local verdict's time beside its floor, measured in the same run (`nox -s bench`).

Verdict: from starting `securemetrics-e2e run --backend local` to its verdict line.
Floor: what Prometheus 2.42 itself costs before any continuity window can close: a
bare Prometheus with one file_sd target, from its start to its first successful
scrape of that target (one discovery cycle: the discovery manager sends target
updates at most every 5 s, the scrape manager reloads at most every 5 s), plus the
scrapes the longest continuity window needs after its workload is first UP (rotation:
the first certificates' 4 s lifetime plus two intervals, ``continuity.run_rotation``).
The figure is the ratio.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.waiting import NotYet, wait_for
from tests.promproc import PrometheusProcess

INTERVAL_S = 1.0
#: the rotation window after its workload is UP: lifetime 4 s + MAX_GAP_INTERVALS (2)
WINDOW_SCRAPES = 6


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"up_probe 1\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def first_scrape_s(workdir: Path) -> float:
    """Seconds from a bare Prometheus' start to its first successful scrape of one
    file_sd target (the file written before it starts)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        sd = workdir / "targets.json"
        sd.write_text(f'[{{"targets": ["127.0.0.1:{server.server_address[1]}"]}}]')
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "floor", "file_sd_configs": [{"files": [str(sd)]}]}],
        }
        started = time.perf_counter()
        with PrometheusProcess(config, workdir) as prom:
            api = prom.api()

            def up() -> None:
                if not any(t.health == "up" for t in api.active_targets("floor")):
                    raise NotYet("no successful scrape yet")

            wait_for("the first successful scrape", up, timeout=60, interval=0.05)
            return time.perf_counter() - started
    finally:
        server.shutdown()
        server.server_close()


def verdict_s() -> tuple[float, str]:
    """Seconds from starting the local run to its verdict line, and that line."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "securemetrics_e2e", "run", "--backend", "local"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.stdout is not None
    line, took = "", 0.0
    for text in proc.stdout:
        if text.startswith("securemetrics-e2e verdict:"):
            took, line = time.perf_counter() - started, text.strip()
    proc.wait(timeout=120)
    assert line, "no verdict line"
    return took, line


def _measure(tmp_path: Path, marks: dict[str, float | str]) -> None:
    marks["first"] = first = first_scrape_s(tmp_path)
    marks["floor"] = first + WINDOW_SCRAPES * INTERVAL_S
    marks["verdict"], marks["line"] = verdict_s()


@pytest.mark.benchmark(group="local-verdict")
def test_bench_local_verdict_against_its_floor(benchmark: Any, tmp_path: Path) -> None:
    marks: dict[str, float | str] = {}
    benchmark.pedantic(_measure, args=(tmp_path, marks), rounds=1, iterations=1)
    first, floor, took = (float(marks[k]) for k in ("first", "floor", "verdict"))
    benchmark.extra_info.update(marks)
    print(f"\n{marks['line']}")
    print(
        f"local verdict {took:.1f}s; floor {floor:.1f}s (Prometheus first scrape "
        f"{first:.1f}s + {WINDOW_SCRAPES} scrapes of the rotation window); "
        f"ratio {took / floor:.2f}"
    )
    assert "CONFORMANT" in str(marks["line"])
