"""A small threaded HTTP server bound inside a pod's network, started and stopped cleanly."""

from __future__ import annotations

import errno
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.local.netns import Pod


class QuietHandler(BaseHTTPRequestHandler):
    """Request handler that does not write an access log line per request to stderr."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return

    def send_text(self, status: int, body: str, content_type: str = "text/plain") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # a peer that hangs up mid-request (Prometheus during teardown) is not an error
        # worth a traceback on the suite's output
        return


class PodHTTPServer:
    """``handler`` served on ``address:port`` inside ``pod``; :meth:`close` stops it."""

    def __init__(self, pod: Pod, address: str, port: int, handler: type[QuietHandler], what: str):
        self.pod = pod
        self.what = what

        def bind() -> ThreadingHTTPServer:
            return _Server((address, port), handler)

        try:
            self._server = pod.call(bind)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EnvironmentProblem(
                    f"{what} cannot listen on {address}:{port} in pod {pod.name}: address in use"
                ) from None
            raise
        # a short poll interval: shutdown() waits up to one interval, once per server
        pod.start_thread(lambda: self._server.serve_forever(poll_interval=0.05), what)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
