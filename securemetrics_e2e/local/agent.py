"""The pilot-agent's status port 15020: merged metrics and readiness.

What Istio's agent does (ISTIO-FACTS.md): ``/stats/prometheus`` (and ``/metrics``) merge
the application's metrics, Envoy's stats and the agent's own; with
METRICS_LOCALHOST_ACCESS_ONLY the port still binds every address, but the stats handler
answers any non-loopback caller 403 "Only requests from localhost are allowed".
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
    scrapes = Counter(
        "istio_agent_scrapes", "Merged-metrics scrapes served by the agent.", registry=registry
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
                try:
                    parts = [requests.get(envoy_stats, timeout=2).text]
                    if app_metrics is not None:
                        parts.append(requests.get(app_metrics, timeout=2).text)
                except requests.RequestException as exc:
                    # as the agent does when a source is down: fail the scrape, say why
                    self.send_text(503, f"error scraping metrics: {exc}\n")
                    return
                parts.append(generate_latest(registry).decode())
                body = "".join(p if p.endswith("\n") else p + "\n" for p in parts)
                self.send_text(200, body, "text/plain; version=0.0.4")
            else:
                self.send_text(404, "not found\n")

    return PodHTTPServer(pod, address, AGENT_PORT, Handler, "istio-agent")
