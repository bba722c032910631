"""Certificate rotation on a cluster, without one: the manifests that shorten the lifetime
(real charts), the pure timing functions, and the driver's control flow on a FAKE
Kubernetes API (tests/fakekube.py). The fake answers execs in the scraper pod with real
certificates from a real mesh CA, and its API-server service proxy is a loopback HTTP
server answering the Prometheus API paths the driver reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
import yaml

from securemetrics_e2e.backend import Backend, Deployment, Workload
from securemetrics_e2e.catalog import (
    ENVOY_JOB,
    MERGED_JOB,
    SCENARIOS,
    Feature,
    MtlsMode,
    scenario,
)
from securemetrics_e2e.checks import ROTATION_CONTINUITY, CheckFailed
from securemetrics_e2e.cluster.features import CLUSTER_FEATURES
from securemetrics_e2e.cluster.kube import ExecResult
from securemetrics_e2e.cluster.layout import scraper_namespace, variant_plan
from securemetrics_e2e.cluster.rotation import (
    CERT_CHAIN,
    ClusterRotation,
    RotationFailed,
    Timing,
    parse_go_duration,
    renewal_interval,
)
from securemetrics_e2e.continuity import Continuity
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.manifests import (
    ROTATION_SECRET_TTL,
    proxy_metadata_of,
    scenario_manifests,
    scraper_manifests,
)
from securemetrics_e2e.pki import MeshCA, WorkloadIdentity
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.rotation import RotationRun
from securemetrics_e2e.spiffe import SpiffeId
from securemetrics_e2e.versions import resolve
from tests.fakekube import FakeKube, PrometheusProxy, serving

RUN = "r0t8"
NS = f"sm-rotation-permissive-{RUN}"
SCRAPER_NS = scraper_namespace(RUN)
ROTATION = scenario("rotation")

# -- manifests -----------------------------------------------------------------------------


def test_rotation_workload_and_scraper_get_the_short_ttl() -> None:
    assert Feature.CERT_ROTATION in CLUSTER_FEATURES
    plan = variant_plan(ROTATION, MtlsMode.PERMISSIVE, resolve("1.31.1"), RUN)
    assert plan.skip is None
    assert plan.solo
    (dep,) = [m for m in plan.manifests if m["kind"] == "Deployment"]
    metadata = proxy_metadata_of(dep)
    assert metadata["SECRET_TTL"] == ROTATION_SECRET_TTL == "240s"
    assert metadata["ENVOY_SECURE_MERGED_METRICS_PORT"] == "15092"  # chart's values kept
    (patch,) = plan.patches
    assert (patch.kind, patch.name, patch.namespace) == ("Deployment", "prometheus", SCRAPER_NS)
    annotation = patch.body["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"]
    config = yaml.safe_load(annotation)
    assert config["proxyMetadata"] == {"OUTPUT_CERTS": "/etc/istio-certs", "SECRET_TTL": "240s"}
    assert config["holdApplicationUntilProxyStarts"] is True
    assert ("Deployment", "prometheus", SCRAPER_NS) in [
        (r.kind, r.name, r.namespace) for r in plan.rollouts
    ]


def test_other_scenarios_and_the_plain_scraper_keep_istios_default_ttl() -> None:
    for sc in SCENARIOS:
        if sc is ROTATION:
            continue
        for obj in scenario_manifests(sc, sc.mtls_modes[0], "1.31.1", namespace="x"):
            if obj["kind"] == "Deployment":
                assert "SECRET_TTL" not in proxy_metadata_of(obj), sc.name
    (dep,) = [o for o in scraper_manifests(namespace="s") if o["kind"] == "Deployment"]
    assert "SECRET_TTL" not in proxy_metadata_of(dep)


def test_rotation_runs_alone() -> None:
    version = resolve("1.31.1")
    rotation = variant_plan(ROTATION, MtlsMode.PERMISSIVE, version, RUN)
    other = variant_plan(scenario("native-sidecar"), MtlsMode.STRICT, version, RUN)
    assert not other.solo
    for a, b in ((rotation, other), (other, rotation)):
        assert (
            a.conflicts(b)
            == "the shared scraper Prometheus (restarted with short-lived certificates)"
        )
    legacy = variant_plan(scenario("legacy-sidecar"), MtlsMode.STRICT, version, RUN)
    assert other.conflicts(legacy) is None


# -- pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("240s", 240), ("4m", 240), ("1h30m", 5400), ("1.5m", 90), ("500ms", 0.5)]
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "4", "4 m", "m4", "4d", "-4m"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(UsageError, match="is not a Go duration"):
        parse_go_duration(text)


def test_timing_follows_the_ttl() -> None:
    assert renewal_interval(timedelta(minutes=4)) == timedelta(seconds=122.4)
    timing = Timing.for_ttl(timedelta(minutes=4))
    assert timing.rotation_timeout == pytest.approx(122.4 + 30 + 30)
    with pytest.raises(UsageError, match="shorter than eight scrape intervals"):
        Timing.for_ttl(timedelta(seconds=90))


# -- the driver on the fake API ------------------------------------------------------------


class Mesh:
    """What the agents would hold: the current workload and scraper certificates."""

    def __init__(self) -> None:
        self.ca = MeshCA.create()
        self.workload = self.ca.issue(NS, "httpbin", lifetime=timedelta(minutes=4))
        self.scraper = self.ca.issue(SCRAPER_NS, "prometheus", lifetime=timedelta(minutes=4))

    def renew(self) -> None:
        self.workload = self.ca.rotate(self.workload)
        self.scraper = self.ca.rotate(self.scraper)


class RotatingKube(FakeKube):
    """FakeKube whose scraper pod answers ``cat`` and ``curl`` from :class:`Mesh`, renewing
    both certificates every ``renew_every`` reads of cert-chain.pem (0: never)."""

    def __init__(self, mesh: Mesh, renew_every: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.mesh = mesh
        self.renew_every = renew_every
        self.reads = 0
        self.curls: list[int] = []  # the scraper serial each curl presented

    def exec(
        self, namespace: str, pod: str, container: str, command: Sequence[str], *, timeout: float
    ) -> ExecResult:
        self.calls.append(("exec", pod, container, " ".join(command)))
        if command[:2] == ["cat", CERT_CHAIN]:
            self.reads += 1
            if self.renew_every and self.reads % self.renew_every == 0:
                self.mesh.renew()
            return ExecResult(self.mesh.scraper.cert_chain_pem().decode(), "", 0)
        if command[:2] == ["cat", "/etc/istio-certs/root-cert.pem"]:
            return ExecResult(self.mesh.scraper.root_pem().decode(), "", 0)
        if command[0] == "curl":
            self.curls.append(self.mesh.scraper.serial)
            marker = command[command.index("-w") + 1].split("%", 1)[0].lstrip("\n")
            body = "# TYPE envoy_up gauge\nenvoy_up 1\n"
            chain = self.mesh.workload.cert_chain_pem().decode()
            return ExecResult(f"{body}\n{marker}200\n{chain}", "", 0)
        return ExecResult("", f"fake: no answer for {command[0]}", 126)


class _Prometheus(PrometheusProxy):
    """The API server's service proxy to Prometheus: every job scraped the pod UP just now."""

    def data(self, path: str) -> Any:
        now = datetime.now(UTC)
        if "/api/v1/targets" in path:
            targets = [
                {
                    "scrapePool": job,
                    "scrapeUrl": f"https://10.244.0.9:{port}/stats/prometheus",
                    "health": "up",
                    "lastError": "",
                    "lastScrape": now.isoformat(),
                    "labels": {"pod": "httpbin-1", "namespace": NS},
                }
                for job, port in ((MERGED_JOB, 15092), (ENVOY_JOB, 15091))
            ]
            data: Any = {"activeTargets": targets, "droppedTargets": []}
        else:
            start = now.timestamp() - 20  # a sample every 10 ms: the test's window is short
            values = [[start + i * 0.01, "1"] for i in range(2001)]
            data = {"resultType": "matrix", "result": [{"metric": {}, "values": values}]}
        return data


