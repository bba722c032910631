"""scrape_mtls and attempt_plaintext against real socket servers on loopback.

Every outcome is produced by a real server (tests/tlsservers.py): Python ssl servers
with mesh certificates, with and without client-certificate checks, servers that close,
stall, refuse, or answer like Envoy and the Istio agent do.
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import requests.adapters
import urllib3.exceptions
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from securemetrics_e2e.errors import EnvironmentProblem, UsageError
from securemetrics_e2e.pki import MeshCA, OutputCerts, SpiffeId, WorkloadIdentity
from securemetrics_e2e.probe import (
    ACCEPT,
    MtlsOutcome,
    PlaintextOutcome,
    PlaintextResult,
    ScrapeResult,
    _causes,
    _classify_mtls_error,
    _client_context,
    _closed_detail,
    _Handshake,
    _pending_alert,
    attempt_plaintext,
    classify_http_answer,
    identity_problem,
    plaintext_result,
    scrape_mtls,
)
from securemetrics_e2e.svid import PeerFailure
from securemetrics_e2e.waiting import NotYet, wait_for
from tests.test_pki import EXPECTED, svid_chain
from tests.tlsservers import (
    AGENT_403,
    AGENT_403_BODY,
    ENVOY_503,
    METRICS,
    NOT_FOUND,
    HTTPServer,
    RawServer,
    Reply,
    close_after_accept,
    close_after_handshake,
    closed_port,
    envoy_tls_server,
    server_context,
    silent,
)

SHORT = 0.5  # seconds: the timeout for servers that never answer


@dataclass(frozen=True)
class Mesh:
    ca: MeshCA
    server: WorkloadIdentity  # the workload whose metrics port is scraped
    server_files: OutputCerts
    scraper_files: OutputCerts  # Prometheus' OUTPUT_CERTS
    foreign_client_files: OutputCerts  # a valid SPIFFE cert from a CA the mesh does not trust
    foreign_server_files: OutputCerts
    other_server_files: OutputCerts  # a mesh cert for another service account
    expired_server_files: OutputCerts

    @property
    def expected(self) -> SpiffeId:
        return self.server.spiffe_id

    def server_tls(
        self,
        files: OutputCerts | None = None,
        *,
        require_client_cert: bool = True,
        maximum_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        """A server context like Envoy's secure metrics listener (client certs from the mesh)."""
        files = files or self.server_files
        return server_context(
            files.cert_chain,
            files.key,
            client_root=self.scraper_files.root_cert,
            require_client_cert=require_client_cert,
            maximum_version=maximum_version,
        )

    def scrape(
        self, url: str, *, client: OutputCerts | None = None, use_scraper: bool = True
    ) -> ScrapeResult:
        chosen = client if client is not None else (self.scraper_files if use_scraper else None)
        return scrape_mtls(
            url,
            client=chosen,
            mesh_root=self.scraper_files.root_cert,
            expected_spiffe=self.expected,
            timeout=3.0,
        )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    base = tmp_path_factory.mktemp("pki")
    ca = MeshCA.create()
    foreign = MeshCA.create()
    server = ca.issue("bookinfo", "reviews")
    return Mesh(
        ca=ca,
        server=server,
        server_files=server.write_output_certs(base / "server"),
        scraper_files=ca.issue("istio-system", "prometheus").write_output_certs(base / "scraper"),
        foreign_client_files=foreign.issue("istio-system", "prometheus").write_output_certs(
            base / "foreign-client"
        ),
        foreign_server_files=foreign.issue("bookinfo", "reviews").write_output_certs(
            base / "foreign-server"
        ),
        other_server_files=ca.issue("bookinfo", "ratings").write_output_certs(base / "other"),
        expired_server_files=ca.issue_expired("bookinfo", "reviews").write_output_certs(
            base / "expired"
        ),
    )


# --------------------------------------------------------------------------- mTLS: OK


def test_ok_scrape_parses_metrics_and_reports_the_peer(mesh: Mesh) -> None:
    with HTTPServer(METRICS, tls=mesh.server_tls()) as server:
        result = mesh.scrape(server.url())
    assert result.outcome is MtlsOutcome.OK, result.detail
    assert result.detail == "HTTP 200, 2 metric families"
    assert result.ok
    assert result.status == 200
    assert result.metric_names == {"envoy_server_live", "istio_requests"}
    live = next(f for f in result.families if f.name == "envoy_server_live")
    assert live.samples[0].value == 1.0
    assert result.peer_spiffe_id == mesh.expected
    assert result.peer_serial == mesh.server.serial
    assert result.peer_not_before == mesh.server.not_before
    assert result.tls_version == "TLSv1.3"
    assert result.url == server.url()
    assert result.elapsed_s > 0  # measured (an upper bound would time the machine)
    assert server.paths == ["/stats/prometheus"]


