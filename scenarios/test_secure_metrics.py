"""Conformance: Prometheus scrapes Istio proxies over mTLS, and plaintext is refused.

One behaviour per test. Each test runs once per run unit it applies to: scenario
(native-sidecar, native-gateway, gateway-api, hardened, legacy-sidecar,
legacy-gateway, servicemonitor) x mTLS mode (PERMISSIVE and STRICT where they differ) x
configuration variant (as-documented, and the fix of each known upstream gap). The
``deployment`` fixture deploys each unit once on the selected backend; units the backend
or the Istio version cannot run are skipped with the reason. A result goes through the
known-gap table (securemetrics_e2e/knowngaps.py): KNOWN-GAP or FIXED where a gap is known.
"""

from collections.abc import Callable

import pytest


@pytest.mark.check("listeners-tls-only")
def test_secure_listeners_are_tls_only(run_check: Callable[[], None]) -> None:
    """15091/15092 accept only TLS, require a client certificate and route as Istio does."""
    run_check()


@pytest.mark.check("mtls-scrape")
def test_mtls_scrape_returns_metrics_from_workload_identity(run_check: Callable[[], None]) -> None:
    """The scraper's certificate gets HTTP 200 and valid metrics; the peer is the workload."""
    run_check()


@pytest.mark.check("envoy-port-stats-only")
def test_envoy_only_port_serves_stats_path_only(run_check: Callable[[], None]) -> None:
    """The secure Envoy-only port routes /stats/prometheus and answers 404 for /metrics."""
    run_check()


@pytest.mark.check("plaintext-refused")
def test_plaintext_to_secure_ports_is_refused(run_check: Callable[[], None]) -> None:
    """Plain HTTP to the secure ports gets no metrics, from another pod or inside the pod."""
    run_check()


@pytest.mark.check("no-client-cert-refused")
def test_client_without_certificate_is_refused(run_check: Callable[[], None]) -> None:
    """A TLS client presenting no certificate is refused during the handshake."""
    run_check()


@pytest.mark.check("foreign-ca-refused")
def test_certificate_from_foreign_ca_is_refused(run_check: Callable[[], None]) -> None:
    """A well-formed SPIFFE certificate from a CA the mesh does not trust is refused."""
    run_check()


@pytest.mark.check("hardened-envoy-stats-localhost")
def test_hardened_envoy_stats_port_is_localhost_only(run_check: Callable[[], None]) -> None:
    """METRICS_LOCALHOST_ACCESS_ONLY: 15090 is refused from another pod, served inside."""
    run_check()


@pytest.mark.check("hardened-agent-forbidden")
def test_hardened_agent_port_forbids_other_pods(run_check: Callable[[], None]) -> None:
    """METRICS_LOCALHOST_ACCESS_ONLY: 15020 answers 403 to another pod, serves inside."""
    run_check()


@pytest.mark.check("targets-up-merged")
def test_prometheus_merged_job_targets_up(run_check: Callable[[], None]) -> None:
    """Job istio-secure-merged-metrics scrapes https://<podIP>:<secure-port>/stats/prometheus UP."""
    run_check()


@pytest.mark.check("targets-up-envoy")
def test_prometheus_envoy_job_targets_up(run_check: Callable[[], None]) -> None:
    """Job istio-secure-envoy-metrics scrapes https://<podIP>:<envoy-port>/stats/prometheus UP."""
    run_check()


@pytest.mark.check("servicemonitor-targets-up")
def test_servicemonitor_targets_up_over_https(run_check: Callable[[], None]) -> None:
    """The Prometheus Operator scrapes every ServiceMonitor target UP over https."""
    run_check()


@pytest.mark.check("injector-secure-port-annotation")
def test_injector_annotates_native_sidecars_with_the_merged_port(
    run_check: Callable[[], None],
) -> None:
    """The sidecar injector sets prometheus.istio.io/secure-port to the merged port."""
    run_check()
