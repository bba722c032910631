"""The verified port-forward: is a forwarded port really answered, and the process handling.

``tls_answers`` runs against real loopback servers. The process handling runs a
stand-in for ``kubectl port-forward`` (a short Python script that prints kubectl's
"Forwarding from" line and relays to a real TLS server), because no cluster exists here.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

from securemetrics_e2e.cluster.forward import PortForward, tls_answers
from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.pki import MeshCA
from tests.tlsservers import HTTPServer, close_after_accept, closed_port, server_context


@pytest.fixture(scope="module")
def tls_ctx(tmp_path_factory: pytest.TempPathFactory) -> object:
    base = tmp_path_factory.mktemp("forward")
    ca = MeshCA.create()
    files = ca.issue("ns", "httpbin").write_output_certs(base)
    return server_context(files.cert_chain, files.key, client_root=files.root_cert)


def test_tls_answers(tls_ctx: object) -> None:
    with HTTPServer(tls=tls_ctx) as server:  # type: ignore[arg-type]
        assert tls_answers(server.port) is True  # refuses us for lack of a cert, but answers
    with close_after_accept() as dropped:
        assert tls_answers(dropped.port) is False
    with closed_port() as port:
        assert tls_answers(port) is False


STAND_IN = textwrap.dedent(
    """
    import socket, sys, threading
    target = int(sys.argv[-1])
    if target == 0:
        print("error: unable to forward port because pod is not running", file=sys.stderr)
        sys.exit(1)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(f"Forwarding from 127.0.0.1:{listener.getsockname()[1]} -> 15092", flush=True)

    def pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            b.close()

    while True:
        conn, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        threading.Thread(target=pipe, args=(conn, upstream), daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, conn), daemon=True).start()
    """
)


@pytest.fixture
def stand_in(tmp_path: Path) -> Path:
    script = tmp_path / "kubectl"
    script.write_text(f"#!{sys.executable}\n{STAND_IN}")
    script.chmod(0o755)
    return script


def _forward(stand_in: Path, target: int) -> PortForward:
    # the stand-in reads the upstream port from its last argument (":<port>" in kubectl)
    fwd = PortForward(str(stand_in), ["--context", "kind-x"], "ns", "httpbin-abc", 15092)
    fwd.argv[-1] = str(target)
    return fwd


def test_forward_starts_is_verified_and_stops_by_pid(stand_in: Path, tls_ctx: object) -> None:
    with HTTPServer(tls=tls_ctx) as server:  # type: ignore[arg-type]
        fwd = _forward(stand_in, server.port)
        port = fwd.start()
        try:
            assert fwd.local_port == port
            assert fwd.verified()
            pid = fwd._proc.pid if fwd._proc else 0
        finally:
            fwd.stop()
    assert not fwd.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_forward_to_a_port_nothing_serves_is_not_verified(stand_in: Path) -> None:
    with close_after_accept() as dropped:
        fwd = _forward(stand_in, dropped.port)
        fwd.start()
        try:
            assert fwd.alive()
            assert not fwd.verified()
        finally:
            fwd.stop()


def test_forward_that_cannot_start(stand_in: Path) -> None:
    fwd = _forward(stand_in, 0)
    with pytest.raises(EnvironmentProblem, match="pod is not running"):
        fwd.start(timeout=10)
    assert not fwd.alive()


def test_argv_is_kubectl_port_forward() -> None:
    fwd = PortForward("kubectl", ["--kubeconfig", "k", "--context", "c"], "ns1", "pod-1", 15091)
    assert fwd.argv == [
        "kubectl",
        "--kubeconfig",
        "k",
        "--context",
        "c",
        "port-forward",
        "--address",
        "127.0.0.1",
        "-n",
        "ns1",
        "pod/pod-1",
        ":15091",
    ]
