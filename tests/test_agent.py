"""The emulated pilot-agent's merged metrics behave as Istio's agent does.

istio/istio ``pilot/cmd/pilot-agent/status/server.go`` (``handleStats``, ``scrape``): a
source that fails is logged and counted (``scrape_failures_total{type}``), never the
scrape's failure: the answer is 200 with the agent's own metrics first, then Envoy's, the
application's last; each source gets Prometheus' scrape timeout from its header. Real
servers on loopback addresses of their own stand in for Envoy's admin port and the app.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests

from securemetrics_e2e.catalog import ADMIN_PORT, AGENT_PORT
from securemetrics_e2e.local.agent import TIMEOUT_HEADER, start_agent
from securemetrics_e2e.local.httpserver import PodHTTPServer, QuietHandler
from securemetrics_e2e.local.netns import LoopbackNetwork, Pod

APP_PORT = 8080


@pytest.fixture
def pod() -> Pod:
    return LoopbackNetwork("agent").add_pod("httpbin")


def _serving(pod: Pod, port: int, status: int, body: str) -> PodHTTPServer:
    class Handler(QuietHandler):
        def do_GET(self) -> None:
            self.send_text(status, body)

    return PodHTTPServer(pod, pod.loopback, port, Handler, f"source on {port}")


@pytest.fixture
def agent(pod: Pod) -> Iterator[str]:
    server = start_agent(pod, pod.ip, app_port=APP_PORT, localhost_only=False)
    try:
        yield f"http://{pod.ip}:{AGENT_PORT}/stats/prometheus"
    finally:
        server.close()


def test_the_merge_is_agent_then_envoy_then_the_application(pod: Pod, agent: str) -> None:
    envoy = _serving(pod, ADMIN_PORT, 200, "envoy_up 1\n")
    app = _serving(pod, APP_PORT, 200, "app_up 1\n")
    try:
        answer = requests.get(agent, timeout=10)
    finally:
        envoy.close()
        app.close()
    assert answer.status_code == 200
    text = answer.text
    assert text.index("istio_agent_scrapes_total") < text.index("envoy_up 1")
    assert text.index("envoy_up 1") < text.index("app_up 1")
    assert "istio_agent_scrape_failures_total{" not in text  # no failure: no sample


def test_failed_sources_are_counted_and_the_scrape_still_answers_200(pod: Pod, agent: str) -> None:
    # nothing listens on Envoy's admin port; the application answers 500
    app = _serving(pod, APP_PORT, 500, "app_up 1\n")
    try:
        answer = requests.get(agent, timeout=10)
    finally:
        app.close()
    assert answer.status_code == 200
    assert 'istio_agent_scrape_failures_total{type="envoy"} 1.0' in answer.text
    assert 'istio_agent_scrape_failures_total{type="application"} 1.0' in answer.text
    assert "app_up" not in answer.text  # a non-200 source's body is not merged


def test_a_source_slower_than_the_scrape_timeout_is_a_failure_not_a_wait(
    pod: Pod, agent: str
) -> None:
    release = threading.Event()

    class Stuck(QuietHandler):
        def do_GET(self) -> None:
            release.wait(30)  # answers only when the test is done with it
            self.send_text(200, "app_up 1\n")

    envoy = _serving(pod, ADMIN_PORT, 200, "envoy_up 1\n")
    app = PodHTTPServer(pod, pod.loopback, APP_PORT, Stuck, "stuck app")
    try:
        answer = requests.get(agent, headers={TIMEOUT_HEADER: "0.2"}, timeout=10)
    finally:
        release.set()
        envoy.close()
        app.close()
    assert answer.status_code == 200
    assert "envoy_up 1" in answer.text
    assert 'istio_agent_scrape_failures_total{type="application"} 1.0' in answer.text
