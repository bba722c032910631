"""Benchmark of the local backend's phases (run with `nox -s bench`; skipped in `nox -s tests`).

Phases of one cycle: Prometheus ready, Envoy ready after deploy, first UP of each job,
teardown, total. pytest-benchmark times whole cycles; the phase split of each round is
kept in ``extra_info`` and printed.
"""

from __future__ import annotations

import time
from functools import partial

import pytest

from securemetrics_e2e.catalog import ENVOY_JOB, MERGED_JOB, MtlsMode, scenario
from securemetrics_e2e.local.backend import LocalBackend


def _cycle(phases: list[dict[str, float]]) -> None:
    t0 = time.perf_counter()
    backend = LocalBackend()
    mark: dict[str, float] = {}
    try:
        dep = backend.deploy(scenario("native-sidecar"), MtlsMode.PERMISSIVE)
        mark["deployed (Prometheus + Envoy ready)"] = time.perf_counter() - t0
        api = backend.prometheus()
        w = dep.workloads[0]
        for job, port in ((MERGED_JOB, 15092), (ENVOY_JOB, 15091)):
            api.wait_targets_up(job, urls=[w.url(port, "/stats/prometheus")], timeout=30)
            mark[f"first UP {job}"] = time.perf_counter() - t0
        backend.teardown(dep)
    finally:
        backend.close()
    mark["total"] = time.perf_counter() - t0
    phases.append(mark)


@pytest.mark.benchmark(group="local-backend")
def test_bench_local_cycle(benchmark: pytest.FixtureRequest) -> None:
    phases: list[dict[str, float]] = []
    benchmark.pedantic(_cycle, args=(phases,), rounds=3, iterations=1)  # type: ignore[attr-defined]
    benchmark.extra_info["phases"] = phases  # type: ignore[attr-defined]
    for i, mark in enumerate(phases):
        print(f"round {i}: " + ", ".join(f"{k} {v:.2f}s" for k, v in mark.items()))
    assert all(m["total"] < 60 for m in phases)


def _upgrade_cycle(phases: list[dict[str, float]]) -> None:
    from securemetrics_e2e.checks import verify
    from securemetrics_e2e.upgrade_window import run_upgrade_window

    t0 = time.perf_counter()
    backend = LocalBackend()
    mark: dict[str, float] = {}
    try:
        dep = backend.deploy(scenario("upgrade"), MtlsMode.PERMISSIVE)
        mark["deployed"] = time.perf_counter() - t0
        run = run_upgrade_window(backend, dep, partial(verify, backend))
        mark["window (verify, upgrade, verify, 3 more scrapes, measure)"] = (
            time.perf_counter() - t0 - mark["deployed"]
        )
        assert run.ok, run.failure_message()
        mark["pod replaced (successor scraped UP, old retired)"] = run.upgrade_s
    finally:
        backend.close()
    mark["total"] = time.perf_counter() - t0
    phases.append(mark)


@pytest.mark.benchmark(group="local-backend")
def test_bench_local_upgrade(benchmark: pytest.FixtureRequest) -> None:
    phases: list[dict[str, float]] = []
    benchmark.pedantic(_upgrade_cycle, args=(phases,), rounds=3, iterations=1)  # type: ignore[attr-defined]
    benchmark.extra_info["phases"] = phases  # type: ignore[attr-defined]
    for i, mark in enumerate(phases):
        print(f"round {i}: " + ", ".join(f"{k} {v:.2f}s" for k, v in mark.items()))
    assert all(m["total"] < 90 for m in phases)
