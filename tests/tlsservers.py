"""Real socket servers on loopback for the probe and Prometheus tests.

Each server binds port 0 on a loopback address, runs in daemon threads, and is a
context manager that always stops it and closes every socket it accepted.
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self

METRICS_BODY = (
    "# HELP envoy_server_live Whether the server is live\n"
    "# TYPE envoy_server_live gauge\n"
    "envoy_server_live{} 1\n"
    "# TYPE istio_requests_total counter\n"
    'istio_requests_total{response_code="200"} 7\n'
)
ENVOY_503_BODY = (
    "upstream connect error or disconnect/reset before headers. "
    "reset reason: connection termination"
)
AGENT_403_BODY = "Only requests from localhost are allowed\n"

# Per-connection socket timeout: handler threads never outlive a stalled client by much.
_CONNECTION_TIMEOUT = 5.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Reply:
    status: int
    body: str
    content_type: str = "text/plain; version=0.0.4"
    server: str = "tlsservers"
    location: str = ""  # a Location header (a redirect), when set


METRICS = Reply(200, METRICS_BODY)
ENVOY_503 = Reply(503, ENVOY_503_BODY, content_type="text/plain", server="envoy")
AGENT_403 = Reply(403, AGENT_403_BODY, content_type="text/plain")
NOT_FOUND = Reply(404, "404 page not found\n", content_type="text/plain")


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer

    def do_GET(self) -> None:
        reply = self.server.routes.get(self.path.split("?")[0], self.server.default)
        body = reply.body.encode()
        self.server.paths.append(self.path)
        self.server.accepts.append(self.headers.get("Accept"))
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        if reply.location:
            self.send_header("Location", reply.location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def version_string(self) -> str:
        return self.server.default.server

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        host: str,
        default: Reply,
        routes: dict[str, Reply],
        tls: ssl.SSLContext | None,
    ) -> None:
        self.address_family = _family(host)
        self.default = default
        self.routes = routes
        self.tls = tls
        self.paths: list[str] = []
        self.accepts: list[str | None] = []  # the Accept header of each request
        self.handshake_errors: list[str] = []
        self.peer_certs: list[bytes | None] = []
        super().__init__((host, 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(_CONNECTION_TIMEOUT)
        if self.tls is not None:
            # The handshake runs here, in the connection's own thread, so a client that
            # stalls or fails its handshake never blocks the accept loop.
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.handshake_errors.append(f"{type(exc).__name__}: {exc}")
                return
            self.peer_certs.append(request.getpeercert(binary_form=True))
        super().finish_request(request, client_address)


class HTTPServer:
    """An HTTP(S) server answering ``routes`` (path -> Reply), else ``default``."""

    def __init__(
        self,
        default: Reply = METRICS,
        *,
        routes: dict[str, Reply] | None = None,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self._server = _HTTPServer(host, default, dict(routes or {}), tls)
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def handshake_errors(self) -> list[str]:
        return self._server.handshake_errors

    @property
    def peer_certs(self) -> list[bytes | None]:
        return self._server.peer_certs

    @property
    def paths(self) -> list[str]:
        return self._server.paths

    @property
    def accepts(self) -> list[str | None]:
        return self._server.accepts

    def url(self, path: str = "/stats/prometheus") -> str:
        scheme = "https" if self._server.tls is not None else "http"
        return f"{scheme}://{url_host(self.host)}:{self.port}{path}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _RawServer(socketserver.ThreadingTCPServer):
    daemon_threads = True

    def __init__(self, host: str, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.address_family = _family(host)
        super().__init__((host, 0), handler)


class RawServer:
    """A TCP server that accepts and then closes at once, never answers, (``garbage``,
    over TLS) writes bytes that are no TLS record under its session and closes, or
    (``endless-line``) answers one line longer than any HTTP client reads, and closes,
    or (``reset``) resets the connection once the peer has sent its first bytes."""

    def __init__(
        self, *, mode: str, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None
    ) -> None:
        modes = ("close", "silent", "garbage", "endless-line", "reset")
        if mode not in modes:
            raise ValueError(f"mode must be one of {modes}, not {mode!r}")
        self.host = host
        self.connections = 0  # accepted TCP connections
        self.handshakes = 0
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                conn.settimeout(_CONNECTION_TIMEOUT)
                with outer._lock:
                    outer.connections += 1
                if mode == "reset":  # SO_LINGER 0: close() sends RST, not FIN
                    # after the peer's first bytes (a request, a ClientHello): an RST
                    # before them raced the peer's write, which then failed with a broken
                    # pipe ("closed") instead of the reset (1 run in 10 under load)
                    with contextlib.suppress(OSError):
                        conn.recv(1)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    return
                if tls is not None:
                    # Complete the TLS handshake first: the peer sees an established
                    # session that then closes (or stays silent) with no HTTP response.
                    try:
                        conn = tls.wrap_socket(conn, server_side=True)
                    except (ssl.SSLError, OSError):
                        return
                    with outer._lock:
                        outer.handshakes += 1
                    if mode == "garbage":
                        # beside the TLS layer, on the TCP connection itself
                        with socket.socket(fileno=os.dup(conn.fileno())) as tcp:
                            tcp.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
                    if mode in ("close", "garbage"):
                        conn.close()
                        return
                if mode == "endless-line":
                    conn.sendall(b"x" * 70_000)  # http.client reads at most 65,536
                    conn.close()
                    return
                if mode == "silent":
                    with outer._lock:
                        outer._held.append(conn)
                    outer._stopping.wait()

        self._server = _RawServer(host, Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in self._held:
                conn.close()
        self._thread.join(timeout=5)


def close_after_accept(host: str = "127.0.0.1") -> RawServer:
    """Accepts each connection and closes it without reading or writing."""
    return RawServer(mode="close", host=host)


def close_after_handshake(tls: ssl.SSLContext, host: str = "127.0.0.1") -> RawServer:
    """Completes the TLS handshake of each connection, then closes it without a response."""
    return RawServer(mode="close", host=host, tls=tls)


def silent(host: str = "127.0.0.1") -> RawServer:
    """Accepts each connection and never answers (until the server stops)."""
    return RawServer(mode="silent", host=host)


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port nothing listens on: bound but not listening, so no one else takes it meanwhile.

    Linux answers a SYN to a bound, non-listening TCP socket with RST: connection refused.
    """
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


