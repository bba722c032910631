"""The ServiceMonitor check, judged against a real Prometheus.

The Prometheus Operator names scrape pools ``serviceMonitor/<namespace>/<name>/<n>``;
here a real Prometheus has such pools for three namespaces: https and UP, plain http,
and https to a closed port. The backend is a stand-in that only hands out that
Prometheus (the check needs nothing else), so this proves the check's judgement, not
the operator.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Iterator
from typing import Any, cast

import pytest

from securemetrics_e2e.backend import Backend, Deployment
from securemetrics_e2e.catalog import MtlsMode, scenario
from securemetrics_e2e.checkbodies import _port_of
from securemetrics_e2e.checks import SERVICE_MONITOR_UP, CheckFailed
from securemetrics_e2e.pki import MeshCA
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.timeouts import Timeouts
from tests.promproc import PrometheusProcess, prometheus_binary
from tests.tlsservers import HTTPServer, closed_port


class _PrometheusOnly:
    """Stand-in for a backend at the seam: the check only asks for its Prometheus."""

    name = "stand-in"
    timeouts = Timeouts(target_up=3.0)

    def __init__(self, api: PrometheusAPI) -> None:
        self._api = api

    def prometheus_for(self, deployment: Deployment) -> PrometheusAPI:
        return self._api


def _job(namespace: str, scheme: str, *targets: str) -> dict[str, Any]:
    return {
        "job_name": f"serviceMonitor/{namespace}/httpbin-app/0",
        "scheme": scheme,
        "tls_config": {"insecure_skip_verify": True},
        "static_configs": [{"targets": list(targets)}],
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusAPI]:
    try:
        prometheus_binary()
    except Exception as exc:
        pytest.skip(str(exc))
    tmp = tmp_path_factory.mktemp("sm")
    certs = MeshCA.create().issue("ns-up", "httpbin").write_output_certs(tmp / "certs")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(certs.cert_chain, certs.key)
    with (
        HTTPServer(tls=tls) as https,
        HTTPServer() as plain,
        HTTPServer() as plain2,
        closed_port() as closed,
    ):
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                _job("ns-up", "https", f"127.0.0.1:{https.port}"),
                _job("ns-plain", "http", f"127.0.0.1:{plain.port}", f"127.0.0.1:{plain2.port}"),
                _job("ns-down", "https", f"127.0.0.1:{closed}"),
                # one UP, one DOWN: only the DOWN one is named
                _job("ns-mixed", "https", f"127.0.0.1:{https.port}", f"127.0.0.1:{closed}"),
            ],
        }
        (tmp / "prom").mkdir()
        with PrometheusProcess(config, tmp / "prom") as prom:
            api = prom.api()
            # past Prometheus' first discovery cycle, so each test judges scraped targets
            for job in config["scrape_configs"]:
                api.wait_scraped(job["job_name"], timeout=20)
            yield api


def _run(api: PrometheusAPI, namespace: str) -> None:
    dep = Deployment(scenario("servicemonitor"), MtlsMode.PERMISSIVE, namespace, ())
    SERVICE_MONITOR_UP.run(cast(Backend, _PrometheusOnly(api)), dep)


def test_https_targets_up_pass(api: PrometheusAPI) -> None:
    _run(api, "ns-up")


def test_plaintext_servicemonitor_fails(api: PrometheusAPI) -> None:
    with pytest.raises(CheckFailed) as bad:
        _run(api, "ns-plain")
    plain = r"http://127\.0\.0\.1:\d+/metrics"
    without_hint = bad.value.message.split(" \u2014 hint: ")[0]
    assert re.fullmatch(
        f"ServiceMonitor targets scraped without TLS: {plain}, {plain}", without_hint
    )
    assert bad.value.observed == ("target:plaintext",)


def test_down_target_fails_naming_it(api: PrometheusAPI) -> None:
    with pytest.raises(CheckFailed, match=r"SMC012.*https://127\.0\.0\.1:\d+/metrics: down") as bad:
        _run(api, "ns-down")
    # the known-gap table tells one port's gap from another's by this token
    ((token,),) = [bad.value.observed]
    assert re.fullmatch(r"down:\d+", token), token


def test_namespace_without_servicemonitors_fails(api: PrometheusAPI) -> None:
    with pytest.raises(CheckFailed) as bad:
        _run(api, "ns-none")
    assert bad.value.message.split(" \u2014 hint: ")[0] == (
        "timed out after 3s waiting for the ServiceMonitors of ns-none to scrape UP; last "
        "seen: NotYet: no scrape pool serviceMonitor/ns-none/* or podMonitor/ns-none/* yet"
    )
    assert bad.value.observed == ("target:timeout",)


def test_an_up_target_beside_a_down_one_is_not_named_down(api: PrometheusAPI) -> None:
    with pytest.raises(CheckFailed, match=r"https://127\.0\.0\.1:\d+/metrics: down") as bad:
        _run(api, "ns-mixed")
    ((token,),) = [bad.value.observed]  # the DOWN target's port only
    assert re.fullmatch(r"down:\d+", token), token


@pytest.mark.parametrize(
    ("url", "port"),
    [
        ("https://10.244.0.7:15091/stats/prometheus", "15091"),
        ("https://[fd00::7]:15020/metrics", "15020"),
        ("http://10.244.0.7:8080", "8080"),
        ("10.244.0.7:15092", "15092"),
        ("https://10.244.0.7:15091/a:b/c", "15091"),
        ("https://10.244.0.7:15091/stats?next=http://x:1/", "15091"),
    ],
)
def test_the_port_a_down_token_names_is_read_from_the_scrape_url(url: str, port: str) -> None:
    # `down:<port>` tells a known gap about one port from another (the known-gap table)
    assert _port_of(url) == port
