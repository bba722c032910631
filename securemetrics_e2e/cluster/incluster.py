"""Probes that run inside pods: curl in ``istio-proxy``, classified like the local probes.

The istio.io docs verify secure metrics with curl from the scraper's ``istio-proxy``
(``--cacert/--cert/--key`` from ``/etc/istio-certs``, ``--insecure`` because workload
certificates carry no IP SAN) and plaintext curl from the target's ``istio-proxy``.
These builders produce those command lines; the parsers turn curl's exit code, HTTP
status and the server chain (``%{certs}``, curl >= 7.88) into the same
:class:`~securemetrics_e2e.probe.ScrapeResult` / ``PlaintextResult`` the local backend
returns, so checks judge both alike.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from securemetrics_e2e.cluster.kube import ExecResult
from securemetrics_e2e.probe import (
    ACCEPT,
    MtlsOutcome,
    PlaintextOutcome,
    PlaintextResult,
    ScrapeResult,
    classify_http_answer,
    identity_problem,
    leaf_facts,
    peer_outcome,
    plaintext_result,
)
from securemetrics_e2e.spiffe import SpiffeId
from securemetrics_e2e.timeouts import CLUSTER

SCRAPER_CERTS = "/etc/istio-certs"
_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_EXCERPT = 300

# curl exit codes (man curl, EXIT CODES)
CURL_COULDNT_CONNECT = 7
CURL_TIMEOUT = 28
CURL_SSL_CONNECT = 35
CURL_EMPTY_REPLY = 52
CURL_SEND_ERROR = 55
CURL_RECV_ERROR = 56
CURL_LOCAL_CERT = 58


@dataclass(frozen=True)
class CurlCall:
    """A curl command line and the marker that separates the body from curl's trailer."""

    argv: list[str]
    marker: str


def _marker() -> str:
    return f"@@securemetrics-{secrets.token_hex(6)}@@"


def exec_timeout(request_timeout: float) -> float:
    """The bound of the exec that runs curl: the request's, and the exec's own round trip."""
    return max(30.0, request_timeout + 10.0)


def mtls_curl(
    url: str,
    *,
    certs_dir: str = SCRAPER_CERTS,
    client_cert: tuple[str, str] | None = ("cert-chain.pem", "key.pem"),
    timeout: float = CLUSTER.scrape_request,
) -> CurlCall:
    """GET ``url`` as the docs do: mesh root as CA, the scraper's cert, --insecure."""
    marker = _marker()
    argv = [
        "curl",
        "-sS",
        "--max-time",
        f"{timeout:g}",
        "--cacert",
        f"{certs_dir}/root-cert.pem",
        "--insecure",  # no IP SAN in workload certificates; the identity is checked below
        "-H",
        f"Accept: {ACCEPT}",
    ]
    if client_cert is not None:
        argv += [
            "--cert",
            f"{certs_dir}/{client_cert[0]}",
            "--key",
            f"{certs_dir}/{client_cert[1]}",
        ]
    argv += ["-o", "-", "-w", f"\n{marker}%{{http_code}}\n%{{certs}}", url]
    return CurlCall(argv, marker)


def plaintext_curl(url: str, *, timeout: float = CLUSTER.plaintext_request) -> CurlCall:
    marker = _marker()
    argv = ["curl", "-sS", "--max-time", f"{timeout:g}", "-H", f"Accept: {ACCEPT}"]
    argv += ["-o", "-", "-w", f"\n{marker}%{{http_code}}", url]
    return CurlCall(argv, marker)


def _split(result: ExecResult, marker: str) -> tuple[str, int | None, str]:
    """(body, HTTP status or None, trailer after the status line)."""
    if marker not in result.stdout:
        return result.stdout, None, ""
    body, _, trailer = result.stdout.rpartition(marker)
    body = body.removesuffix("\n")
    status_text, _, rest = trailer.partition("\n")
    try:
        status = int(status_text.strip() or 0) or None
    except ValueError:
        status = None
    return body, status, rest