@pytest.fixture
def proxy() -> Iterator[str]:
    with serving(_Prometheus) as base:
        yield base


def _pod(name: str, namespace: str, labels: dict[str, str], ttl: str | None) -> dict[str, Any]:
    env = [{"name": "SECRET_TTL", "value": ttl}] if ttl else []
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "istio-proxy", "env": env}]},
        "status": {"phase": "Running", "podIP": "10.244.0.9"},
    }


def _setup(
    proxy: str, renew_every: int, ttl: str | None = "240s"
) -> tuple[RotatingKube, Mesh, ClusterRotation, Workload]:
    mesh = Mesh()
    fake = RotatingKube(mesh, renew_every, proxy_base=proxy)
    fake.add(_pod("httpbin-1", NS, {"app": "httpbin"}, ttl))
    fake.add(_pod("prometheus-1", SCRAPER_NS, {"app.kubernetes.io/name": "prometheus"}, "240s"))
    driver = ClusterRotation(
        fake,
        scraper_namespace=SCRAPER_NS,
        scraper_pod=lambda: "prometheus-1",
        prometheus=lambda: PrometheusAPI(fake.service_proxy_url(SCRAPER_NS, "prometheus", 9090)),
        timing=Timing(
            rotation_timeout=1.5, settle_timeout=3, scrape_interval_s=1.0, poll_interval=0.02
        ),
    )
    workload = Workload(
        ROTATION.workloads[0],
        NS,
        "httpbin-1",
        "10.244.0.9",
        SpiffeId.parse(f"spiffe://cluster.local/ns/{NS}/sa/httpbin"),
    )
    return fake, mesh, driver, workload