def server_context(
    cert_chain: Path,
    key: Path,
    *,
    client_root: Path | None = None,
    require_client_cert: bool = True,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A server TLS context presenting ``cert_chain``; verifying clients against ``client_root``.

    ``require_client_cert`` mirrors Envoy's ``require_client_certificate: true``.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_chain, key)
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    if client_root is not None:
        ctx.load_verify_locations(cafile=client_root)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


@contextlib.contextmanager
def envoy_tls_server(
    cert_chain: Path, key: Path, client_root: Path, work: Path, body: str = METRICS_BODY
) -> Iterator[int]:
    """A real Envoy (the local backend's binary) serving ``body`` over mutual TLS on a
    loopback port, as Istio's secure metrics listener does: ``cert_chain`` presented,
    client certificates required and checked against ``client_root``. Yields the port;
    the process is stopped by its PID on exit."""
    import json
    import subprocess

    from securemetrics_e2e.local.envoy import envoy_binary
    from securemetrics_e2e.waiting import wait_for

    with closed_port() as port:
        pass  # free again: Envoy binds it (a port nobody else was handed meanwhile)
    tls = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
        "DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(cert_chain)},
                    "private_key": {"filename": str(key)},
                }
            ],
            "validation_context": {"trusted_ca": {"filename": str(client_root)}},
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "secure",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "stats",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": body}},
                            "response_headers_to_add": [
                                {"header": {"key": "content-type", "value": METRICS.content_type}}
                            ],
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    listener = {
        "name": f"127.0.0.1_{port}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ],
                "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
            }
        ],
    }
    config = work / "envoy.json"
    config.write_text(json.dumps({"static_resources": {"listeners": [listener]}}))
    log = (work / "envoy.log").open("wb")
    proc = subprocess.Popen(
        [envoy_binary(), "--config-path", str(config), "--disable-hot-restart",
         "--concurrency", "1", "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def listening() -> None:
            if proc.poll() is not None:
                log_text = (work / "envoy.log").read_text()
                raise RuntimeError(f"envoy exited {proc.returncode}: {log_text}")
            socket.create_connection(("127.0.0.1", port), 0.2).close()  # OSError: not yet

        wait_for(f"envoy listening on 127.0.0.1:{port}", listening, timeout=20.0)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
