"""The application container standing for httpbin: HTTP plus its own Prometheus metrics."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, Counter, generate_latest

from securemetrics_e2e.catalog import APP_PORT
from securemetrics_e2e.local.httpserver import PodHTTPServer, QuietHandler
from securemetrics_e2e.local.netns import Pod


def start_app(pod: Pod, address: str, port: int = APP_PORT) -> PodHTTPServer:
    """Serve httpbin-like endpoints and ``/metrics`` in ``pod``."""
    registry = CollectorRegistry()
    requests_total = Counter(
        "httpbin_requests", "Requests served by the httpbin stand-in.", ["path"], registry=registry
    )

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            requests_total.labels(path=self.path.split("?")[0]).inc()
            if self.path == "/metrics":
                self.send_text(200, generate_latest(registry).decode(), "text/plain; version=0.0.4")
            elif self.path.startswith("/get"):
                body = {
                    "url": self.path,
                    "headers": dict(self.headers),
                    "origin": self.client_address[0],
                }
                self.send_text(200, json.dumps(body), "application/json")
            elif self.path.startswith("/status/") and self.path[8:].isdigit():
                self.send_text(int(self.path[8:]), "")
            else:
                self.send_text(404, "not found\n")

    return PodHTTPServer(pod, address, port, Handler, "httpbin")
