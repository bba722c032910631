"""The suite's own probes: scrape a metrics port over mTLS, or try it in plaintext.

:func:`scrape_mtls` does what the secure-metrics Prometheus does (present the scraper's
workload certificate, trust only the mesh root) and one thing Prometheus cannot: it
checks the server's exact SPIFFE identity. :func:`attempt_plaintext` tries plain HTTP
and says precisely how the port refused it, or that it served metrics.

Both classify every ending into a typed outcome instead of raising, so a check can
assert on "refused how?" as easily as on "served". Bad inputs (missing certificate
files, an unreadable root) raise :class:`~securemetrics_e2e.errors.UsageError`.
"""

from __future__ import annotations

import enum
import http.client
import ssl
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from requests.adapters import HTTPAdapter

from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.pki import OutputCerts
from securemetrics_e2e.spiffe import InvalidSpiffeId, SpiffeId
from securemetrics_e2e.svid import PeerFailure, PeerVerificationError, verify_peer

# The classic text format: what Prometheus 2.x asks Envoy and the agent for.
ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"
# Envoy's local reply when it cannot reach its upstream (here: a plaintext connection
# relayed to a TLS-only listener, which closes it).
ENVOY_UPSTREAM_RESET = "upstream connect error or disconnect/reset before headers"
_EXCERPT = 300


class MtlsOutcome(enum.StrEnum):
    """How an mTLS scrape ended."""

    OK = "ok"  # 2xx, body parsed as Prometheus text
    HTTP_ERROR = "http-error"  # an HTTP answer other than 2xx
    INVALID_METRICS = "invalid-metrics"  # 2xx, but the body is not Prometheus text
    HANDSHAKE_REJECTED = "handshake-rejected"  # the server refused our TLS (alert / reset)
    PEER_UNTRUSTED = "peer-untrusted"  # the server's chain does not lead to the mesh root
    PEER_IDENTITY_MISMATCH = "peer-identity-mismatch"  # trusted, but not the expected SPIFFE ID
    REFUSED = "refused"  # TCP connection refused
    CLOSED = "closed"  # TLS established, then closed without an HTTP response
    TIMEOUT = "timeout"


class PlaintextOutcome(enum.StrEnum):
    """How a plain-HTTP attempt on a metrics port ended."""

    REFUSED = "refused"  # TCP connection refused: nothing listens for this caller
    CLOSED = "closed"  # closed or reset with no HTTP response (a TLS-only listener)
    REJECTED_BY_PROXY = "rejected-by-proxy"  # Envoy 503 "upstream connect error ..."
    FORBIDDEN = "forbidden"  # 403, e.g. the agent's "Only requests from localhost ..."
    NOT_FOUND = "not-found"  # 404: an HTTP server, but nothing at this path
    OTHER_HTTP = "other-http"  # any other HTTP answer that carries no metrics
    SERVED = "served"  # 2xx with parseable metrics: the port is OPEN
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class ScrapeResult:
    """One mTLS scrape. ``families`` is filled only for OK.

    A 2xx body that does not parse as the Prometheus text format is its own outcome,
    INVALID_METRICS (not OK), with the parser's complaint in ``detail``: a secure port
    that answers with something other than metrics is a finding, not a pass.
    The ``peer_*`` fields describe the server's certificate whenever the handshake
    completed, whatever the outcome.
    """

    url: str
    outcome: MtlsOutcome
    detail: str
    elapsed_s: float
    status: int | None = None
    families: list[Metric] = field(default_factory=list, hash=False)
    peer_spiffe_id: SpiffeId | None = None
    peer_serial: int | None = None
    peer_not_before: datetime | None = None
    tls_version: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is MtlsOutcome.OK

    @property
    def metric_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.families)


@dataclass(frozen=True)
class PlaintextResult:
    """One plain-HTTP attempt. Only SERVED (a 2xx carrying at least one metric sample)
    means the port is open; every other answer, HTTP or not, leaves it ``protected``.
    """

    host: str
    port: int
    path: str
    outcome: PlaintextOutcome
    detail: str
    elapsed_s: float
    status: int | None = None
    body_excerpt: str = ""

    @property
    def protected(self) -> bool:
        """True unless the port served metrics in plaintext."""
        return self.outcome is not PlaintextOutcome.SERVED

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}{self.path}"


