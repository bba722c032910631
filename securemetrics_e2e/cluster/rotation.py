"""Certificate rotation on a cluster: Istio's agents renew, the suite watches.

The suite cannot issue mesh certificates on a cluster, so it shortens their lifetime
through Istio's supported knob and waits for the renewals:

* ``SECRET_TTL`` (istio-proxy env, from pod ``proxy.istio.io/config`` ``proxyMetadata``;
  istio/istio ``pilot/cmd/pilot-agent/options/options.go``, default 24h) is the lifetime
  the agent requests in its CSR. istiod signs it as asked up to ``MAX_WORKLOAD_CERT_TTL``
  (istiod env, default 90 days, ``security/pkg/cmd/constants.go``), with no minimum
  (``security/pkg/pki/ca/ca.go``); ``DEFAULT_WORKLOAD_CERT_TTL`` (24h) only applies to
  a CSR that asks for no lifetime (``pilot/pkg/bootstrap/istio_ca.go``).
* The agent schedules renewal at ``(1 - SECRET_GRACE_PERIOD_RATIO ± jitter)`` of the
  lifetime (defaults 0.5 and ``SECRET_GRACE_PERIOD_RATIO_JITTER`` 0.01;
  ``rotateTime`` in ``security/pkg/nodeagent/cache/secretcache.go``), pushes the new
  certificate to Envoy over SDS and rewrites the ``OUTPUT_CERTS`` files.

Each rotation here is: the serial of the scraper's ``/etc/istio-certs/cert-chain.pem``
(read by an exec in its istio-proxy) changes, then the workload serves a new serial to
a fresh mTLS handshake made with those new files (curl in the scraper's istio-proxy,
the chain from ``%{certs}``), then every scrape job scrapes the workload UP again.
After at least two rotations, :func:`~securemetrics_e2e.continuity.measure_continuity`
reads the ``up`` samples of the whole window from the cluster's Prometheus.

Blind spot: Prometheus keeps its connections to a target alive, and Envoy judges a
client certificate only in the handshake, and an SDS update does not close
established connections. A Prometheus that never re-read its renewed files could keep
scraping over an old connection until it drops. The local backend forces fresh
connections; here the fresh handshake is the in-pod curl with the same files, which
shows the files are good, not that Prometheus re-read them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509

from securemetrics_e2e.backend import Workload
from securemetrics_e2e.cluster.incluster import (
    SCRAPER_CERTS,
    exec_timeout,
    mtls_curl,
    parse_mtls,
    peer_chain,
)
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.continuity import STATS_PATH, Continuity, measure_continuity, wait_scraped
from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.istionames import PROXY_CONTAINER
from securemetrics_e2e.manifests import SECRET_TTL_ENV
from securemetrics_e2e.probe import MtlsOutcome, ScrapeResult
from securemetrics_e2e.prometheus import PrometheusAPI
from securemetrics_e2e.rotation import RotationRun, RotationStep
from securemetrics_e2e.timeouts import CLUSTER
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

CERT_CHAIN = f"{SCRAPER_CERTS}/cert-chain.pem"
ROOT_CERT = f"{SCRAPER_CERTS}/root-cert.pem"
#: Istio's defaults for SECRET_GRACE_PERIOD_RATIO and SECRET_GRACE_PERIOD_RATIO_JITTER
GRACE_PERIOD_RATIO = 0.5
GRACE_PERIOD_JITTER = 0.01
#: the scraper's scrape_interval (charts/secure-metrics-prometheus/files/prometheus.yml)
SCRAPE_INTERVAL_S = 15.0
MIN_ROTATIONS = 2

_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class RotationFailed(SecureMetricsError):
    """The cluster could not be set up for rotation (not: a rotation that was not served)."""


def parse_go_duration(text: str) -> timedelta:
    """A Go ``time.Duration`` string as the agent's env parser reads it (``4m``, ``1h30m``)."""
    stripped = text.strip()
    parts = _GO_DURATION.findall(stripped)
    if not stripped or "".join(n + u for n, u in parts) != stripped:
        raise UsageError(
            f"{SECRET_TTL_ENV}={text!r} is not a Go duration such as 240s, 4m or 1h30m"
        )
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


