"""Kubeconfig and API-server error paths: clear errors within 5 s, on real sockets.

Nothing here fakes Kubernetes: a closed loopback port stands for a dead API server, and
a real TLS server with a certificate the kubeconfig does not trust stands for "something
answers, but not the cluster you meant".
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securemetrics_e2e.cluster.errors import ClusterUnreachable, KubeconfigInvalid
from securemetrics_e2e.cluster.kube import KubernetesAPI, connect
from securemetrics_e2e.cluster.kubeconfig import read_kubeconfig
from securemetrics_e2e.errors import SecureMetricsError
from securemetrics_e2e.pki import MeshCA
from tests.tlsservers import closed_port


def _kubeconfig(path: Path, server: str, **user: Any) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "vendor",
                "clusters": [
                    {"name": "c1", "cluster": {"server": server, **user.pop("cluster", {})}}
                ],
                "contexts": [{"name": "vendor", "context": {"cluster": "c1", "user": "u1"}}],
                "users": [{"name": "u1", "user": user or {"token": "t0ken"}}],
            }
        )
    )
    return path


def _quick(exc_type: type[SecureMetricsError], call: Any) -> SecureMetricsError:
    """The clear error ``call`` raises. Quick by construction, not by a wall clock (which
    on a loaded machine times the imports): file errors touch no network, a closed port
    refuses at once, and a server that answers is tried once plus one retry (counted by
    the server in test_something_answers_but_not_the_cluster)."""
    with pytest.raises(exc_type) as caught:
        call()
    # raised "from None": a user sees one message, not a chain of library tracebacks
    assert caught.value.__suppress_context__ or caught.value.__context__ is None
    return caught.value


def test_missing_file(tmp_path: Path) -> None:
    err = _quick(KubeconfigInvalid, lambda: connect(tmp_path / "nope", None))
    assert str(tmp_path / "nope") in str(err)
    assert "does not exist" in str(err)


def test_kubeconfig_that_does_not_parse(tmp_path: Path) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nclusters:\n  - name: [unclosed\ncontexts: []\n")
    err = _quick(KubeconfigInvalid, lambda: connect(bad, None))
    assert str(bad) in str(err)
    assert "not valid YAML at line" in str(err)


def test_yaml_that_is_not_a_kubeconfig(tmp_path: Path) -> None:
    odd = tmp_path / "values.yaml"
    odd.write_text("replicas: 3\n")
    err = _quick(KubeconfigInvalid, lambda: connect(odd, None))
    assert "not a kubeconfig" in str(err)


def test_unknown_context_lists_the_known_ones(tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443")
    err = _quick(KubeconfigInvalid, lambda: connect(config, "prod"))
    assert "context 'prod' is not in kubeconfig" in str(err)
    assert "contexts there: vendor" in str(err)


def test_context_chosen_and_server_read(tmp_path: Path) -> None:
    config = _kubeconfig(tmp_path / "kc", "https://10.0.0.1:6443")
    info = read_kubeconfig(config, None)
    assert (info.context, info.cluster, info.server) == ("vendor", "c1", "https://10.0.0.1:6443")


def test_kubeconfig_list_skips_missing_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _kubeconfig(tmp_path / "kc", "https://10.0.0.2:6443")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{real}")
    assert read_kubeconfig(None, None).server == "https://10.0.0.2:6443"


def test_unreachable_api_server(tmp_path: Path) -> None:
    with closed_port() as port:
        config = _kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{port}")
        err = _quick(ClusterUnreachable, lambda: connect(config, None))
    assert f"https://127.0.0.1:{port} is unreachable" in str(err)
    assert "context 'vendor'" in str(err)


def _server_cert(directory: Path, ca: MeshCA) -> tuple[Path, Path]:
    """An API-server-like certificate: signed by ``ca``'s root, IP SAN 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca.root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca.root_key, hashes.SHA256())
    )
    directory.mkdir()
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, list[dict[str, Any]], MeshCA]]:
    """A real HTTPS server on loopback that records each request's path, headers and cert."""
    ca = MeshCA.create()
    cert_path, key_path = _server_cert(tmp_path / "server", ca)
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_pem)
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            cert = self.connection.getpeercert(binary_form=True)
            seen.append(
                {"path": self.path, "auth": self.headers.get("Authorization"), "cert": cert}
            )
            body = b'{"status":"success","data":{"activeTargets":[]}}'
            self.send_response(200 if "/proxy/" in self.path else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class CountingServer(ThreadingHTTPServer):
        def get_request(self) -> Any:
            seen.append({"connection": True})  # every accepted TCP connection, TLS or not
            return super().get_request()

    httpd = CountingServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cafile=root)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], seen, ca
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_something_answers_but_not_the_cluster(
    tmp_path: Path, tls_server: tuple[int, list[dict[str, Any]], MeshCA]
) -> None:
    port, seen, _ = tls_server
    config = _kubeconfig(tmp_path / "kc", f"https://127.0.0.1:{port}")  # CA not trusted
    err = _quick(ClusterUnreachable, lambda: connect(config, None))
    assert "accepted a connection but /version failed" in str(err)
    assert "certificate" in str(err)
    # the TCP reachability probe, one /version attempt and one retry (KubernetesAPI sets
    # retries=1), then the error: a bounded number of tries, each under connect's timeouts
    assert len([s for s in seen if "connection" in s]) == 3


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_service_proxy_session_carries_kubeconfig_credentials(
    tmp_path: Path, tls_server: tuple[int, list[dict[str, Any]], MeshCA]
) -> None:
    port, seen, ca = tls_server
    client = ca.issue("kube-system", "admin")
    config = _kubeconfig(
        tmp_path / "kc",
        f"https://127.0.0.1:{port}",
        cluster={"certificate-authority-data": _b64(client.root_pem())},
        token="s3cret-token",
        **{
            "client-certificate-data": _b64(client.cert_chain_pem()),
            "client-key-data": _b64(client.key_pem()),
        },
    )
    api = KubernetesAPI(read_kubeconfig(config, None))
    try:
        url = api.service_proxy_url("sm-scraper-abc", "prometheus", 9090)
        assert url == (
            f"https://127.0.0.1:{port}/api/v1/namespaces/sm-scraper-abc/services/"
            "prometheus:9090/proxy"
        )
        response = api.http_session().get(f"{url}/api/v1/targets", timeout=5)
    finally:
        api.close()
    assert response.status_code == 200
    requests = [s for s in seen if "path" in s]
    assert requests[-1]["path"] == (
        "/api/v1/namespaces/sm-scraper-abc/services/prometheus:9090/proxy/api/v1/targets"
    )
    assert requests[-1]["auth"] == "Bearer s3cret-token"
    assert requests[-1]["cert"] is not None  # the client certificate was presented