def test_ok_scrape_presents_the_scrapers_certificate(mesh: Mesh) -> None:
    with HTTPServer(METRICS, tls=mesh.server_tls()) as server:
        assert mesh.scrape(server.url()).ok
    scraper_leaf = mesh.scraper_files.chain()[0]
    assert server.peer_certs == [scraper_leaf.public_bytes(Encoding.DER)]


def test_ok_without_client_certificate_when_the_server_does_not_ask(mesh: Mesh) -> None:
    # No client certificate means no intermediates from the scraper's own chain: the
    # identity check must use the chain the server presented.
    tls = mesh.server_tls(require_client_cert=False)
    with HTTPServer(METRICS, tls=tls) as server:
        result = mesh.scrape(server.url(), use_scraper=False)
    assert result.outcome is MtlsOutcome.OK, result.detail
    assert server.peer_certs == [None]


def test_ok_over_ipv6_loopback(mesh: Mesh) -> None:
    with HTTPServer(METRICS, tls=mesh.server_tls(), host="::1") as server:
        url = server.url()
        assert url.startswith("https://[::1]:")
        result = mesh.scrape(url)
    assert result.outcome is MtlsOutcome.OK, result.detail


def test_expected_none_skips_the_identity_check_but_reports_it(mesh: Mesh) -> None:
    tls = mesh.server_tls(mesh.other_server_files)
    with HTTPServer(METRICS, tls=tls) as server:
        result = scrape_mtls(
            server.url(),
            client=mesh.scraper_files,
            mesh_root=mesh.scraper_files.root_cert.read_bytes(),
            expected_spiffe=None,
        )
    assert result.outcome is MtlsOutcome.OK, result.detail
    assert result.peer_spiffe_id == SpiffeId.for_workload("cluster.local", "bookinfo", "ratings")


# --------------------------------------------------------------------------- HTTP answers


def test_non_2xx_is_http_error(mesh: Mesh) -> None:
    with HTTPServer(NOT_FOUND, tls=mesh.server_tls()) as server:
        result = mesh.scrape(server.url("/metrics"))
    assert result.outcome is MtlsOutcome.HTTP_ERROR
    assert not result.ok
    assert result.status == 404
    assert "404 page not found" in result.detail
    assert result.families == []
    assert result.peer_spiffe_id == mesh.expected


def test_2xx_that_is_not_prometheus_text_is_invalid_metrics(mesh: Mesh) -> None:
    html = Reply(200, "<html><body>dashboard</body></html>", content_type="text/html")
    with HTTPServer(html, tls=mesh.server_tls()) as server:
        result = mesh.scrape(server.url())
    assert result.outcome is MtlsOutcome.INVALID_METRICS
    assert not result.ok
    assert result.status == 200
    assert "not Prometheus text" in result.detail
    assert "<html>" in result.detail


# --------------------------------------------------------------------------- rejected by the server


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_no_client_certificate_is_handshake_rejected(mesh: Mesh, version: ssl.TLSVersion) -> None:
    with HTTPServer(METRICS, tls=mesh.server_tls(maximum_version=version)) as server:
        result = mesh.scrape(server.url(), use_scraper=False)
    assert result.outcome is MtlsOutcome.HANDSHAKE_REJECTED, result.detail
    assert "we presented no client certificate" in result.detail
    assert result.status is None
    assert server.paths == []
    assert any("did not return a certificate" in e for e in server.handshake_errors)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_foreign_client_certificate_is_handshake_rejected(
    mesh: Mesh, version: ssl.TLSVersion
) -> None:
    # With TLS 1.3 the server's rejection arrives after our handshake has completed; it
    # may break the request write. Repeat to cover both timings.
    with HTTPServer(METRICS, tls=mesh.server_tls(maximum_version=version)) as server:
        results = [mesh.scrape(server.url(), client=mesh.foreign_client_files) for _ in range(20)]
    assert {r.outcome for r in results} == {MtlsOutcome.HANDSHAKE_REJECTED}, [
        r.detail for r in results if r.outcome is not MtlsOutcome.HANDSHAKE_REJECTED
    ]
    assert all("UNKNOWN_CA" in r.detail for r in results)
    assert all(r.detail.endswith("(we presented our client certificate)") for r in results)
    assert server.paths == []


def test_server_closing_during_the_handshake_is_handshake_rejected(mesh: Mesh) -> None:
    with close_after_accept() as server:
        result = mesh.scrape(f"https://127.0.0.1:{server.port}/stats/prometheus")
    assert result.outcome is MtlsOutcome.HANDSHAKE_REJECTED
    assert "during the TLS handshake" in result.detail
    assert result.tls_version is None


def test_plaintext_server_is_handshake_rejected(mesh: Mesh) -> None:
    with HTTPServer(METRICS) as server:
        result = mesh.scrape(f"https://127.0.0.1:{server.port}/stats/prometheus")
    assert result.outcome is MtlsOutcome.HANDSHAKE_REJECTED
    assert "WRONG_VERSION_NUMBER" in result.detail


# --------------------------------------------------------------------------- the peer


