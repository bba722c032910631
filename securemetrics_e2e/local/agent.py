"""The pilot-agent's status port 15020: merged metrics and readiness.

What Istio's agent does (ISTIO-FACTS.md): ``/stats/prometheus`` (and ``/metrics``) merge
the application's metrics, Envoy's stats and the agent's own; with
METRICS_LOCALHOST_ACCESS_ONLY the port still binds every address, but the stats handler
answers any non-loopback caller 403 "Only requests from localhost are allowed".

A source that fails (an error, or an answer other than 200) does not fail the scrape:
istio/istio ``pilot/cmd/pilot-agent/status/server.go`` (``handleStats``, ``scrape``) logs
it, counts it in ``scrape_failures_total{type="envoy"|"application"}`` and writes what it
has, 200, agent metrics first, Envoy's next, the application's last; each source gets the
scrape's own timeout (Prometheus' ``X-Prometheus-Scrape-Timeout-Seconds`` header). This
emulation answered 503 instead, which Istio never does: under load a slow source then
failed a scrape of the merged port that Istio would have served.
"""

from __future__ import annotations

import ipaddress

import requests
from prometheus_client import CollectorRegistry, Counter, generate_latest

from securemetrics_e2e.catalog import ADMIN_PORT, AGENT_PORT
from securemetrics_e2e.local.httpserver import PodHTTPServer, QuietHandler
from securemetrics_e2e.local.netns import Pod

FORBIDDEN_BODY = "Only requests from localhost are allowed"


def start_agent(
    pod: Pod, address: str, *, app_port: int | None, localhost_only: bool
) -> PodHTTPServer:
    """Serve the agent's status port in ``pod``."""
    registry = CollectorRegistry()
    # Istio's names (pilot-agent metrics.go), exported with the agent's istio_agent_ prefix
    scrapes = Counter("istio_agent_scrapes", "The total number of scrapes.", registry=registry)
    failures = Counter(
        "istio_agent_scrape_failures",
        "The total number of failed scrapes.",
        ["type"],
        registry=registry,
    )
    envoy_stats = f"http://{pod.loopback}:{ADMIN_PORT}/stats/prometheus"
    envoy_ready = f"http://{pod.loopback}:{ADMIN_PORT}/ready"
    app_metrics = None if app_port is None else f"http://{pod.loopback}:{app_port}/metrics"

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/healthz/ready":
                try:
                    ok = requests.get(envoy_ready, timeout=1).status_code == 200
                except requests.RequestException:
                    ok = False
                self.send_text(200 if ok else 503, "" if ok else "envoy not ready\n")
            elif path in ("/stats/prometheus", "/metrics"):
                if localhost_only and not ipaddress.ip_address(self.client_address[0]).is_loopback:
                    self.send_text(403, FORBIDDEN_BODY)
                    return
                scrapes.inc()
                timeout = _scrape_timeout(self.headers.get(TIMEOUT_HEADER))
                envoy = _source(envoy_stats, timeout)
                if envoy is None:
                    failures.labels("envoy").inc()
                app = None if app_metrics is None else _source(app_metrics, timeout)
                if app_metrics is not None and app is None:
                    failures.labels("application").inc()
                # the agent's own metrics first (after this scrape's counts), the app's last
                parts = [generate_latest(registry).decode(), envoy or "", app or ""]
                body = "".join(p if p.endswith("\n") else p + "\n" for p in parts if p)
                self.send_text(200, body, "text/plain; version=0.0.4")
            else:
                self.send_text(404, "not found\n")

    return PodHTTPServer(pod, address, AGENT_PORT, Handler, "istio-agent")


#: the header Prometheus sends with its scrape timeout (seconds), which the agent gives
#: each source it merges
TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
#: without the header (a hand-made request) the agent sets no deadline; ours, a bound
_NO_HEADER_TIMEOUT_S = 10.0


def _scrape_timeout(header: str | None) -> float:
    try:
        return float(header) if header else _NO_HEADER_TIMEOUT_S
    except ValueError:  # the agent logs a bad header and scrapes without a deadline
        return _NO_HEADER_TIMEOUT_S


def _source(url: str, timeout: float) -> str | None:
    """One source's metrics, or None when it failed (an error or another status than 200)."""
    try:
        answer = requests.get(url, timeout=timeout)
    except requests.RequestException:
        return None
    return answer.text if answer.status_code == 200 else None
