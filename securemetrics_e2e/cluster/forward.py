"""A ``kubectl port-forward`` that is checked before it is trusted.

pytest-kind-ng's helper restarts a forward on a random port in a loop and sleeps; this
one lets kubectl pick a free local port, reads which from its output, and then checks
that the forward really reaches the pod's port: a TLS ClientHello must get an answer
(a ServerHello or an alert). A forward that accepts locally and then drops the
connection ("connection refused" inside the pod) is reported as unreachable instead of
being mistaken for a port that closes connections.
"""

from __future__ import annotations

import collections
import re
import socket
import ssl
import subprocess
import threading
from collections.abc import Sequence
from typing import IO

from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

_FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) ->")


def tls_answers(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> bool:
    """True when something behind ``host:port`` answers a TLS ClientHello.

    No certificate is checked and none is presented: any server reply, even an alert
    refusing us, proves bytes flow end to end. A connection closed or reset before any
    reply is False.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=None) as tls,
        ):
            return tls.version() is not None
    except ssl.SSLError as exc:
        # An alert from the peer means it spoke TLS to us; an EOF means nobody did.
        return "EOF" not in type(exc).__name__ and "EOF" not in str(exc)
    except OSError:
        return False


class PortForward:
    """``kubectl port-forward pod/<pod> :<port>`` on 127.0.0.1, stopped by PID."""

    def __init__(
        self, kubectl: str, target_args: Sequence[str], namespace: str, pod: str, port: int
    ) -> None:
        self.namespace, self.pod, self.port = namespace, pod, port
        self.argv = [
            kubectl,
            *target_args,
            "port-forward",
            "--address",
            "127.0.0.1",
            "-n",
            namespace,
            f"pod/{pod}",
            f":{port}",
        ]
        self.local_port: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._out: collections.deque[str] = collections.deque(maxlen=50)
        self._err: collections.deque[str] = collections.deque(maxlen=50)

    def start(self, timeout: float = 20.0) -> int:
        """Start kubectl and wait for its "Forwarding from" line; return the local port."""
        self._proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for stream, sink in ((self._proc.stdout, self._out), (self._proc.stderr, self._err)):
            threading.Thread(target=_drain, args=(stream, sink), daemon=True).start()

        def forwarding() -> int:
            for line in list(self._out):
                match = _FORWARDING.search(line)
                if match:
                    return int(match.group(1))
            if self._proc is not None and self._proc.poll() is not None:
                raise _Exited(self._proc.returncode)
            raise NotYet("kubectl has not reported a forwarded port yet")

        try:
            self.local_port = wait_for(
                f"kubectl port-forward to {self.namespace}/{self.pod}:{self.port}",
                forwarding,
                timeout=timeout,
            )
        except (_Exited, WaitTimeout) as exc:
            self.stop()
            raise EnvironmentProblem(
                f"kubectl port-forward to pod {self.pod} port {self.port} in {self.namespace} "
                f"did not start ({exc}): {self.stderr_tail() or 'no output'}"
            ) from None
        return self.local_port

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def verified(self) -> bool:
        """The forward process runs and the pod's port answers TLS through it."""
        return self.alive() and self.local_port is not None and tls_answers(self.local_port)

    def stderr_tail(self) -> str:
        return " | ".join(line.strip() for line in list(self._err)[-5:] if line.strip())

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


class _Exited(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"kubectl exited with {code}")


def _drain(stream: IO[str] | None, sink: collections.deque[str]) -> None:
    if stream is None:
        return
    try:
        for line in stream:
            sink.append(line)
    except (OSError, ValueError):  # closed while reading, at stop()
        return