def test_two_rotations_each_served_to_a_fresh_handshake(proxy: str) -> None:
    fake, mesh, driver, workload = _setup(proxy, renew_every=3)
    first: WorkloadIdentity = mesh.workload
    run = driver.run(workload)
    assert run.ok, run.failure_message()
    assert [s.index for s in run.steps] == [1, 2]
    serials = [s.workload_serial for s in run.steps]
    assert len(set([first.serial, *serials])) == 3  # a new certificate each time
    assert [s.probe_serial for s in run.steps] == serials
    assert run.steps[-1].workload_serial == mesh.workload.serial
    assert run.steps[-1].scraper_serial == mesh.scraper.serial
    # the handshake that proved the last renewal presented the renewed scraper files
    assert fake.curls[-1] == mesh.scraper.serial
    assert {j.job for j in run.continuity.jobs} == {MERGED_JOB, ENVOY_JOB}
    assert run.continuity.ok


def test_the_handshake_is_bounded_by_the_named_scrape_request_timeout(proxy: str) -> None:
    fake, _, driver, workload = _setup(proxy, renew_every=3)
    driver.timing = dataclasses.replace(driver.timing, scrape_request=7)
    assert driver.run(workload).ok
    curls = [c[3] for c in fake.calls if c[0] == "exec" and c[3].startswith("curl")]
    assert curls
    assert all("--max-time 7 " in c for c in curls)
    # what the cluster backend builds from `--timeout scrape-request=...`
    assert Timing.for_ttl(timedelta(minutes=4), scrape_request=9).scrape_request == 9


def test_a_serial_that_never_changes_fails_with_a_clear_message(proxy: str) -> None:
    _, mesh, driver, workload = _setup(proxy, renew_every=0)
    run = driver.run(workload)  # bounded by rotation_timeout (its message below), not a TTL
    assert not run.ok
    (step,) = run.steps
    assert f"the scraper's {CERT_CHAIN} to change from serial {mesh.scraper.serial:x}" in (
        step.problem
    )
    assert "timed out after 1.5s" in step.problem
    assert "rotation 1:" in run.failure_message()


def test_a_proxy_without_the_ttl_is_refused_before_waiting(proxy: str) -> None:
    fake, _, driver, workload = _setup(proxy, renew_every=3, ttl=None)
    with pytest.raises(
        RotationFailed, match=f"the istio-proxy of {NS}/httpbin-1 has no SECRET_TTL"
    ):
        driver.run(workload)
    assert not [c for c in fake.calls if c[0] == "exec"]


def test_fewer_than_two_rotations_are_refused(proxy: str) -> None:
    fake, _, driver, _ = _setup(proxy, renew_every=3)
    with pytest.raises(UsageError, match="rotations must be at least 2"):
        ClusterRotation(
            fake,
            scraper_namespace=SCRAPER_NS,
            scraper_pod=lambda: "prometheus-1",
            prometheus=driver.prometheus,
            timing=driver.timing,
            rotations=1,
        )


# -- the check body on a backend that awaits renewals ---------------------------------------


class _AwaitsRenewals:
    """What SMC011's body sees of the cluster backend: ``run_rotation`` (ClusterBackend's
    builds this same driver, timed from the scenario's SECRET_TTL, minutes; here it is the
    fake's short timing)."""

    name = "cluster"

    def __init__(self, driver: ClusterRotation) -> None:
        self.driver = driver

    def run_rotation(self, workload: Workload) -> RotationRun:
        return self.driver.run(workload)


def _rotation_check(proxy: str, renew_every: int) -> object:
    _, _, driver, workload = _setup(proxy, renew_every)
    dep = Deployment(ROTATION, MtlsMode.PERMISSIVE, NS, (workload,))
    return ROTATION_CONTINUITY.run(cast(Backend, _AwaitsRenewals(driver)), dep)


def test_the_rotation_check_runs_the_renewals_of_its_workload(proxy: str) -> None:
    continuity = _rotation_check(proxy, renew_every=3)
    assert isinstance(continuity, Continuity)
    assert continuity.ok


def test_the_rotation_check_fails_with_the_runs_own_message(proxy: str) -> None:
    with pytest.raises(CheckFailed) as failed:
        _rotation_check(proxy, renew_every=0)
    said = failed.value.message
    assert said.startswith(
        f"rotation 1: timed out after 1.5s waiting for the scraper's {CERT_CHAIN}"
    )
    assert " (continuity PASS httpbin over " in said  # the run's verdict line
