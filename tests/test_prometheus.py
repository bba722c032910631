"""PrometheusAPI against a real Prometheus process scraping loopback servers."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from securemetrics_e2e.errors import SecureMetricsError
from securemetrics_e2e.prometheus import (
    PrometheusAPI,
    PrometheusQueryError,
    PrometheusUnavailable,
    Target,
    TargetsNotUp,
    up_problem,
)
from securemetrics_e2e.waiting import NotYet, wait_for
from tests.promproc import PrometheusProcess
from tests.tlsservers import HTTPServer, closed_port

pytestmark = pytest.mark.needs_prometheus

T = TypeVar("T")

UP_JOB = "metrics-up"
DOWN_JOB = "metrics-down"
MIXED_JOB = "mixed"
DROPPED_JOB = "all-dropped"
EMPTY_JOB = "nothing-discovered"


@dataclass(frozen=True)
class Env:
    prom: PrometheusProcess
    api: PrometheusAPI
    up_url: str
    down_url: str
    up_address: str


def _file_sd(workdir: Path, name: str, addresses: list[str]) -> dict[str, Any]:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps([{"targets": addresses}] if addresses else []))
    return {"files": [str(path)]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("prometheus")
    with HTTPServer() as up, closed_port() as down_port:
        up_address = f"127.0.0.1:{up.port}"
        down_address = f"127.0.0.1:{down_port}"

        def job(name: str, addresses: list[str], **extra: Any) -> dict[str, Any]:
            return {
                "job_name": name,
                "metrics_path": "/stats/prometheus",
                "file_sd_configs": [_file_sd(workdir, name, addresses)],
                **extra,
            }

        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                job(UP_JOB, [up_address]),
                job(DOWN_JOB, [down_address]),
                job(MIXED_JOB, [up_address, down_address]),
                # Keeps only pods annotated for secure scraping, like the Istio sample;
                # the file_sd targets carry no such label, so all are dropped.
                job(
                    DROPPED_JOB,
                    [up_address],
                    relabel_configs=[
                        {
                            "source_labels": [
                                "__meta_kubernetes_pod_annotation_prometheus_istio_io_secure_port"
                            ],
                            "action": "keep",
                            "regex": ".+",
                        }
                    ],
                ),
                job(EMPTY_JOB, []),
            ],
        }
        with PrometheusProcess(config, workdir) as prom:
            yield Env(
                prom=prom,
                api=prom.api(),
                up_url=f"http://{up_address}/stats/prometheus",
                down_url=f"http://{down_address}/stats/prometheus",
                up_address=up_address,
            )


def test_ready_and_config(env: Env) -> None:
    assert env.api.ready()
    env.api.wait_ready(timeout=5)
    config = yaml.safe_load(env.api.config_yaml())
    assert [sc["job_name"] for sc in config["scrape_configs"]] == [
        UP_JOB,
        DOWN_JOB,
        MIXED_JOB,
        DROPPED_JOB,
        EMPTY_JOB,
    ]


def test_wait_targets_up_returns_the_up_target(env: Env) -> None:
    targets = env.api.wait_targets_up(UP_JOB, expected=1, urls=[env.up_url], timeout=20)
    assert len(targets) == 1
    target = targets[0]
    assert target.job == UP_JOB
    assert target.scrape_url == env.up_url
    assert target.health == "up"
    assert target.last_error == ""
    assert target.last_scrape is not None
    assert target.last_scrape.tzinfo is not None
    assert abs(datetime.now(UTC) - target.last_scrape) < timedelta(minutes=1)
    assert target.labels["job"] == UP_JOB
    assert target.labels["instance"] == env.up_address
    assert target.discovered_labels["__address__"] == env.up_address


def test_wait_scraped_sees_the_down_target_without_waiting_for_up(env: Env) -> None:
    targets = env.api.wait_scraped(DOWN_JOB, expected=1, timeout=20)
    assert [t.health for t in targets] == ["down"]
    assert "connection refused" in targets[0].last_error


def test_targets_not_up_lists_each_target_with_its_last_error(env: Env) -> None:
    env.api.wait_scraped(MIXED_JOB, expected=2, timeout=20)
    with pytest.raises(TargetsNotUp) as info:
        env.api.wait_targets_up(MIXED_JOB, expected=2, timeout=0.5)
    err = info.value
    assert isinstance(err, SecureMetricsError)
    message = str(err)
    assert f"Prometheus job {MIXED_JOB!r}: targets not UP after 0.5s" in message
    assert f"{env.down_url}: down, last error: " in message
    assert "connection refused" in message
    assert f"{env.up_url}: up" in message
    assert err.job == MIXED_JOB
    assert sorted(t.health for t in err.targets) == ["down", "up"]
    assert err.dropped == []


def test_urls_judges_only_the_named_targets(env: Env) -> None:
    # The DOWN sibling does not matter when the caller names the URL it needs.
    targets = env.api.wait_targets_up(MIXED_JOB, urls=[env.up_url], timeout=20)
    assert {t.scrape_url for t in targets} == {env.up_url, env.down_url}


def test_a_missing_url_is_named(env: Env) -> None:
    absent = "http://127.0.0.1:1/stats/prometheus"
    with pytest.raises(TargetsNotUp) as info:
        env.api.wait_targets_up(UP_JOB, urls=[env.up_url, absent], timeout=0.5)
    assert f"{absent}: not a target of this job" in str(info.value)


def test_wrong_expected_count_is_not_up(env: Env) -> None:
    env.api.wait_targets_up(UP_JOB, timeout=20)
    with pytest.raises(TargetsNotUp, match=r"expected 2 target\(s\)"):
        env.api.wait_targets_up(UP_JOB, expected=2, timeout=0.5)


def test_zero_targets_dropped_by_relabeling_says_so(env: Env) -> None:
    dropped = env.api.dropped_targets(DROPPED_JOB)
    assert [d["__address__"] for d in dropped] == [env.up_address]
    assert dropped[0]["job"] == DROPPED_JOB
    assert env.api.active_targets(DROPPED_JOB) == []
    with pytest.raises(TargetsNotUp) as info:
        env.api.wait_targets_up(DROPPED_JOB, timeout=0.5)
    message = str(info.value)
    assert f"Prometheus job {DROPPED_JOB!r} found ZERO targets" in message
    assert "istio#19874" in message
    assert "found 1 target(s) but relabeling dropped them all" in message
    assert f"__address__={env.up_address!r}" in message
    assert info.value.dropped == dropped
    assert info.value.targets == []


def test_zero_targets_nothing_discovered_says_so(env: Env) -> None:
    with pytest.raises(TargetsNotUp) as info:
        env.api.wait_targets_up(EMPTY_JOB, timeout=0.3)
    message = str(info.value)
    assert "found ZERO targets" in message
    assert "service discovery found nothing for it" in message
    assert info.value.dropped == []


def test_zero_targets_unknown_job_lists_the_configured_jobs(env: Env) -> None:
    with pytest.raises(TargetsNotUp) as info:
        env.api.wait_targets_up("no-such-job", timeout=0.3)
    message = str(info.value)
    assert "found ZERO targets" in message
    assert "no job of that name is configured" in message
    configured = ", ".join(sorted([UP_JOB, DOWN_JOB, MIXED_JOB, DROPPED_JOB, EMPTY_JOB]))
    assert f"configured jobs: {configured}" in message


def test_wait_scraped_times_out_on_zero_targets(env: Env) -> None:
    with pytest.raises(TargetsNotUp, match="found ZERO targets"):
        env.api.wait_scraped(EMPTY_JOB, timeout=0.3)


def test_active_targets_without_job_lists_every_job(env: Env) -> None:
    env.api.wait_scraped(MIXED_JOB, expected=2, timeout=20)
    jobs = sorted(t.job for t in env.api.active_targets())
    assert jobs == sorted([UP_JOB, DOWN_JOB, MIXED_JOB, MIXED_JOB])


def test_query_returns_the_up_series(env: Env) -> None:
    env.api.wait_targets_up(UP_JOB, expected=1, timeout=20)
    # `up` is written after each scrape; the first scrape may still be committing.
    result = _eventually(lambda: env.api.query(f'up{{job="{UP_JOB}"}}'))
    assert len(result) == 1
    assert result[0]["metric"]["instance"] == env.up_address
    assert result[0]["value"][1] == "1"
    scalar = env.api.query("1 + 1")
    assert scalar[0]["value"][1] == "2"


def test_query_range_returns_a_matrix(env: Env) -> None:
    env.api.wait_targets_up(UP_JOB, expected=1, timeout=20)
    _eventually(lambda: env.api.query(f'envoy_server_live{{job="{UP_JOB}"}}'))
    end = datetime.now(UTC)
    series = env.api.query_range(
        f'envoy_server_live{{job="{UP_JOB}"}}', end - timedelta(seconds=30), end, 1.0
    )
    assert len(series) == 1
    assert series[0]["metric"]["__name__"] == "envoy_server_live"
    assert series[0]["values"]
    assert all(value == "1" for _, value in series[0]["values"])


def test_bad_promql_names_the_query(env: Env) -> None:
    with pytest.raises(PrometheusQueryError) as info:
        env.api.query("up{")
    assert "'query': 'up{'" in str(info.value)
    assert "bad_data" in str(info.value)


def test_runner_executes_every_http_call(env: Env) -> None:
    threads: list[str] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns") as pool:

        def runner(call: Callable[[], T]) -> T:
            def wrapped() -> T:
                threads.append(threading.current_thread().name)
                return call()

            return pool.submit(wrapped).result()

        api = PrometheusAPI(env.prom.base_url, runner=runner)
        assert api.ready()
        targets = api.wait_targets_up(UP_JOB, expected=1, timeout=20)
    assert targets[0].health == "up"
    assert len(threads) >= 2
    assert all(name.startswith("netns") for name in threads)


def test_unreachable_prometheus_names_the_url() -> None:
    with closed_port() as port:
        api = PrometheusAPI(f"http://127.0.0.1:{port}", timeout=1)
        assert api.ready() is False
        with pytest.raises(PrometheusUnavailable, match=rf"http://127\.0\.0\.1:{port}/api/v1/"):
            api.active_targets()
        with pytest.raises(PrometheusUnavailable, match=rf"http://127\.0\.0\.1:{port} did not"):
            api.wait_ready(timeout=0.5)


def test_a_server_that_is_not_prometheus_is_named() -> None:
    with HTTPServer() as metrics:
        api = PrometheusAPI(f"http://127.0.0.1:{metrics.port}")
        with pytest.raises(PrometheusUnavailable, match="is not Prometheus API JSON"):
            api.active_targets()


def test_target_from_api_never_scraped() -> None:
    target = Target.from_api(
        {
            "scrapePool": "j",
            "scrapeUrl": "https://10.0.0.1:15092/stats/prometheus",
            "health": "unknown",
            "lastError": "",
            "lastScrape": "0001-01-01T00:00:00Z",
            "labels": {"job": "j"},
            "discoveredLabels": {"__address__": "10.0.0.1:15092"},
        }
    )
    assert target.last_scrape is None
    assert (
        target.describe() == "https://10.0.0.1:15092/stats/prometheus: unknown, never scraped yet"
    )
    scraped = Target.from_api({"lastScrape": "2026-01-17T15:07:44.723715405+01:00"})
    assert scraped.last_scrape == datetime(2026, 1, 17, 14, 7, 44, 723715, tzinfo=UTC)


def _eventually(fetch: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]]:
        result = fetch()
        if not result:
            raise NotYet("empty result")
        return result

    return wait_for("a non-empty query result", probe, timeout=10)


def test_up_problem_is_the_one_targets_up_rule() -> None:
    def target(url: str, health: str) -> Target:
        return Target("job", url, health, "", None)

    up, down = target("https://a:1/m", "up"), target("https://b:2/m", "down")
    assert up_problem([up]) is None
    assert up_problem([]) == "no targets"
    assert up_problem([up, down]) == "https://b:2/m: down, never scraped yet"
    assert up_problem([up, down], urls=[up.scrape_url]) is None
    assert up_problem([up], urls=["https://c:3/m"]) == "no target for https://c:3/m"
    assert up_problem([up], expected=2) == "1 targets, expected 2"