# --------------------------------------------------------------------------- mTLS


class _Handshake:
    """What the TLS handshake of one scrape established, recorded as it completes."""

    def __init__(self) -> None:
        self.done = False
        self.chain: list[x509.Certificate] = []
        self.version: str | None = None


def _presented_chain(sock: ssl.SSLSocket) -> list[x509.Certificate]:
    """The certificates the server presented, leaf first.

    Python 3.13 has ``SSLSocket.get_unverified_chain()``; 3.10-3.12 have the same method
    only on the private ``_sslobj``. Without either, only the leaf is known, and the
    intermediates come from the scraper's own chain (same mesh, same CA).
    """
    getter = getattr(sock, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(sock, "_sslobj", None), "get_unverified_chain", None)
    raw: Sequence[Any] = []
    if getter is not None:
        raw = getter() or []
    if not raw:
        leaf = sock.getpeercert(binary_form=True)
        raw = [leaf] if leaf else []
    # 3.13 returns DER bytes; the private 3.11 method returns objects whose default
    # public_bytes() is PEM text.
    return [
        x509.load_der_x509_certificate(c)
        if isinstance(c, bytes)
        else x509.load_pem_x509_certificate(c.public_bytes().encode("ascii"))
        for c in raw
    ]


def _recording_socket_class(handshake: _Handshake) -> type[ssl.SSLSocket]:
    # SSLContext.sslsocket_class is the documented hook for a custom SSLSocket; it lets
    # the probe see the handshake complete (and what the server presented) even when
    # requests later reports only a generic connection error.
    class RecordingSSLSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            handshake.done = True
            handshake.version = self.version()
            handshake.chain = _presented_chain(self)

        def sendall(self, data: Any, flags: int = 0) -> None:
            # With TLS 1.3 a server that rejects our certificate sends its alert after
            # our side of the handshake is done, and closes. If that close breaks our
            # request write, the alert is still unread: surface it instead of the EOF.
            try:
                super().sendall(data, flags)
            except OSError as exc:
                alert = _pending_alert(self)
                if alert is not None:
                    raise alert from exc
                raise

    return RecordingSSLSocket


def _pending_alert(sock: ssl.SSLSocket) -> ssl.SSLError | None:
    try:
        sock.recv(1)
    except ssl.SSLError as exc:
        return exc if "ALERT" in (exc.reason or "") else None
    except OSError:
        return None
    return None