def renewal_interval(ttl: timedelta, ratio: float = GRACE_PERIOD_RATIO) -> timedelta:
    """The longest time from one renewal to the next, jitter included."""
    return ttl * min(1.0, 1.0 - ratio + GRACE_PERIOD_JITTER)


@dataclass(frozen=True)
class Timing:
    """The bounds of every wait; :meth:`for_ttl` derives them from the certificate lifetime."""

    rotation_timeout: float  # for one renewal of a certificate
    settle_timeout: float  # for the workload to be scraped UP before the window
    scrape_interval_s: float = SCRAPE_INTERVAL_S
    poll_interval: float = 5.0
    #: curl's --max-time for one handshake from the scraper pod: the named timeout
    #: ``scrape-request`` (timeouts.py), as for every other probe of the cluster
    scrape_request: float = CLUSTER.scrape_request

    @classmethod
    def for_ttl(
        cls,
        ttl: timedelta,
        scrape_interval_s: float = SCRAPE_INTERVAL_S,
        scrape_request: float = CLUSTER.scrape_request,
    ) -> Timing:
        if ttl.total_seconds() < 8 * scrape_interval_s:
            raise UsageError(
                f"{SECRET_TTL_ENV} {ttl} is shorter than eight scrape intervals "
                f"({8 * scrape_interval_s:g}s): a renewal every {ttl / 2} leaves no room for "
                "Prometheus to scrape between renewals; use at least 2m"
            )
        # a renewal plus two scrapes and istiod's signing latency
        slack = 2 * scrape_interval_s + 30.0
        return cls(
            rotation_timeout=renewal_interval(ttl).total_seconds() + slack,
            settle_timeout=8 * scrape_interval_s,
            scrape_interval_s=scrape_interval_s,
            scrape_request=scrape_request,
        )


def leaf_certificate(pem: str, source: str) -> x509.Certificate:
    chain = peer_chain(pem)
    if not chain:
        raise RotationFailed(f"{source} holds no PEM certificate: {pem.strip()[:120]!r}")
    return chain[0]


def proxy_env(pod: Mapping[str, object], name: str) -> str | None:
    """The value of env var ``name`` in a pod's istio-proxy container, if set."""
    spec = pod.get("spec")
    containers = spec.get("containers") if isinstance(spec, Mapping) else None
    for container in containers if isinstance(containers, list) else []:
        if isinstance(container, Mapping) and container.get("name") == PROXY_CONTAINER:
            for env in container.get("env") or []:
                if isinstance(env, Mapping) and env.get("name") == name:
                    return str(env.get("value", ""))
    return None


@dataclass(frozen=True)
class ServedCertificate:
    """What one fresh mTLS handshake from the scraper pod showed."""

    result: ScrapeResult
    leaf: x509.Certificate | None