def test_foreign_ca_server_is_peer_untrusted(mesh: Mesh) -> None:
    tls = mesh.server_tls(mesh.foreign_server_files)
    with HTTPServer(METRICS, tls=tls) as server:
        result = mesh.scrape(server.url())
    assert result.outcome is MtlsOutcome.PEER_UNTRUSTED
    assert "does not verify against the mesh root" in result.detail
    assert "unable to get local issuer certificate" in result.detail
    assert server.paths == []


def test_only_the_mesh_root_is_trusted_not_the_requests_ca_bundle(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # requests adds its public CA bundle to every verifying connection unless told not
    # to; a bundle holding the foreign root must not make the foreign server trusted.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(mesh.foreign_server_files.root_cert.read_bytes())
    monkeypatch.setattr(requests.adapters, "DEFAULT_CA_BUNDLE_PATH", str(bundle))
    tls = mesh.server_tls(mesh.foreign_server_files)
    with HTTPServer(METRICS, tls=tls) as server:
        result = mesh.scrape(server.url())
    assert result.outcome is MtlsOutcome.PEER_UNTRUSTED, result.detail
    # Refused by OpenSSL in the handshake, before any request was sent.
    assert "unable to get local issuer certificate" in result.detail
    assert server.paths == []


def test_expired_server_certificate_is_peer_untrusted(mesh: Mesh) -> None:
    tls = mesh.server_tls(mesh.expired_server_files)
    with HTTPServer(METRICS, tls=tls) as server:
        result = mesh.scrape(server.url())
    assert result.outcome is MtlsOutcome.PEER_UNTRUSTED
    assert "certificate has expired" in result.detail


def test_mesh_certificate_for_another_identity_is_a_mismatch(mesh: Mesh) -> None:
    tls = mesh.server_tls(mesh.other_server_files)
    with HTTPServer(METRICS, tls=tls) as server:
        result = mesh.scrape(server.url())
    assert result.outcome is MtlsOutcome.PEER_IDENTITY_MISMATCH
    assert not result.ok
    ratings = SpiffeId.for_workload("cluster.local", "bookinfo", "ratings")
    assert result.peer_spiffe_id == ratings
    assert f"is for {ratings}, expected {mesh.expected}" in result.detail


def test_mismatch_is_found_from_the_presented_chain_alone(mesh: Mesh) -> None:
    tls = mesh.server_tls(mesh.other_server_files, require_client_cert=False)
    with HTTPServer(METRICS, tls=tls) as server:
        result = mesh.scrape(server.url(), use_scraper=False)
    assert result.outcome is MtlsOutcome.PEER_IDENTITY_MISMATCH, result.detail


# --------------------------------------------------------------------------- transport endings


def test_closed_port_is_refused(mesh: Mesh) -> None:
    with closed_port() as port:
        result = mesh.scrape(f"https://127.0.0.1:{port}/stats/prometheus")
    assert result.outcome is MtlsOutcome.REFUSED
    assert result.detail == "connection refused"


def test_close_after_handshake_is_closed(mesh: Mesh) -> None:
    with close_after_handshake(mesh.server_tls()) as server:
        result = mesh.scrape(f"https://127.0.0.1:{server.port}/stats/prometheus")
        assert server.handshakes == 1
    assert result.outcome is MtlsOutcome.CLOSED, result.detail
    assert "without an HTTP response" in result.detail
    assert result.tls_version == "TLSv1.3"
    assert result.peer_spiffe_id == mesh.expected


def test_silent_server_times_out_in_the_handshake(mesh: Mesh) -> None:
    with silent() as server:
        result = scrape_mtls(
            f"https://127.0.0.1:{server.port}/stats/prometheus",
            client=mesh.scraper_files,
            mesh_root=mesh.scraper_files.root_cert,
            expected_spiffe=mesh.expected,
            timeout=SHORT,
        )
    assert result.outcome is MtlsOutcome.TIMEOUT
    # the stage, then the error by its type: "...handshake: ReadTimeout: ..."
    assert re.match(r"timed out waiting for the TLS handshake: \w*Timeout\w*: ", result.detail)
    assert result.elapsed_s >= SHORT  # it waited its timeout (the outcome says it fired)


def test_silent_tls_server_times_out_waiting_for_the_response(mesh: Mesh) -> None:
    with RawServer(mode="silent", tls=mesh.server_tls()) as server:
        result = scrape_mtls(
            f"https://127.0.0.1:{server.port}/stats/prometheus",
            client=mesh.scraper_files,
            mesh_root=mesh.scraper_files.root_cert,
            expected_spiffe=mesh.expected,
            timeout=SHORT,
        )
    assert result.outcome is MtlsOutcome.TIMEOUT
    assert re.match(r"timed out waiting for the HTTP response: \w*Timeout\w*: ", result.detail)


# --------------------------------------------------------------------------- bad input


def test_missing_mesh_root_file_is_a_usage_error(mesh: Mesh, tmp_path: Path) -> None:
    missing = tmp_path / "root-cert.pem"
    with pytest.raises(UsageError, match=rf"mesh root file {missing} does not exist"):
        scrape_mtls("https://127.0.0.1:1/", client=None, mesh_root=missing, expected_spiffe=None)


def test_mesh_root_without_pem_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"mesh_root \(PEM bytes\) holds no PEM certificate"):
        scrape_mtls("https://127.0.0.1:1/", client=None, mesh_root=b"junk", expected_spiffe=None)