def _excerpt(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _EXCERPT else text[:_EXCERPT] + "..."


def _families(body: str) -> list[Metric]:
    try:
        return list(text_string_to_metric_families(body))
    except (ValueError, IndexError, KeyError, TypeError):
        raise ValueError("not Prometheus text") from None


def peer_chain(trailer: str) -> list[x509.Certificate]:
    """The server's certificates from curl's ``%{certs}`` output, leaf first."""
    chain = []
    for block in _PEM.findall(trailer.encode()):
        try:
            chain.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            continue
    return chain


def parse_mtls(
    result: ExecResult,
    call: CurlCall,
    url: str,
    *,
    elapsed: float,
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    expected: SpiffeId | None,
    presented_cert: bool = True,
) -> ScrapeResult:
    """Classify an in-pod mTLS curl as :func:`securemetrics_e2e.probe.scrape_mtls` would."""
    body, status, trailer = _split(result, call.marker)
    chain = peer_chain(trailer)
    leaf = chain[0] if chain else None

    def done(
        outcome: MtlsOutcome, detail: str, families: list[Metric] | None = None
    ) -> ScrapeResult:
        return ScrapeResult(
            url=url,
            outcome=outcome,
            detail=detail,
            elapsed_s=elapsed,
            status=status,
            families=families or [],
            **leaf_facts(leaf),
        )

    if chain and expected is not None and roots:
        problem = identity_problem(chain, roots, intermediates, expected)
        if problem is not None:
            return done(peer_outcome(problem), problem.reason)
    code, err = result.exit_code, result.stderr.strip()
    if code != 0:
        return done(*_mtls_failure(code, err, presented_cert))
    if status is None or not 200 <= status < 300:
        return done(MtlsOutcome.HTTP_ERROR, f"HTTP {status}: {_excerpt(body)}")
    try:
        families = _families(body)
    except ValueError:
        return done(
            MtlsOutcome.INVALID_METRICS,
            f"HTTP {status} but the body is not Prometheus text: {_excerpt(body)}",
        )
    return done(
        MtlsOutcome.OK, f"HTTP {status}, {len(families)} metric families", families=families
    )


def _mtls_failure(code: int, err: str, presented_cert: bool) -> tuple[MtlsOutcome, str]:
    said = f"curl exit {code}: {_excerpt(err)}"
    lowered = err.lower()
    if code == CURL_COULDNT_CONNECT:
        if "refused" in lowered or not lowered:
            return MtlsOutcome.REFUSED, "connection refused"
        return MtlsOutcome.REFUSED, said
    if code == CURL_TIMEOUT:
        return MtlsOutcome.TIMEOUT, said
    cert = "a client certificate" if presented_cert else "no client certificate"
    if code == CURL_SSL_CONNECT or "alert" in lowered or "certificate required" in lowered:
        return (
            MtlsOutcome.HANDSHAKE_REJECTED,
            f"the server refused the TLS session ({cert}): {said}",
        )
    if code in (CURL_SEND_ERROR, CURL_RECV_ERROR):
        # Under TLS 1.3 the server judges the client certificate after the client has
        # finished its side of the handshake: a refusal arrives as an alert or, racing
        # it, as a reset of the connection before any HTTP response.
        return (
            MtlsOutcome.HANDSHAKE_REJECTED,
            f"the server ended the TLS session before any HTTP response ({cert}): {said}",
        )
    if code == CURL_LOCAL_CERT:
        return MtlsOutcome.HANDSHAKE_REJECTED, f"the client certificate files are unusable: {said}"
    return MtlsOutcome.CLOSED, said


def parse_plaintext(
    result: ExecResult, call: CurlCall, host: str, port: int, path: str, *, elapsed: float
) -> PlaintextResult:
    """Classify an in-pod plaintext curl as :func:`securemetrics_e2e.probe.attempt_plaintext`."""
    body, status, _ = _split(result, call.marker)
    code, err = result.exit_code, result.stderr.strip()

    def done(outcome: PlaintextOutcome, detail: str) -> PlaintextResult:
        answer = body if status else ""
        return plaintext_result(host, port, path, elapsed, (outcome, detail), status, answer)

    if code == CURL_COULDNT_CONNECT:
        return done(PlaintextOutcome.REFUSED, "connection refused")
    if code == CURL_TIMEOUT:
        return done(PlaintextOutcome.TIMEOUT, f"no answer: curl exit {code}: {_excerpt(err)}")
    if code == CURL_EMPTY_REPLY:
        return done(PlaintextOutcome.CLOSED, "connection closed with no HTTP response")
    if code == CURL_RECV_ERROR:
        return done(
            PlaintextOutcome.CLOSED, f"connection reset with no HTTP response ({_excerpt(err)})"
        )
    if code != 0 or status is None:
        return done(PlaintextOutcome.CLOSED, f"no HTTP response: curl exit {code}: {_excerpt(err)}")
    return done(*classify_http_answer(status, body))