class _ContextAdapter(HTTPAdapter):
    """An adapter whose TLS settings all come from one ``ssl.SSLContext``."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["ssl_context"] = self._context
        # Workload certificates name a SPIFFE URI, never the pod IP: there is no host
        # name to check. The identity is checked against the SPIFFE ID instead.
        pool_kwargs["assert_hostname"] = False
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # requests would add its public CA bundle to our context: trust the mesh root only.
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


def _load_roots(mesh_root: Path | bytes) -> list[x509.Certificate]:
    if isinstance(mesh_root, bytes):
        pem, what = mesh_root, "mesh_root (PEM bytes)"
    else:
        path = Path(mesh_root)
        if not path.is_file():
            raise UsageError(
                f"mesh root file {path} does not exist; pass the mesh's root-cert.pem "
                "(the OUTPUT_CERTS directory of the scraper) or its PEM bytes"
            )
        pem, what = path.read_bytes(), f"mesh root file {path}"
    try:
        roots = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise UsageError(f"{what} holds no PEM certificate: {exc}") from None
    return roots


def _client_context(
    client: OutputCerts | None, roots: Sequence[x509.Certificate], handshake: _Handshake
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # see _ContextAdapter: SPIFFE URI SANs, no IP SAN
    ctx.verify_mode = ssl.CERT_REQUIRED
    # OpenSSL's X509_STRICT adds web-PKI rules (e.g. an Authority Key Identifier on
    # every certificate) that Envoy does not apply to mesh peers; newer Pythons turn it
    # on in their default contexts. The path is judged again by pki.verify_peer.
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    # The roots as parsed, in DER: OpenSSL trusts exactly what identity_problem judges
    # against, whatever text surrounds the PEM blocks of the file (`openssl x509 -text`
    # output, a non-ASCII subject), which OpenSSL's PEM string input would refuse.
    ctx.load_verify_locations(cadata=b"".join(root.public_bytes(Encoding.DER) for root in roots))
    if client is not None:
        missing = [p for p in (client.cert_chain, client.key) if not Path(p).is_file()]
        if missing:
            raise UsageError(
                f"client certificate files missing: {', '.join(map(str, missing))}; the "
                "scraper's OUTPUT_CERTS are written by istio-agent once it has its "
                "certificate: wait for them (istio#10544)"
            )
        try:
            ctx.load_cert_chain(client.cert_chain, client.key)
        except ssl.SSLError as exc:
            raise UsageError(
                f"cannot load client certificate {client.cert_chain} with key {client.key}: "
                f"{exc}; do they belong together?"
            ) from None
    ctx.sslsocket_class = _recording_socket_class(handshake)
    return ctx


def _get(
    url: str, adapter: HTTPAdapter, timeout: float
) -> tuple[requests.Response | None, requests.RequestException | None, float]:
    """One GET of ``url`` through ``adapter``, never via an HTTP(S)_PROXY from the
    environment: the answer or the error, and the seconds it took."""
    started = time.monotonic()
    with requests.Session() as session:
        session.trust_env = False
        session.mount(url.split("://", 1)[0] + "://", adapter)
        try:
            answer = session.get(
                url, timeout=timeout, headers={"Accept": ACCEPT}, allow_redirects=False
            )
        except requests.RequestException as exc:
            return None, exc, time.monotonic() - started
    return answer, None, time.monotonic() - started


def leaf_facts(leaf: x509.Certificate | None) -> dict[str, Any]:
    """The ``peer_*`` fields of a :class:`ScrapeResult` from the server's leaf certificate
    (None: the server showed none)."""
    if leaf is None:
        return {}
    return {
        "peer_spiffe_id": spiffe_id_of(leaf),
        "peer_serial": leaf.serial_number,
        "peer_not_before": leaf.not_valid_before_utc,
    }


def scrape_mtls(
    url: str,
    *,
    client: OutputCerts | None,
    mesh_root: Path | bytes,
    expected_spiffe: SpiffeId | None,
    timeout: float = 3.0,
) -> ScrapeResult:
    """GET ``url`` over mutual TLS and classify the result.

    ``client`` is the scraper's certificate files (``None``: present no client
    certificate). The server's chain must lead to ``mesh_root`` (OpenSSL checks it in
    the handshake; host names are not checked), and then its certificate must carry
    exactly ``expected_spiffe`` (when given). A 2xx body must parse as Prometheus text.
    """
    roots = _load_roots(mesh_root)
    handshake = _Handshake()
    context = _client_context(client, roots, handshake)
    response, error, elapsed = _get(url, _ContextAdapter(context), timeout)

    peer = {
        "tls_version": handshake.version,
        **leaf_facts(handshake.chain[0] if handshake.chain else None),
    }
    status = response.status_code if response is not None else None

    def result(outcome: MtlsOutcome, detail: str, **extra: Any) -> ScrapeResult:
        return ScrapeResult(
            url=url,
            outcome=outcome,
            detail=detail,
            elapsed_s=elapsed,
            status=status,
            **peer,
            **extra,
        )

    if handshake.chain:
        intermediates = client.intermediates() if client is not None else []
        rejection = identity_problem(handshake.chain, roots, intermediates, expected_spiffe)
        if rejection is not None:
            return result(peer_outcome(rejection), rejection.reason)

    if response is None:
        assert error is not None
        outcome, detail = _classify_mtls_error(error, handshake, client is not None)
        return result(outcome, detail)

    if not 200 <= response.status_code < 300:
        return result(
            MtlsOutcome.HTTP_ERROR,
            f"HTTP {response.status_code}: {_excerpt(response.text)}",
        )
    try:
        families = _parse_metrics(response.text)
    except ValueError as exc:
        return result(
            MtlsOutcome.INVALID_METRICS,
            f"HTTP {response.status_code} but the body is not Prometheus text ({exc}): "
            f"{_excerpt(response.text)}",
        )
    return result(
        MtlsOutcome.OK,
        f"HTTP {response.status_code}, {len(families)} metric families",
        families=families,
    )


#: failures of the peer's chain itself, as opposed to a valid chain with the wrong identity
_TRUST_FAILURES = (PeerFailure.UNTRUSTED, PeerFailure.EXPIRED, PeerFailure.NOT_YET_VALID)


def peer_outcome(problem: PeerVerificationError) -> MtlsOutcome:
    """PEER_UNTRUSTED when the chain fails, PEER_IDENTITY_MISMATCH when the name does."""
    if problem.kind in _TRUST_FAILURES:
        return MtlsOutcome.PEER_UNTRUSTED
    return MtlsOutcome.PEER_IDENTITY_MISMATCH


def identity_problem(
    chain: list[x509.Certificate],
    roots: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    expected: SpiffeId | None,
) -> PeerVerificationError | None:
    """The reason the peer does not prove ``expected``, or None when it does.

    A root bundle may hold several roots (during root rotation): one that accepts the
    chain is enough. A wrong identity outranks "untrusted" in what is reported.
    """
    if expected is None:
        return None
    problems: list[PeerVerificationError] = []
    for root in roots:
        try:
            verify_peer(chain, root, expected, intermediates=intermediates)
        except PeerVerificationError as exc:
            problems.append(exc)
        else:
            return None
    return next((p for p in problems if p.kind not in _TRUST_FAILURES), problems[0])


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId:
        return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps (requests -> urllib3 -> ssl / socket)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [getattr(current, "reason", None), current.__cause__, current.__context__]
        linked += list(current.args)
        todo += [e for e in linked if isinstance(e, BaseException)]


def _is_timeout(causes: list[BaseException]) -> bool:
    return any(isinstance(e, (requests.Timeout, TimeoutError)) for e in causes)


def _classify_mtls_error(
    error: BaseException, handshake: _Handshake, presented_cert: bool
) -> tuple[MtlsOutcome, str]:
    causes = list(_causes(error))
    text = f"{type(error).__name__}: {error}"
    verify_error = next((e for e in causes if isinstance(e, ssl.SSLCertVerificationError)), None)
    if verify_error is not None:
        return (
            MtlsOutcome.PEER_UNTRUSTED,
            f"the server's certificate does not verify against the mesh root: "
            f"{verify_error.verify_message}",
        )
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return MtlsOutcome.REFUSED, "connection refused"
    if _is_timeout(causes):
        stage = "HTTP response" if handshake.done else "TLS handshake"
        return MtlsOutcome.TIMEOUT, f"timed out waiting for the {stage}: {text}"
    ssl_error = next((e for e in causes if isinstance(e, ssl.SSLError)), None)
    alert = getattr(ssl_error, "reason", None) or ""
    if ssl_error is not None and "ALERT" in alert:
        cert = "our client certificate" if presented_cert else "no client certificate"
        return (
            MtlsOutcome.HANDSHAKE_REJECTED,
            f"the server refused the TLS session with alert {alert} (we presented {cert})",
        )
    if not handshake.done:
        what = f"{ssl_error.reason}" if ssl_error is not None else text
        return (
            MtlsOutcome.HANDSHAKE_REJECTED,
            f"the connection failed during the TLS handshake: {what}",
        )
    # With TLS 1.3 the client finishes its handshake before the server has checked the
    # client certificate; a server that then drops the connection without an alert is
    # indistinguishable from one that accepted us and closed: both land here.
    return (
        MtlsOutcome.CLOSED,
        f"TLS ({handshake.version}) was established, then the connection ended without an "
        f"HTTP response: {text}",
    )


# --------------------------------------------------------------------------- plaintext


def attempt_plaintext(
    host: str, port: int, path: str = "/stats/prometheus", *, timeout: float = 2.0
) -> PlaintextResult:
    """Try ``GET http://host:port/path`` and classify how the port answered."""
    if not 0 < port < 65536:
        raise UsageError(f"port {port} is out of range; use 1-65535")
    if not path.startswith("/"):
        raise UsageError(f"path {path!r} must start with '/'")
    host = host.strip("[]")
    url = f"http://{_url_host(host)}:{port}{path}"
    response, error, elapsed = _get(url, HTTPAdapter(max_retries=0), timeout)

    def result(
        outcome: PlaintextOutcome, detail: str, status: int | None = None, body: str = ""
    ) -> PlaintextResult:
        return plaintext_result(host, port, path, elapsed, (outcome, detail), status, body)

    if response is None:
        assert error is not None
        causes = list(_causes(error))
        if any(isinstance(e, ConnectionRefusedError) for e in causes):
            return result(PlaintextOutcome.REFUSED, "connection refused")
        if _is_timeout(causes):
            return result(PlaintextOutcome.TIMEOUT, f"no answer within {timeout:g}s")
        return result(PlaintextOutcome.CLOSED, _closed_detail(causes, error))

    status, body = response.status_code, response.text
    outcome, detail = classify_http_answer(status, body)
    return result(outcome, detail, status, body)