def test_missing_client_files_name_them(mesh: Mesh, tmp_path: Path) -> None:
    absent = OutputCerts(
        directory=tmp_path,
        root_cert=tmp_path / "root-cert.pem",
        cert_chain=tmp_path / "cert-chain.pem",
        key=tmp_path / "key.pem",
    )
    with pytest.raises(UsageError) as info:
        scrape_mtls(
            "https://127.0.0.1:1/",
            client=absent,
            mesh_root=mesh.scraper_files.root_cert,
            expected_spiffe=None,
        )
    assert str(tmp_path / "cert-chain.pem") in str(info.value)
    assert "istio#10544" in str(info.value)


def test_mismatched_key_is_a_usage_error(mesh: Mesh, tmp_path: Path) -> None:
    mixed = OutputCerts(
        directory=tmp_path,
        root_cert=mesh.scraper_files.root_cert,
        cert_chain=mesh.scraper_files.cert_chain,
        key=mesh.server_files.key,
    )
    assert oct(os.stat(mesh.server_files.key).st_mode & 0o777) == "0o600"
    with pytest.raises(UsageError, match="do they belong together"):
        scrape_mtls(
            "https://127.0.0.1:1/",
            client=mixed,
            mesh_root=mesh.scraper_files.root_cert,
            expected_spiffe=None,
        )


# --------------------------------------------------------------------------- plaintext


def test_plaintext_refused() -> None:
    with closed_port() as port:
        result = attempt_plaintext("127.0.0.1", port)
    assert result.outcome is PlaintextOutcome.REFUSED
    assert result.protected
    assert result.status is None


def test_plaintext_closed_after_accept() -> None:
    with close_after_accept() as server:
        result = attempt_plaintext("127.0.0.1", server.port)
        connections = server.connections
    assert result.outcome is PlaintextOutcome.CLOSED
    assert result.detail == "connection closed with no HTTP response"
    assert result.protected
    assert connections == 1  # one attempt: a probe never retries


def test_plaintext_to_a_tls_only_listener_is_closed(mesh: Mesh) -> None:
    with HTTPServer(METRICS, tls=mesh.server_tls()) as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.CLOSED
    assert "no HTTP response" in result.detail
    assert result.protected
    assert server.paths == []


def test_plaintext_envoy_503_is_rejected_by_proxy() -> None:
    with HTTPServer(ENVOY_503) as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.REJECTED_BY_PROXY
    assert result.status == 503
    assert "reset reason: connection termination" in result.body_excerpt
    assert result.protected


def test_plaintext_other_503_is_other_http() -> None:
    with HTTPServer(Reply(503, "service unavailable")) as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.OTHER_HTTP
    assert result.status == 503


def test_plaintext_agent_403_is_forbidden() -> None:
    with HTTPServer(AGENT_403) as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.FORBIDDEN
    assert result.status == 403
    assert result.body_excerpt == AGENT_403_BODY.strip()
    assert result.protected


def test_plaintext_metrics_are_served_and_unprotected() -> None:
    with HTTPServer(METRICS) as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.SERVED
    assert not result.protected
    assert result.status == 200
    assert "envoy_server_live" in result.body_excerpt
    assert "2 metric families (2 samples)" in result.detail
    assert server.paths == ["/stats/prometheus"]


def test_plaintext_404_is_not_found() -> None:
    with HTTPServer(METRICS, routes={"/stats/prometheus": NOT_FOUND}) as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.NOT_FOUND
    assert result.protected


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, "<html><body>welcome</body></html>", content_type="text/html"),
        Reply(200, ""),
        Reply(500, METRICS.body),
    ],
    ids=["html", "empty", "500-with-metrics"],
)
def test_plaintext_answers_without_served_metrics_are_other_http(reply: Reply) -> None:
    with HTTPServer(reply) as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.OTHER_HTTP
    assert result.status == reply.status
    assert result.protected


def test_plaintext_silent_server_times_out() -> None:
    with silent() as server:
        result = attempt_plaintext("127.0.0.1", server.port, timeout=SHORT)
    assert result.outcome is PlaintextOutcome.TIMEOUT
    assert result.protected
    assert result.elapsed_s >= SHORT  # it waited its timeout (the outcome says it fired)


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_plaintext_ipv6_literal(host: str) -> None:
    with HTTPServer(METRICS, host="::1") as server:
        result = attempt_plaintext(host, server.port, "/stats/prometheus")
    assert result.outcome is PlaintextOutcome.SERVED
    assert result.host == "::1"
    assert result.url == f"http://[::1]:{server.port}/stats/prometheus"