class ClusterRotation:
    """Waits for the agents' renewals and checks that every one is served and scraped.

    ``scraper_pod`` names the scraper's current pod (it is looked up again, as a
    restart gives it a new name); ``prometheus`` is the cluster's Prometheus API.
    """

    def __init__(
        self,
        api: KubeAPI,
        *,
        scraper_namespace: str,
        scraper_pod: Callable[[], str],
        prometheus: Callable[[], PrometheusAPI],
        timing: Timing,
        rotations: int = MIN_ROTATIONS,
        progress: Callable[[str], None] = lambda line: None,
    ) -> None:
        if rotations < MIN_ROTATIONS:
            raise UsageError(f"rotations must be at least {MIN_ROTATIONS}, got {rotations}")
        self.api = api
        self.scraper_namespace = scraper_namespace
        self.scraper_pod = scraper_pod
        self.prometheus = prometheus
        self.timing = timing
        self.rotations = rotations
        self.progress = progress

    # -- what the cluster shows ------------------------------------------------------

    def _exec(self, pod: str, command: Sequence[str]) -> str:
        got = self.api.exec(self.scraper_namespace, pod, PROXY_CONTAINER, list(command), timeout=30)
        if got.exit_code != 0:
            raise NotYet(
                f"`{' '.join(command)}` in {self.scraper_namespace}/{pod} "
                f"({PROXY_CONTAINER}) exited "
                f"{got.exit_code}: {got.stderr.strip()[:200]}"
            )
        return got.stdout

    def scraper_certificate(self) -> x509.Certificate:
        """The scraper's current client certificate, from its OUTPUT_CERTS files."""
        pod = self.scraper_pod()
        return leaf_certificate(self._exec(pod, ["cat", CERT_CHAIN]), f"{pod}:{CERT_CHAIN}")

    def served(self, workload: Workload, port: int) -> ServedCertificate:
        """A fresh mTLS handshake from the scraper's istio-proxy with its current files."""
        pod = self.scraper_pod()
        root = leaf_certificate(self._exec(pod, ["cat", ROOT_CERT]), f"{pod}:{ROOT_CERT}")
        url = workload.url(port, STATS_PATH)
        call = mtls_curl(url, timeout=self.timing.scrape_request)
        started = time.monotonic()
        got = self.api.exec(
            self.scraper_namespace,
            pod,
            PROXY_CONTAINER,
            call.argv,
            timeout=exec_timeout(self.timing.scrape_request),
        )
        result = parse_mtls(
            got,
            call,
            url,
            elapsed=time.monotonic() - started,
            roots=[root],
            expected=workload.spiffe_id,
        )
        chain = peer_chain(got.stdout)
        return ServedCertificate(result, chain[0] if chain else None)

    def check_configured(self, workload: Workload) -> timedelta:
        """The SECRET_TTL both istio-proxy containers run with; an error when one lacks it."""
        ttls = []
        for namespace, pod in (
            (workload.namespace, workload.pod_name),
            (self.scraper_namespace, self.scraper_pod()),
        ):
            obj: Obj | None = self.api.get("v1", "Pod", pod, namespace)
            value = proxy_env(obj or {}, SECRET_TTL_ENV)
            if value is None:
                raise RotationFailed(
                    f"the istio-proxy of {namespace}/{pod} has no {SECRET_TTL_ENV}: its "
                    "certificate lives 24h and will not rotate during the run. The rotation "
                    f"scenario sets proxyMetadata {SECRET_TTL_ENV} in proxy.istio.io/config; "
                    "was the pod injected by an injector that ignores it, or created before "
                    "the patch?"
                )
            ttls.append(parse_go_duration(value))
        return max(ttls)

    # -- waits -----------------------------------------------------------------------

    def _wait(self, what: str, probe: Callable[[], object], timeout: float) -> None:
        interval = self.timing.poll_interval
        wait_for(what, probe, timeout=timeout, interval=interval, max_interval=interval)

    def wait_scraper_renewed(self, previous: int) -> x509.Certificate:
        found: list[x509.Certificate] = []

        def renewed() -> None:
            cert = self.scraper_certificate()
            if cert.serial_number == previous:
                raise NotYet(f"{CERT_CHAIN} still holds serial {previous:x}")
            found[:] = [cert]

        self._wait(
            f"the scraper's {CERT_CHAIN} to change from serial {previous:x}",
            renewed,
            self.timing.rotation_timeout,
        )
        return found[0]

    def wait_workload_renewed(
        self, workload: Workload, port: int, previous: int
    ) -> ServedCertificate:
        found: list[ServedCertificate] = []

        def renewed() -> None:
            seen = self.served(workload, port)
            if seen.result.outcome is not MtlsOutcome.OK:
                raise NotYet(f"{seen.result.outcome.value}: {seen.result.detail}")
            if seen.result.peer_serial in (None, previous):
                raise NotYet(f"{workload.name}:{port} still serves serial {previous:x}")
            found[:] = [seen]

        self._wait(
            f"{workload.name}:{port} to serve a certificate other than serial {previous:x} "
            "to a fresh handshake with the scraper's current files",
            renewed,
            self.timing.rotation_timeout,
        )
        return found[0]

    def wait_scraped_up(
        self, workload: Workload, jobs: Sequence[str], after: datetime, timeout: float
    ) -> None:
        """Every job scraped ``workload`` UP after ``after``; WaitTimeout otherwise."""
        waited = wait_scraped(
            self.prometheus(),
            [workload],
            f"jobs {', '.join(jobs)} to scrape {workload.name} UP",
            jobs=jobs,
            since=after,
            timeout=timeout,
            interval=self.timing.poll_interval,
        )
        if waited.timed_out is not None:
            raise waited.timed_out

    def _first_served(self, workload: Workload, port: int) -> ServedCertificate:
        found: list[ServedCertificate] = []

        def ok() -> None:
            seen = self.served(workload, port)
            if seen.result.outcome is not MtlsOutcome.OK or seen.leaf is None:
                raise NotYet(f"{seen.result.outcome.value}: {seen.result.detail}")
            found[:] = [seen]

        self._wait(
            f"{workload.name}:{port} to answer an mTLS scrape", ok, self.timing.settle_timeout
        )
        return found[0]

    def run(self, workload: Workload) -> RotationRun:
        """At least ``rotations`` renewals of both certificates, then the continuity."""
        jobs = list(workload.spec.jobs)
        ports = sorted(set(workload.spec.jobs.values()))
        ttl = self.check_configured(workload)
        self.progress(
            f"[cluster] rotation: {SECRET_TTL_ENV} {ttl}, a renewal about every "
            f"{renewal_interval(ttl)}; waiting for {self.rotations} of each"
        )
        try:
            self.wait_scraped_up(
                workload, jobs, datetime.min.replace(tzinfo=UTC), self.timing.settle_timeout
            )
            scraper = self.scraper_certificate()
            served = self._first_served(workload, ports[0])
        except (WaitTimeout, NotYet) as exc:
            raise RotationFailed(
                f"{workload.name} was not scraped over mTLS before rotation: {exc}"
            ) from None
        assert served.leaf is not None
        workload_cert = served.leaf
        start = datetime.now(UTC)
        steps: list[RotationStep] = []
        while len(steps) < self.rotations:
            index = len(steps) + 1
            problem = ""
            seen: int | None = workload_cert.serial_number
            try:
                scraper = self.wait_scraper_renewed(scraper.serial_number)
                # both ports serve the same SDS secret: each must show the renewal
                renewed_leaf = None
                for port in ports:
                    renewed = self.wait_workload_renewed(
                        workload, port, workload_cert.serial_number
                    )
                    seen = renewed.result.peer_serial
                    renewed_leaf = renewed.leaf or renewed_leaf
                if renewed_leaf is not None:
                    workload_cert = renewed_leaf
                self.wait_scraped_up(
                    workload, jobs, datetime.now(UTC), 2 * self.timing.scrape_interval_s + 15
                )
            except WaitTimeout as exc:
                problem = str(exc)
            steps.append(
                RotationStep(
                    index=index,
                    workload_serial=workload_cert.serial_number,
                    scraper_serial=scraper.serial_number,
                    probe_serial=seen,
                    problem=problem,
                )
            )
            self.progress(
                f"[cluster] rotation {index}: scraper serial {scraper.serial_number:x}, "
                f"workload serial {workload_cert.serial_number:x}"
                + (f": {problem}" if problem else "")
            )
            if problem:
                break
        end = datetime.now(UTC)
        continuity = self.measure(workload, jobs, start, end, scraper, workload_cert)
        return RotationRun(tuple(steps), continuity)

    def measure(
        self,
        workload: Workload,
        jobs: Sequence[str],
        start: datetime,
        end: datetime,
        scraper: x509.Certificate,
        served: x509.Certificate,
    ) -> Continuity:
        return measure_continuity(
            self.prometheus(),
            workload,
            jobs,
            start,
            end,
            interval_s=self.timing.scrape_interval_s,
            certificates={
                "scraper client certificate (OUTPUT_CERTS cert-chain.pem)": scraper,
                f"{workload.name} workload certificate": served,
            },
        )