def plaintext_result(
    host: str,
    port: int,
    path: str,
    elapsed: float,
    verdict: tuple[PlaintextOutcome, str],
    status: int | None = None,
    body: str = "",
) -> PlaintextResult:
    """A plain-HTTP attempt's result, as every prober reports it (``verdict``: the outcome
    and its detail; ``body``: the answer's, when there was one)."""
    return PlaintextResult(
        host=host,
        port=port,
        path=path,
        outcome=verdict[0],
        detail=verdict[1],
        elapsed_s=elapsed,
        status=status,
        body_excerpt=_excerpt(body),
    )


def classify_http_answer(status: int, body: str) -> tuple[PlaintextOutcome, str]:
    """What a plain-HTTP answer from a metrics port means (one rule for every prober).

    Only a 2xx carrying metric samples is SERVED; an Envoy's "upstream connect error"
    503 is a proxy refusing for the port; 403 is the agent's localhost-only answer.
    """
    if status == 503 and ENVOY_UPSTREAM_RESET in body:
        return (
            PlaintextOutcome.REJECTED_BY_PROXY,
            f"an Envoy in the path answered 503: {_excerpt(body)}",
        )
    if status == 403:
        return PlaintextOutcome.FORBIDDEN, f"HTTP 403: {_excerpt(body)}"
    if 200 <= status < 300:
        try:
            families = _parse_metrics(body)
        except ValueError:
            families = []
        samples = sum(len(f.samples) for f in families)
        if samples:
            return (
                PlaintextOutcome.SERVED,
                f"HTTP {status} with {len(families)} metric families ({samples} samples) "
                "in plaintext: the port is open",
            )
    if status == 404:
        return PlaintextOutcome.NOT_FOUND, f"HTTP 404: {_excerpt(body)}"
    return PlaintextOutcome.OTHER_HTTP, f"HTTP {status} without metrics: {_excerpt(body)}"


def _closed_detail(causes: list[BaseException], error: BaseException) -> str:
    # RemoteDisconnected is both a ConnectionResetError and a BadStatusLine: test it first.
    if any(isinstance(e, http.client.RemoteDisconnected) for e in causes):
        return "connection closed with no HTTP response"
    if any(isinstance(e, ConnectionResetError) for e in causes):
        return "connection reset with no HTTP response"
    bad = next((e for e in causes if isinstance(e, http.client.BadStatusLine)), None)
    if bad is not None:
        return f"the server answered something that is not HTTP: {str(bad)[:80]}"
    return f"no HTTP response: {type(error).__name__}: {error}"


# --------------------------------------------------------------------------- helpers


def _parse_metrics(body: str) -> list[Metric]:
    """Parse the Prometheus text format; raise ValueError naming what is wrong."""
    try:
        return list(text_string_to_metric_families(body))
    except (IndexError, KeyError, TypeError) as exc:  # the parser's other failure modes
        raise ValueError(f"{type(exc).__name__}: {exc}") from None


def _excerpt(body: str) -> str:
    body = body.strip()
    return body if len(body) <= _EXCERPT else body[:_EXCERPT] + "..."


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
