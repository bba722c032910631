"""The in-pod curl probes, run with this machine's real curl against real loopback servers.

The cluster backend runs exactly these command lines in ``istio-proxy``; here they run
locally, with the scraper's OUTPUT_CERTS files written by the project's mesh CA, so the
classification is proven on curl's real exit codes, status trailer and ``%{certs}``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509

from securemetrics_e2e.cluster.incluster import (
    CurlCall,
    mtls_curl,
    parse_mtls,
    parse_plaintext,
    plaintext_curl,
)
from securemetrics_e2e.cluster.kube import ExecResult
from securemetrics_e2e.pki import MeshCA, OutputCerts
from securemetrics_e2e.probe import MtlsOutcome, PlaintextOutcome, PlaintextResult, ScrapeResult
from securemetrics_e2e.spiffe import SpiffeId
from tests.tlsservers import (
    AGENT_403,
    ENVOY_503,
    METRICS,
    NOT_FOUND,
    HTTPServer,
    Reply,
    closed_port,
    server_context,
)

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@dataclass
class Mesh:
    ca: MeshCA
    scraper: OutputCerts
    server: OutputCerts
    server_id: SpiffeId


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    base = tmp_path_factory.mktemp("incluster")
    ca = MeshCA.create()
    scraper = ca.issue("sm-scraper", "prometheus").write_output_certs(base / "scraper")
    server_identity = ca.issue("sm-native-sidecar", "httpbin")
    server = server_identity.write_output_certs(base / "server")
    return Mesh(ca, scraper, server, server_identity.spiffe_id)


@pytest.fixture
def mtls_server(mesh: Mesh) -> Iterator[HTTPServer]:
    ctx = server_context(mesh.server.cert_chain, mesh.server.key, client_root=mesh.server.root_cert)
    with HTTPServer(METRICS, routes={"/missing": NOT_FOUND}, tls=ctx) as server:
        yield server


def _run(call: CurlCall) -> tuple[ExecResult, float]:
    started = time.monotonic()
    done = subprocess.run(call.argv, capture_output=True, text=True, timeout=30, check=False)
    return ExecResult(done.stdout, done.stderr, done.returncode), time.monotonic() - started


def _scrape(
    mesh: Mesh,
    url: str,
    *,
    expected: SpiffeId | None,
    client: bool = True,
    roots: list[x509.Certificate] | None = None,
) -> ScrapeResult:
    call = mtls_curl(
        url,
        certs_dir=str(mesh.scraper.directory),
        client_cert=("cert-chain.pem", "key.pem") if client else None,
    )
    result, elapsed = _run(call)
    return parse_mtls(
        result,
        call,
        url,
        elapsed=elapsed,
        roots=roots if roots is not None else [mesh.scraper.root()],
        intermediates=mesh.scraper.intermediates(),
        expected=expected,
        presented_cert=client,
    )


def test_mtls_scrape_ok_with_the_peer_identity(mesh: Mesh, mtls_server: HTTPServer) -> None:
    url = mtls_server.url("/stats/prometheus")
    result = _scrape(mesh, url, expected=mesh.server_id)
    assert result.outcome is MtlsOutcome.OK, result.detail
    assert result.status == 200
    assert {f.name for f in result.families} >= {"envoy_server_live", "istio_requests"}
    assert result.peer_spiffe_id == mesh.server_id
    assert result.url == url
    assert mtls_server.peer_certs[-1] is not None  # the scraper's certificate was presented


def test_mtls_wrong_identity_and_foreign_root(mesh: Mesh, mtls_server: HTTPServer) -> None:
    url = mtls_server.url()
    other = SpiffeId.for_workload("cluster.local", "elsewhere", "httpbin")
    wrong = _scrape(mesh, url, expected=other)
    assert wrong.outcome is MtlsOutcome.PEER_IDENTITY_MISMATCH
    assert str(other) in wrong.detail
    foreign = MeshCA.create()
    untrusted = _scrape(mesh, url, expected=mesh.server_id, roots=[foreign.root_cert])
    assert untrusted.outcome is MtlsOutcome.PEER_UNTRUSTED


def test_mtls_without_client_certificate_is_rejected(mesh: Mesh, mtls_server: HTTPServer) -> None:
    result = _scrape(mesh, mtls_server.url(), expected=mesh.server_id, client=False)
    assert result.outcome is MtlsOutcome.HANDSHAKE_REJECTED, result.detail
    assert "no client certificate" in result.detail


def test_mtls_http_error_and_refused(mesh: Mesh, mtls_server: HTTPServer) -> None:
    missing = _scrape(mesh, mtls_server.url("/missing"), expected=mesh.server_id)
    assert missing.outcome is MtlsOutcome.HTTP_ERROR
    assert missing.status == 404
    with closed_port() as port:
        refused = _scrape(mesh, f"https://127.0.0.1:{port}/stats/prometheus", expected=None)
    assert refused.outcome is MtlsOutcome.REFUSED


def _plain(url: str, port: int, path: str = "/stats/prometheus") -> PlaintextResult:
    call = plaintext_curl(url)
    result, elapsed = _run(call)
    return parse_plaintext(result, call, "127.0.0.1", port, path, elapsed=elapsed)


def test_plaintext_to_a_tls_only_port_is_closed(mtls_server: HTTPServer) -> None:
    result = _plain(f"http://127.0.0.1:{mtls_server.port}/stats/prometheus", mtls_server.port)
    assert result.outcome is PlaintextOutcome.CLOSED, result.detail
    assert result.protected


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        (METRICS, PlaintextOutcome.SERVED),
        (AGENT_403, PlaintextOutcome.FORBIDDEN),
        (ENVOY_503, PlaintextOutcome.REJECTED_BY_PROXY),
        (NOT_FOUND, PlaintextOutcome.NOT_FOUND),
    ],
)
def test_plaintext_answers(reply: Reply, outcome: PlaintextOutcome) -> None:
    with HTTPServer(reply) as server:
        result = _plain(server.url(), server.port)
    assert result.outcome is outcome, result.detail
    assert result.protected is (outcome is not PlaintextOutcome.SERVED)


def test_plaintext_refused() -> None:
    with closed_port() as port:
        result = _plain(f"http://127.0.0.1:{port}/stats/prometheus", port)
    assert result.outcome is PlaintextOutcome.REFUSED


def test_status_trailer_is_the_last_marker() -> None:
    call = plaintext_curl("http://127.0.0.1:1/")
    fake_stdout = f"metric 1\n{call.marker}999\nmore\n{call.marker}200"
    result = parse_plaintext(ExecResult(fake_stdout, "", 0), call, "127.0.0.1", 1, "/", elapsed=0.0)
    assert result.status == 200