def test_plaintext_custom_path_is_requested() -> None:
    with HTTPServer(NOT_FOUND, routes={"/metrics": METRICS}) as server:
        assert attempt_plaintext("127.0.0.1", server.port, "/metrics").outcome is (
            PlaintextOutcome.SERVED
        )
        assert attempt_plaintext("127.0.0.1", server.port).outcome is PlaintextOutcome.NOT_FOUND
    assert server.paths == ["/metrics", "/stats/prometheus"]


def test_protected_is_false_only_for_served() -> None:
    for outcome in PlaintextOutcome:
        result = PlaintextResult("h", 1, "/", outcome, "", 0.0)
        assert result.protected is (outcome is not PlaintextOutcome.SERVED)


@pytest.mark.parametrize(("port", "path"), [(0, "/x"), (70000, "/x"), (80, "x")])
def test_plaintext_bad_input(port: int, path: str) -> None:
    with pytest.raises(UsageError):
        attempt_plaintext("127.0.0.1", port, path)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A proxy from the environment must not be used: point one at a closed port, so a
    # probe that honoured it would fail every test.
    with closed_port() as port:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        yield


# ----------------------------------------------------------- judged as Envoy judges


def _serve_files(chain: list[Any], key: Any, work: Path) -> tuple[Path, Path]:
    """Write a chain and its key as Envoy reads them (the key 0600)."""
    from cryptography.hazmat.primitives import serialization

    work.mkdir(parents=True, exist_ok=True)
    chain_file, key_file = work / "cert-chain.pem", work / "key.pem"
    chain_file.write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in chain))
    key_file.touch(mode=0o600)
    key_file.write_bytes(
        key.private_bytes(
            Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return chain_file, key_file


def test_svid_without_authority_key_identifier_served_by_envoy_is_ok(
    mesh: Mesh, tmp_path: Path
) -> None:
    """A real Envoy serves an X.509-SVID whose leaf has no Authority Key Identifier
    (RFC 5280 and the SPIFFE X.509-SVID spec allow it; Envoy serves and accepts it): the
    probe must judge it OK, not PEER_UNTRUSTED, and see the workload's identity."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from securemetrics_e2e.local.envoy import envoy_binary

    try:
        envoy_binary()
    except EnvironmentProblem as exc:
        pytest.skip(f"no real Envoy here: {exc}")
    key = ec.generate_private_key(ec.SECP256R1())
    chain = svid_chain(mesh.ca, aki=False, leaf_key=key, identity=mesh.expected)
    chain_file, key_file = _serve_files(chain, key, tmp_path / "svid")
    root = mesh.scraper_files.root_cert
    with envoy_tls_server(chain_file, key_file, root, tmp_path) as port:
        result = mesh.scrape(f"https://127.0.0.1:{port}/stats/prometheus")
        foreign = mesh.scrape(
            f"https://127.0.0.1:{port}/stats/prometheus", client=mesh.foreign_client_files
        )
    assert result.outcome is MtlsOutcome.OK, result.detail
    assert result.peer_spiffe_id == mesh.expected
    assert "envoy_server_live" in result.metric_names
    # the same Envoy still refuses a client of a foreign CA: it is really checking
    assert foreign.outcome is MtlsOutcome.HANDSHAKE_REJECTED, foreign.detail


# -- the classification rule alone (mutation testing found these clauses untested) -----


@pytest.mark.parametrize(
    ("status", "served"),
    [(200, True), (299, True), (300, False), (301, False)],
)
def test_only_a_2xx_with_samples_is_served(status: int, served: bool) -> None:
    """2xx is 200..299: a 300 carrying metric samples is not the port serving them."""
    body = "# TYPE envoy_up gauge\nenvoy_up 1\n"
    outcome, detail = classify_http_answer(status, body)
    if served:
        assert outcome is PlaintextOutcome.SERVED
        assert detail == (
            f"HTTP {status} with 1 metric families (1 samples) in plaintext: the port is open"
        )
    else:
        assert outcome is PlaintextOutcome.OTHER_HTTP


def test_identity_problem_reports_an_untrusted_chain() -> None:
    """Every root refusing the chain is a problem, never a proof (not None)."""
    problem = identity_problem(
        svid_chain(MeshCA.create()), [MeshCA.create().root_cert], [], EXPECTED
    )
    assert problem is not None
    assert problem.kind is PeerFailure.UNTRUSTED


def test_identity_problem_reports_a_wrong_identity_before_untrusted() -> None:
    """One root of the bundle trusts the chain but the identity is another's: that is
    the problem reported, not the other root's "untrusted"."""
    ca = MeshCA.create()
    chain = svid_chain(ca, identity=SpiffeId.for_workload("cluster.local", "ns", "other"))
    problem = identity_problem(chain, [MeshCA.create().root_cert, ca.root_cert], [], EXPECTED)
    assert problem is not None
    assert problem.kind is PeerFailure.WRONG_IDENTITY


def test_identity_problem_builds_the_path_with_the_given_intermediates() -> None:
    """A peer presenting only its leaf is proven through the intermediates passed in."""
    ca = MeshCA.create()
    leaf, *intermediates = svid_chain(ca)
    assert identity_problem([leaf], [ca.root_cert], intermediates, EXPECTED) is None
    assert identity_problem([leaf], [ca.root_cert], [], EXPECTED) is not None


def test_an_alert_says_which_certificate_we_presented() -> None:
    # which TLS 1.3 timing brings the alert to the client is the server's (before or
    # after our Finished), so the wording is pinned on the classification itself
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    for presented, words in ((True, "our client certificate"), (False, "no client certificate")):
        outcome, detail = _classify_mtls_error(alert, _Handshake(), presented)
        assert outcome is MtlsOutcome.HANDSHAKE_REJECTED
        assert detail.endswith(f"alert TLSV1_ALERT_UNKNOWN_CA (we presented {words})")


# -- what mutation testing of the probe found untested (CONTRIBUTING.md, "Mutation testing") --


def test_a_root_bundle_with_text_around_its_pem_blocks_trusts_every_root(mesh: Mesh) -> None:
    """A root file may carry text beside its PEM blocks (`openssl x509 -text` output, a
    non-ASCII subject): every root it holds is trusted, and nothing else."""
    foreign_root = mesh.foreign_server_files.root_cert.read_bytes()
    bundle = (
        "# Mesh roots of the Société (foreign first)\n".encode()
        + foreign_root
        + "Subject: O=Société\n".encode()
        + mesh.scraper_files.root_cert.read_bytes()
    )
    outcomes = []
    for files in (mesh.server_files, mesh.foreign_server_files):
        with HTTPServer(METRICS, tls=mesh.server_tls(files)) as server:
            result = scrape_mtls(
                server.url(),
                client=mesh.scraper_files,
                mesh_root=bundle,
                expected_spiffe=mesh.expected,
            )
        outcomes.append(result.outcome)
    assert outcomes == [MtlsOutcome.OK, MtlsOutcome.OK]


def test_bad_mesh_root_and_client_files_say_how_to_fix_them(mesh: Mesh, tmp_path: Path) -> None:
    missing = tmp_path / "root-cert.pem"
    with pytest.raises(UsageError) as info:
        scrape_mtls("https://127.0.0.1:1/", client=None, mesh_root=missing, expected_spiffe=None)
    assert str(info.value) == (
        f"mesh root file {missing} does not exist; pass the mesh's root-cert.pem "
        "(the OUTPUT_CERTS directory of the scraper) or its PEM bytes"
    )
    absent = OutputCerts(
        directory=tmp_path,
        root_cert=mesh.scraper_files.root_cert,
        cert_chain=tmp_path / "cert-chain.pem",
        key=tmp_path / "key.pem",
    )
    with pytest.raises(UsageError) as info:
        scrape_mtls(
            "https://127.0.0.1:1/",
            client=absent,
            mesh_root=mesh.scraper_files.root_cert,
            expected_spiffe=None,
        )
    assert str(info.value) == (
        f"client certificate files missing: {tmp_path / 'cert-chain.pem'}, "
        f"{tmp_path / 'key.pem'}; the scraper's OUTPUT_CERTS are written by istio-agent "
        "once it has its certificate: wait for them (istio#10544)"
    )


def test_a_handshake_failure_names_openssls_reason_or_the_error(mesh: Mesh) -> None:
    """The detail of a failed handshake is OpenSSL's reason when there is one."""
    with HTTPServer(METRICS) as server:
        result = mesh.scrape(f"https://127.0.0.1:{server.port}/stats/prometheus")
    assert result.detail == "the connection failed during the TLS handshake: WRONG_VERSION_NUMBER"


def test_a_2xx_body_the_parser_chokes_on_is_invalid_metrics(mesh: Mesh) -> None:
    """prometheus_client's parser fails on some bodies with IndexError, not ValueError:
    still INVALID_METRICS naming it (and, in plaintext, not SERVED), never a crash."""
    broken = Reply(200, "{, ==}")
    with HTTPServer(broken, tls=mesh.server_tls()) as server:
        result = mesh.scrape(server.url())
    assert result.outcome is MtlsOutcome.INVALID_METRICS
    assert result.detail == (
        "HTTP 200 but the body is not Prometheus text "
        "(IndexError: string index out of range): {, ==}"
    )
    assert classify_http_answer(200, broken.body) == (
        PlaintextOutcome.OTHER_HTTP,
        "HTTP 200 without metrics: {, ==}",
    )


def test_plaintext_ports_1_and_65535_are_probed_65536_is_bad_input() -> None:
    for port in (1, 65535):  # nothing listens on either on this loopback
        refused = attempt_plaintext("127.0.0.1", port)
        assert refused.outcome is PlaintextOutcome.REFUSED
        assert (refused.detail, refused.body_excerpt) == ("connection refused", "")
    with pytest.raises(UsageError) as info:
        attempt_plaintext("127.0.0.1", 65536)
    assert str(info.value) == "port 65536 is out of range; use 1-65535"
    with pytest.raises(UsageError) as info:
        attempt_plaintext("127.0.0.1", 80, "stats")
    assert str(info.value) == "path 'stats' must start with '/'"


def test_plaintext_waits_two_seconds_by_default() -> None:
    with silent() as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.TIMEOUT
    assert result.detail == "no answer within 2s"


def test_a_plaintext_result_excerpts_the_body_it_is_given() -> None:
    """300 characters of the stripped body, then "..."; no body, no excerpt."""
    verdict = (PlaintextOutcome.OTHER_HTTP, "HTTP 500")
    whole, cut = "a" * 300, "b" * 300 + "c"
    assert plaintext_result("h", 1, "/", 0.5, verdict, 500, f"  {whole}\n").body_excerpt == whole
    assert plaintext_result("h", 1, "/", 0.5, verdict, 500, cut).body_excerpt == "b" * 300 + "..."
    assert plaintext_result("h", 1, "/", 0.5, verdict) == PlaintextResult(
        "h", 1, "/", PlaintextOutcome.OTHER_HTTP, "HTTP 500", 0.5, None, ""
    )


def test_a_connection_ended_without_http_says_how() -> None:
    """The CLOSED detail (a pure rule over the error's causes): closed, reset, not HTTP,
    or the error itself."""
    line = "SSH-2.0-OpenSSH_9.6 " + "x" * 100
    cases: list[tuple[BaseException, str]] = [
        (http.client.RemoteDisconnected("gone"), "connection closed with no HTTP response"),
        (ConnectionResetError(104, "reset"), "connection reset with no HTTP response"),
        (
            http.client.BadStatusLine(line),
            f"the server answered something that is not HTTP: {line[:80]}",
        ),
        (OSError("boom"), "no HTTP response: OSError: boom"),
    ]
    for error, detail in cases:
        assert _closed_detail([error], error) == detail


def _tls_socket(mesh: Mesh, client: OutputCerts, port: int) -> tuple[ssl.SSLSocket, _Handshake]:
    """A connected socket of the probe's own client context, its handshake done."""
    handshake = _Handshake()
    roots = x509.load_pem_x509_certificates(mesh.scraper_files.root_cert.read_bytes())
    context = _client_context(client, roots, handshake)
    raw = socket.create_connection(("127.0.0.1", port), timeout=3.0)
    return context.wrap_socket(raw), handshake


def _write_until_it_breaks(sock: ssl.SSLSocket) -> OSError:
    """Write a request until the server's close reaches us; the error the write raised."""
    broke: list[OSError] = []

    def write() -> None:
        try:
            sock.sendall(b"GET /stats/prometheus HTTP/1.1\r\nHost: x\r\n\r\n")
        except OSError as exc:
            broke.append(exc)
            return
        raise NotYet("the write went through")

    wait_for("the request write to break", write, timeout=5.0)
    return broke[0]


def test_an_alert_after_our_handshake_is_raised_when_the_request_write_breaks(
    mesh: Mesh,
) -> None:
    """TLS 1.3: the server judges our certificate after our side of the handshake is
    done, alerts and closes; the request write then breaks with the alert unread. The
    probe's socket raises the alert (from the write's error), so the scrape is
    HANDSHAKE_REJECTED, not CLOSED."""
    with HTTPServer(METRICS, tls=mesh.server_tls()) as server:
        sock, handshake = _tls_socket(mesh, mesh.foreign_client_files, server.port)
        with sock:
            assert handshake.done
            broke = _write_until_it_breaks(sock)
    assert isinstance(broke, ssl.SSLError)
    assert broke.reason == "TLSV1_ALERT_UNKNOWN_CA"
    assert isinstance(broke.__cause__, OSError)


def test_a_close_without_an_alert_is_not_taken_for_one(mesh: Mesh) -> None:
    """A server that accepted us and closed sent no alert: none is read, and the write's
    own error is raised as it was."""
    with close_after_handshake(mesh.server_tls()) as server:
        sock, _ = _tls_socket(mesh, mesh.scraper_files, server.port)
        with sock:
            assert _pending_alert(sock) is None  # blocks until the server's close arrives
            broke = _write_until_it_breaks(sock)
    assert broke.__cause__ is None
    assert "ALERT" not in (getattr(broke, "reason", None) or "")


def test_probes_ask_for_prometheus_text_and_never_follow_a_redirect(mesh: Mesh) -> None:
    """Both probes send Prometheus 2.x's Accept header and judge the port's own answer:
    a redirect is that answer, not a pointer to follow."""
    moved = Reply(302, "moved\n", location="/elsewhere")
    routes = {"/elsewhere": METRICS}
    with HTTPServer(moved, routes=routes, tls=mesh.server_tls()) as server:
        scraped = mesh.scrape(server.url())
        tls_seen = (server.paths, server.accepts)
    with HTTPServer(moved, routes=routes) as server:
        plain = attempt_plaintext("127.0.0.1", server.port)
        plain_seen = (server.paths, server.accepts)
    assert (scraped.outcome, scraped.status) == (MtlsOutcome.HTTP_ERROR, 302)
    assert (plain.outcome, plain.status) == (PlaintextOutcome.OTHER_HTTP, 302)
    assert tls_seen == plain_seen == (["/stats/prometheus"], [ACCEPT])


def test_elapsed_is_the_time_the_probe_took(mesh: Mesh) -> None:
    """elapsed_s lies within the time around the call (a bound the machine cannot break)."""
    with HTTPServer(METRICS, tls=mesh.server_tls()) as server:
        before = time.monotonic()
        scraped = mesh.scrape(server.url())
        plain = attempt_plaintext("127.0.0.1", server.port)
        took = time.monotonic() - before
    with closed_port() as port:
        before = time.monotonic()
        refused = attempt_plaintext("127.0.0.1", port)
        refused_took = time.monotonic() - before
    assert 0 < scraped.elapsed_s <= took
    assert 0 < plain.elapsed_s <= took
    assert 0 < refused.elapsed_s <= refused_took


def test_a_broken_record_after_the_handshake_is_no_alert(mesh: Mesh) -> None:
    """Bytes that are no TLS record raise an SSLError too, but they are not the server
    refusing us: no alert is read, and the scrape is CLOSED."""
    with RawServer(mode="garbage", tls=mesh.server_tls()) as server:
        sock, _ = _tls_socket(mesh, mesh.scraper_files, server.port)
        with sock:
            assert _pending_alert(sock) is None
        result = mesh.scrape(f"https://127.0.0.1:{server.port}/stats/prometheus")
    assert result.outcome is MtlsOutcome.CLOSED, result.detail


def test_a_scrape_waits_three_seconds_by_default(mesh: Mesh) -> None:
    with silent() as server:
        result = scrape_mtls(
            f"https://127.0.0.1:{server.port}/stats/prometheus",
            client=mesh.scraper_files,
            mesh_root=mesh.scraper_files.root_cert,
            expected_spiffe=mesh.expected,
        )
    assert result.outcome is MtlsOutcome.TIMEOUT
    assert result.detail.endswith("(read timeout=3.0)"), result.detail


def test_a_plaintext_answer_that_never_ends_its_first_line_is_closed() -> None:
    """No HTTP status line within what http.client reads: CLOSED, naming the error."""
    with RawServer(mode="endless-line") as server:
        result = attempt_plaintext("127.0.0.1", server.port)
    assert result.outcome is PlaintextOutcome.CLOSED
    assert result.detail == (
        "no HTTP response: ConnectionError: ('Connection aborted.', "
        "LineTooLong('got more than 65536 bytes when reading status line'))"
    )
    assert result.protected


def test_a_3xx_carrying_metrics_is_an_http_error(mesh: Mesh) -> None:
    """2xx is 200..299 over mTLS too: a 300 is not the port serving its metrics."""
    with HTTPServer(Reply(300, METRICS.body), tls=mesh.server_tls()) as server:
        result = mesh.scrape(server.url())
    assert (result.outcome, result.status) == (MtlsOutcome.HTTP_ERROR, 300)


def test_a_reset_is_named_by_both_probes(mesh: Mesh) -> None:
    """A port that resets the connection at once: the plaintext probe says reset; the
    scrape fails its handshake naming the error itself (there is no OpenSSL reason)."""
    with RawServer(mode="reset") as server:
        plain = attempt_plaintext("127.0.0.1", server.port)
        scraped = mesh.scrape(f"https://127.0.0.1:{server.port}/stats/prometheus")
    assert (plain.outcome, plain.detail) == (
        PlaintextOutcome.CLOSED,
        "connection reset with no HTTP response",
    )
    # the reset lands in the TLS handshake or, when it is quicker, in the TCP connect
    assert scraped.outcome is MtlsOutcome.HANDSHAKE_REJECTED
    assert scraped.detail.startswith(
        "the connection failed during the TLS handshake: ConnectionError: "
    ), scraped.detail
    assert "Connection reset by peer" in scraped.detail


def test_causes_walks_every_link_breadth_first_and_ends_on_a_cycle() -> None:
    """_causes (a pure walk): the error, then what it wraps, level by level, through
    ``__cause__``, ``__context__``, ``args`` and urllib3's ``reason``; each once."""
    deepest = ConnectionResetError(104, "reset")
    via_reason = urllib3.exceptions.MaxRetryError(None, "/stats/prometheus", deepest)  # type: ignore[arg-type]
    beside = OSError("beside")
    root = requests.ConnectionError("root", beside)
    root.__cause__ = via_reason
    assert list(_causes(root)) == [root, via_reason, beside, deepest]
    # a cycle (an error wrapped by what it wraps) is walked once, not forever
    outer = requests.ConnectionError("outer")
    inner = OSError("inner", outer)
    outer.__cause__ = inner
    assert list(_causes(outer)) == [outer, inner]
