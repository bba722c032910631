"""The mesh CA, workload identity files, and peer verification, checked with real tools.

Chain validity is checked with ``openssl verify -x509_strict`` and with real TLS handshakes
between Python ``ssl`` servers and clients on 127.0.0.1 using the files the module writes.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.pki import (
    InvalidSpiffeId,
    KeyType,
    MeshCA,
    OutputCerts,
    PeerFailure,
    PeerVerificationError,
    PrivateKey,
    SpiffeId,
    WorkloadIdentity,
    atomic_write,
    verify_peer,
)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl binary not on PATH")
IO_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA.create()


@pytest.fixture(scope="module")
def foreign_ca() -> MeshCA:
    return MeshCA.create()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- certificate shape


def test_issued_leaf_has_the_istio_workload_shape(ca: MeshCA) -> None:
    ident = ca.issue("default", "httpbin")
    cert = ident.cert
    assert str(ident.spiffe_id) == "spiffe://cluster.local/ns/default/sa/httpbin"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(ident.spiffe_id)]
    assert san.value.get_values_for_type(x509.DNSName) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_encipherment  # EC keys do no key transport
    assert not usage.key_cert_sign
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    assert isinstance(ident.key, ec.EllipticCurvePrivateKey)
    assert ident.chain == (cert, ca.intermediate_cert)
    assert ident.root_cert == ca.root_cert
    cert.verify_directly_issued_by(ca.intermediate_cert)
    ca.intermediate_cert.verify_directly_issued_by(ca.root_cert)
    assert ident.lifetime == timedelta(hours=24)
    assert ident.not_after - ident.not_before == timedelta(hours=24)
    assert abs(ident.not_before - datetime.now(UTC)) < timedelta(minutes=1)


def test_rsa_leaf_adds_key_encipherment() -> None:
    rsa_ca = MeshCA.create("example.org", key_type=KeyType.RSA_2048)
    ident = rsa_ca.issue("ns", "sa")
    assert isinstance(ident.key, rsa.RSAPrivateKey)
    usage = ident.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment
    assert verify_peer(list(ident.chain), rsa_ca.root_cert, ident.spiffe_id) == ident.spiffe_id


def test_serials_are_unique_and_pem_round_trips(ca: MeshCA) -> None:
    idents = [ca.issue("ns", f"sa-{i}") for i in range(10)]
    assert len({i.serial for i in idents}) == 10
    ident = idents[0]
    assert x509.load_pem_x509_certificates(ident.cert_chain_pem()) == list(ident.chain)
    assert x509.load_pem_x509_certificate(ident.root_pem()) == ca.root_cert
    assert ca.root_pem == ident.root_pem()
    key = serialization.load_pem_private_key(ident.key_pem(), password=None)
    assert key.public_key() == ident.key.public_key()


def test_spiffe_trust_domain_overrides_only_the_san(ca: MeshCA) -> None:
    ident = ca.issue("ns", "sa", spiffe_trust_domain="evil.example")
    assert str(ident.spiffe_id) == "spiffe://evil.example/ns/ns/sa/sa"
    ident.cert.verify_directly_issued_by(ca.intermediate_cert)


def test_negative_control_constructors_set_validity(ca: MeshCA) -> None:
    now = datetime.now(UTC)
    expired = ca.issue_expired("ns", "sa")
    assert expired.not_after < now
    assert expired.not_after > now - timedelta(hours=2)
    future = ca.issue_not_yet_valid("ns", "sa", starts_in=timedelta(hours=3))
    assert future.not_before > now + timedelta(hours=2)


def test_rotate_keeps_identity_and_lifetime_but_not_key_or_serial(ca: MeshCA) -> None:
    old = ca.issue("ns", "sa", lifetime=timedelta(hours=1), not_before=datetime.now(UTC))
    new = ca.rotate(old)
    assert new.spiffe_id == old.spiffe_id
    assert new.lifetime == timedelta(hours=1)
    assert new.serial != old.serial
    assert new.key.public_key() != old.key.public_key()
    assert new.cert.public_key() == new.key.public_key()
    assert verify_peer([new.cert], ca.root_cert, old.spiffe_id, intermediates=[new.chain[1]])
    wrong_td = ca.issue("ns", "sa", spiffe_trust_domain="other.td")
    assert ca.rotate(wrong_td).spiffe_id == wrong_td.spiffe_id


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: MeshCA.create("Bad_Domain"), InvalidSpiffeId, "trust domain character 'B'"),
        (lambda: MeshCA.create("td:443"), InvalidSpiffeId, "port"),
    ],
)
def test_create_rejects_bad_trust_domains(
    call: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        call()


def test_issue_rejects_bad_input(ca: MeshCA) -> None:
    with pytest.raises(InvalidSpiffeId, match="path character ' '"):
        ca.issue("my ns", "sa")
    with pytest.raises(UsageError, match="lifetime must be positive"):
        ca.issue("ns", "sa", lifetime=timedelta(0))
    with pytest.raises(UsageError, match="timezone-aware"):
        ca.issue("ns", "sa", not_before=datetime(2030, 1, 1))


def test_thirty_certificates_issue_quickly(ca: MeshCA) -> None:
    # The local backend issues about 30 per run; EC P-256 keeps that to milliseconds
    # (RSA key generation would take seconds). Asserted by what makes it quick, the key
    # type, not by a wall clock that a loaded machine would break.
    issued = [ca.issue("ns", f"sa-{i}") for i in range(30)]
    assert len({i.serial for i in issued}) == 30
    assert all(KeyType.of(i.key) is KeyType.EC_P256 for i in issued)


# --------------------------------------------------------------------------- files


@pytest.fixture(params=[0o000, 0o077, 0o022], ids=["umask000", "umask077", "umask022"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_output_certs_layout_and_modes(ca: MeshCA, tmp_path: Path, umask: int) -> None:
    ident = ca.issue("istio-system", "prometheus")
    out = ident.write_output_certs(tmp_path / "istio-certs")
    assert out == OutputCerts(
        directory=tmp_path / "istio-certs",
        root_cert=tmp_path / "istio-certs" / "root-cert.pem",
        cert_chain=tmp_path / "istio-certs" / "cert-chain.pem",
        key=tmp_path / "istio-certs" / "key.pem",
    )
    assert _mode(out.key) == 0o600
    assert _mode(out.cert_chain) == 0o644
    assert _mode(out.root_cert) == 0o644
    assert out.chain() == list(ident.chain)
    assert out.intermediates() == [ca.intermediate_cert]
    assert out.root() == ca.root_cert
    assert out.key.read_bytes() == ident.key_pem()
    assert sorted(p.name for p in out.directory.iterdir()) == [
        "cert-chain.pem",
        "key.pem",
        "root-cert.pem",
    ]


def test_write_files_uses_custom_names(ca: MeshCA, tmp_path: Path) -> None:
    ident = ca.issue("ns", "pod")
    out = ident.write_files(tmp_path, cert_name="c.pem", key_name="k.pem", root_name="r.pem")
    assert (out.cert_chain.name, out.key.name, out.root_cert.name) == ("c.pem", "k.pem", "r.pem")
    assert _mode(out.key) == 0o600
    assert out.chain()[0] == ident.cert


def test_rewriting_output_certs_replaces_them(ca: MeshCA, tmp_path: Path) -> None:
    old = ca.issue("ns", "sa")
    out = old.write_output_certs(tmp_path)
    new = ca.rotate(old)
    assert new.write_output_certs(tmp_path) == out
    assert out.chain()[0].serial_number == new.serial
    assert out.key.read_bytes() == new.key_pem()
    assert _mode(out.key) == 0o600


def test_plugin_ca_files(ca: MeshCA, tmp_path: Path) -> None:
    files = ca.write_plugin_ca(tmp_path / "cacerts")
    assert sorted(p.name for p in files.directory.iterdir()) == [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ]
    assert _mode(files.ca_key) == 0o600
    assert x509.load_pem_x509_certificate(files.ca_cert.read_bytes()) == ca.intermediate_cert
    assert x509.load_pem_x509_certificate(files.root_cert.read_bytes()) == ca.root_cert
    assert x509.load_pem_x509_certificates(files.cert_chain.read_bytes()) == [
        ca.intermediate_cert,
        ca.root_cert,
    ]
    key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert key.public_key() == ca.intermediate_cert.public_key()
    constraints = ca.intermediate_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    assert constraints.value.path_length == 0


def test_atomic_write_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    versions = (b"A" * 256 * 1024, b"B" * 192 * 1024)
    atomic_write(target, versions[0], 0o600)
    writes = 100
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(writes):
                atomic_write(target, versions[i % 2], 0o600)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[bytes] = []
    try:
        while not done.is_set():
            with target.open("rb") as handle:
                mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
                data = handle.read()
            assert mode == 0o600
            assert data in versions, f"torn read of {len(data)} bytes"
            seen.append(data[:1])
    finally:
        thread.join(timeout=60)
    assert not errors
    assert len(seen) > 0
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temp files left
    assert target.read_bytes() == versions[(writes - 1) % 2]


def test_atomic_write_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "occupied").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path / "occupied", b"data", 0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"]


def test_atomic_write_names_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"directory .*missing does not exist"):
        atomic_write(tmp_path / "missing" / "f.pem", b"x", 0o644)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- openssl verify


def _openssl_verify(
    leaf: x509.Certificate, root: Path, untrusted: Path, tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    command = [
        OPENSSL,
        "verify",
        "-x509_strict",
        "-CAfile",
        str(root),
        "-untrusted",
        str(untrusted),
    ]
    return subprocess.run(
        [*command, *extra, str(leaf_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=IO_TIMEOUT,
    )


@needs_openssl
@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_openssl_accepts_mesh_chain(ca: MeshCA, tmp_path: Path, purpose: str) -> None:
    ident = ca.issue("ns", "sa")
    out = ident.write_output_certs(tmp_path / "certs")
    proc = _openssl_verify(ident.cert, out.root_cert, out.cert_chain, tmp_path, "-purpose", purpose)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(": OK")


@needs_openssl
def test_openssl_verifies_leaf_against_plugin_ca_files(ca: MeshCA, tmp_path: Path) -> None:
    files = ca.write_plugin_ca(tmp_path / "cacerts")
    proc = _openssl_verify(ca.issue("ns", "sa").cert, files.root_cert, files.cert_chain, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(": OK")


@needs_openssl
@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("foreign", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
        ("not_yet_valid", "certificate is not yet valid"),
    ],
)
def test_openssl_rejects_bad_chains(
    ca: MeshCA, foreign_ca: MeshCA, tmp_path: Path, make: str, message: str
) -> None:
    ident = {
        "foreign": lambda: foreign_ca.issue("ns", "sa"),
        "expired": lambda: ca.issue_expired("ns", "sa"),
        "not_yet_valid": lambda: ca.issue_not_yet_valid("ns", "sa"),
    }[make]()
    out = ident.write_output_certs(tmp_path / "certs")
    mesh_root = atomic_write(tmp_path / "mesh-root.pem", ca.root_pem, 0o644)
    proc = _openssl_verify(ident.cert, mesh_root, out.cert_chain, tmp_path)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- real TLS handshakes


@dataclass
class Handshake:
    server_error: BaseException | None
    client_error: BaseException | None
    client_cert: x509.Certificate | None  # what the server saw
    server_cert: x509.Certificate | None  # what the client saw
    client_received: bytes


def _server_context(out: OutputCerts, trusted_root: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(out.cert_chain, out.key)
    ctx.load_verify_locations(trusted_root)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_context(out: OutputCerts | None, trusted_root: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # mesh certificates name SPIFFE IDs, not hosts
    ctx.load_verify_locations(trusted_root)
    if out is not None:
        ctx.load_cert_chain(out.cert_chain, out.key)
    return ctx


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Handshake:
    state: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(IO_TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(IO_TIMEOUT)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    state["client_cert"] = x509.load_der_x509_certificate(der) if der else None
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError) as exc:
                state["server_error"] = exc

        thread = threading.Thread(target=serve)
        thread.start()
        received = b""
        client_error: BaseException | None = None
        server_cert = None
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
                client_ctx.wrap_socket(raw) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                server_cert = x509.load_der_x509_certificate(der) if der else None
                received = tls.recv(2)
        except (OSError, ssl.SSLError) as exc:
            client_error = exc
        thread.join(timeout=IO_TIMEOUT)
        assert not thread.is_alive(), "TLS server thread did not finish"
    server_error = state.get("server_error")
    client_cert = state.get("client_cert")
    assert server_error is None or isinstance(server_error, BaseException)
    assert client_cert is None or isinstance(client_cert, x509.Certificate)
    return Handshake(server_error, client_error, client_cert, server_cert, received)


@pytest.fixture(scope="module")
def server(
    ca: MeshCA, tmp_path_factory: pytest.TempPathFactory
) -> tuple[WorkloadIdentity, OutputCerts]:
    ident = ca.issue("default", "httpbin")
    return ident, ident.write_output_certs(tmp_path_factory.mktemp("server-certs"))


def test_mtls_handshake_succeeds_with_mesh_certs(
    ca: MeshCA, server: tuple[WorkloadIdentity, OutputCerts], tmp_path: Path
) -> None:
    server_ident, server_out = server
    scraper = ca.issue("istio-system", "prometheus")
    client_out = scraper.write_output_certs(tmp_path)
    result = _handshake(
        _server_context(server_out, server_out.root_cert),
        _client_context(client_out, client_out.root_cert),
    )
    assert result.server_error is None
    assert result.client_error is None
    assert result.client_received == b"ok"
    assert result.client_cert is not None
    assert result.server_cert is not None
    # Both sides see only the leaf, as Python 3.11 exposes it; the intermediates come from
    # each side's own OUTPUT_CERTS chain.
    assert (
        verify_peer(
            [result.client_cert],
            server_out.root(),
            scraper.spiffe_id,
            intermediates=server_out.intermediates(),
        )
        == scraper.spiffe_id
    )
    assert (
        verify_peer(
            [result.server_cert],
            client_out.root(),
            server_ident.spiffe_id,
            intermediates=client_out.intermediates(),
        )
        == server_ident.spiffe_id
    )


def test_handshake_after_rotation_presents_the_new_certificate(
    ca: MeshCA, server: tuple[WorkloadIdentity, OutputCerts], tmp_path: Path
) -> None:
    _, server_out = server
    first = ca.issue("istio-system", "prometheus")
    client_out = first.write_output_certs(tmp_path)
    rotated = ca.rotate(first)
    rotated.write_output_certs(tmp_path)
    result = _handshake(
        _server_context(server_out, server_out.root_cert),
        _client_context(client_out, client_out.root_cert),
    )
    assert result.server_error is None
    assert result.client_cert is not None
    assert result.client_cert.serial_number == rotated.serial != first.serial


CLIENT_DEFECTS = {
    "foreign": "unable to get local issuer certificate",
    "expired": "certificate has expired",
    "not_yet_valid": "certificate is not yet valid",
}


@pytest.mark.parametrize("defect", sorted(CLIENT_DEFECTS))
def test_server_rejects_bad_client_certificates(
    ca: MeshCA,
    foreign_ca: MeshCA,
    server: tuple[WorkloadIdentity, OutputCerts],
    tmp_path: Path,
    defect: str,
) -> None:
    _, server_out = server
    client = {
        "foreign": lambda: foreign_ca.issue("istio-system", "prometheus"),
        "expired": lambda: ca.issue_expired("istio-system", "prometheus"),
        "not_yet_valid": lambda: ca.issue_not_yet_valid("istio-system", "prometheus"),
    }[defect]()
    client_out = client.write_output_certs(tmp_path)
    result = _handshake(
        _server_context(server_out, server_out.root_cert),
        _client_context(client_out, server_out.root_cert),  # the client trusts the server
    )
    assert isinstance(result.server_error, ssl.SSLCertVerificationError), result.server_error
    assert CLIENT_DEFECTS[defect] in result.server_error.verify_message
    assert result.client_received != b"ok"


def test_server_rejects_a_client_without_certificate(
    server: tuple[WorkloadIdentity, OutputCerts],
) -> None:
    _, server_out = server
    result = _handshake(
        _server_context(server_out, server_out.root_cert),
        _client_context(None, server_out.root_cert),
    )
    assert isinstance(result.server_error, ssl.SSLError)
    assert result.server_error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert result.client_received != b"ok"


def test_client_rejects_a_server_from_a_foreign_ca(
    ca: MeshCA, foreign_ca: MeshCA, tmp_path: Path
) -> None:
    server_out = foreign_ca.issue("default", "httpbin").write_output_certs(tmp_path / "s")
    client_out = ca.issue("istio-system", "prometheus").write_output_certs(tmp_path / "c")
    result = _handshake(
        _server_context(server_out, client_out.root_cert),
        _client_context(client_out, client_out.root_cert),
    )
    assert isinstance(result.client_error, ssl.SSLCertVerificationError), result.client_error
    assert "unable to get local issuer certificate" in result.client_error.verify_message


# --------------------------------------------------------------------------- verify_peer


def _cert(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    signer: PrivateKey,
    *,
    ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    """A certificate that differs from a good one only where a test says so."""
    start = not_before or datetime.now(UTC) - timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after or start + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    if not ca:
        usages = eku or [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
    return builder.sign(signer, hashes.SHA256())


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


EXPECTED = SpiffeId.for_workload("cluster.local", "ns", "sa")
CN = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")])


GOOD_SANS: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(EXPECTED))]
EMPTY_NAME = x509.Name([])


def _mesh_leaf(
    ca: MeshCA,
    *,
    subject: x509.Name = EMPTY_NAME,
    sans: list[x509.GeneralName] | None = GOOD_SANS,
    eku: list[x509.ObjectIdentifier] | None = None,
) -> list[x509.Certificate]:
    """A leaf from the mesh intermediate, built by hand so that one field can be wrong."""
    leaf = _cert(
        subject, ca.intermediate_cert.subject, _new_key(), ca.intermediate_key, sans=sans, eku=eku
    )
    return [leaf, ca.intermediate_cert]


def _impostor_chain(ca: MeshCA) -> list[x509.Certificate]:
    """Same names as the mesh root and intermediate, different keys."""
    root_key, inter_key = _new_key(), _new_key()
    inter = _cert(ca.intermediate_cert.subject, ca.root_cert.subject, inter_key, root_key, ca=True)
    leaf = _cert(
        x509.Name([]),
        inter.subject,
        _new_key(),
        inter_key,
        sans=[x509.UniformResourceIdentifier(str(EXPECTED))],
    )
    return [leaf, inter]


def _expired_intermediate_chain(ca: MeshCA) -> list[x509.Certificate]:
    now = datetime.now(UTC)
    inter_key = _new_key()
    inter = _cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Old Intermediate")]),
        ca.root_cert.subject,
        inter_key,
        ca.root_key,
        ca=True,
        not_before=now - timedelta(days=30),
        not_after=now - timedelta(days=1),
    )
    leaf = _cert(
        x509.Name([]),
        inter.subject,
        _new_key(),
        inter_key,
        sans=[x509.UniformResourceIdentifier(str(EXPECTED))],
    )
    return [leaf, inter]


BAD_PEERS: dict[
    str, tuple[Callable[[MeshCA, MeshCA], list[x509.Certificate]], PeerFailure, str]
] = {
    "foreign CA": (
        lambda ca, foreign: list(foreign.issue("ns", "sa").chain),
        PeerFailure.UNTRUSTED,
        "does not chain to the mesh root",
    ),
    "foreign CA presenting its root": (
        lambda ca, foreign: [*foreign.issue("ns", "sa").chain, foreign.root_cert],
        PeerFailure.UNTRUSTED,
        "chains to the self-signed 'CN=Root CA",
    ),
    "leaf without its intermediate": (
        lambda ca, foreign: [ca.issue("ns", "sa").cert],
        PeerFailure.UNTRUSTED,
        "neither presented nor passed as intermediates",
    ),
    "impostor CA with the mesh's names": (
        lambda ca, foreign: _impostor_chain(ca),
        PeerFailure.UNTRUSTED,
        "is the mesh root's name but not its key",
    ),
    "expired": (
        lambda ca, foreign: list(ca.issue_expired("ns", "sa").chain),
        PeerFailure.EXPIRED,
        "peer certificate expired at",
    ),
    "not yet valid": (
        lambda ca, foreign: list(ca.issue_not_yet_valid("ns", "sa").chain),
        PeerFailure.NOT_YET_VALID,
        "peer certificate is not valid before",
    ),
    "expired intermediate": (
        lambda ca, foreign: _expired_intermediate_chain(ca),
        PeerFailure.EXPIRED,
        "CA 'CN=Old Intermediate' expired at",
    ),
    "no SAN": (
        lambda ca, foreign: _mesh_leaf(ca, subject=CN, sans=None),
        PeerFailure.NO_URI_SAN,
        "has no URI SAN",
    ),
    "DNS SAN only": (
        lambda ca, foreign: _mesh_leaf(ca, sans=[x509.DNSName("httpbin.default.svc")]),
        PeerFailure.NO_URI_SAN,
        "has no URI SAN",
    ),
    "two URI SANs": (
        lambda ca, foreign: _mesh_leaf(
            ca,
            sans=[
                x509.UniformResourceIdentifier(str(EXPECTED)),
                x509.UniformResourceIdentifier("spiffe://cluster.local/ns/ns/sa/other"),
            ],
        ),
        PeerFailure.SEVERAL_URI_SANS,
        "has 2 URI SANs",
    ),
    "URI SAN that is not SPIFFE": (
        lambda ca, foreign: _mesh_leaf(
            ca, sans=[x509.UniformResourceIdentifier("https://cluster.local/ns/ns/sa/sa")]
        ),
        PeerFailure.NOT_SPIFFE,
        "is not a SPIFFE ID: scheme",
    ),
    "wrong trust domain": (
        lambda ca, foreign: list(ca.issue("ns", "sa", spiffe_trust_domain="evil.org").chain),
        PeerFailure.WRONG_IDENTITY,
        "is for spiffe://evil.org/ns/ns/sa/sa, expected spiffe://cluster.local/ns/ns/sa/sa "
        "(trust domain 'evil.org', expected 'cluster.local')",
    ),
    "wrong service account": (
        lambda ca, foreign: list(ca.issue("ns", "other").chain),
        PeerFailure.WRONG_IDENTITY,
        "is for spiffe://cluster.local/ns/ns/sa/other, expected spiffe://cluster.local/ns/ns/sa/sa",
    ),
    "server-only EKU": (
        lambda ca, foreign: _mesh_leaf(ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
        PeerFailure.UNTRUSTED,
        "fails X.509 path validation",
    ),
}


def svid_chain(
    ca: MeshCA,
    *,
    aki: bool = True,
    issuer_ca: bool = True,
    issuer_path_length: int | None = 0,
    issuer_cert_sign: bool = True,
    extra_ca: bool = False,
    leaf_signs: bool = True,
    unknown_critical: bool = False,
    leaf_key: PrivateKey | None = None,
    identity: SpiffeId = EXPECTED,
) -> list[x509.Certificate]:
    """An X.509-SVID under a fresh intermediate of the mesh root, built so that one path
    property (not the SAN) can be wrong; with ``aki=False`` the leaf has no Authority
    Key Identifier, which RFC 5280 and the SPIFFE X.509-SVID spec allow."""
    now = datetime.now(UTC) - timedelta(minutes=5)

    def build(
        subject: x509.Name, issuer: x509.Name, key: PrivateKey, signer: PrivateKey
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(hours=1))
        )

    def usage(*, sign: bool, cert_sign: bool) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=sign,
            content_commitment=False,
            key_encipherment=not sign,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=cert_sign,
            crl_sign=cert_sign,
            encipher_only=False,
            decipher_only=False,
        )

    issuer_key, parent_key, parent = _new_key(), ca.root_key, ca.root_cert.subject
    chain: list[x509.Certificate] = []
    if extra_ca:  # a second intermediate between the root and the leaf's issuer
        middle_key = _new_key()
        middle_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Middle CA")])
        middle = (
            build(middle_name, parent, middle_key, parent_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage(sign=True, cert_sign=True), critical=True)
            .sign(parent_key, hashes.SHA256())
        )
        chain.append(middle)
        parent_key, parent = middle_key, middle_name
    issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "SVID Issuer")])
    issuer = (
        build(issuer_name, parent, issuer_key, parent_key)
        .add_extension(
            x509.BasicConstraints(
                ca=issuer_ca, path_length=issuer_path_length if issuer_ca else None
            ),
            critical=True,
        )
        .add_extension(usage(sign=True, cert_sign=issuer_cert_sign), critical=True)
        .sign(parent_key, hashes.SHA256())
    )
    leaf = (
        build(EMPTY_NAME, issuer_name, leaf_key or _new_key(), issuer_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(sign=leaf_signs, cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
    )
    if aki:
        leaf = leaf.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if unknown_critical:
        leaf = leaf.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
            critical=True,
        )
    return [leaf.sign(issuer_key, hashes.SHA256()), issuer, *reversed(chain)]


BAD_PEERS.update(
    {
        "issuer that is not a CA": (
            lambda ca, foreign: svid_chain(ca, issuer_ca=False),
            PeerFailure.UNTRUSTED,
            "CA 'CN=SVID Issuer' issues certificates but is not a CA",
        ),
        "issuer without keyCertSign": (
            lambda ca, foreign: svid_chain(ca, issuer_cert_sign=False),
            PeerFailure.UNTRUSTED,
            "its key usage lacks keyCertSign",
        ),
        "leaf that may not sign": (
            lambda ca, foreign: svid_chain(ca, leaf_signs=False),
            PeerFailure.UNTRUSTED,
            "allows neither digitalSignature nor keyAgreement",
        ),
        "unhandled critical extension": (
            lambda ca, foreign: svid_chain(ca, unknown_critical=True),
            PeerFailure.UNTRUSTED,
            "unhandled critical extension 1.3.6.1.4.1.99999.1",
        ),
    }
)


def test_verify_peer_accepts_an_svid_without_authority_key_identifier(ca: MeshCA) -> None:
    """RFC 5280 and the SPIFFE X.509-SVID spec allow it, and Envoy accepts it; the
    web-PKI profile this verifier once used rejected it as PEER_UNTRUSTED."""
    chain = svid_chain(ca, aki=False)
    with pytest.raises(x509.ExtensionNotFound):
        chain[0].extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert verify_peer(chain, ca.root_cert, EXPECTED) == EXPECTED
    assert verify_peer(svid_chain(ca), ca.root_cert, EXPECTED) == EXPECTED  # the good twin


def test_verify_peer_enforces_path_length(ca: MeshCA) -> None:
    chain = svid_chain(ca, extra_ca=True, issuer_path_length=0)
    assert verify_peer(chain, ca.root_cert, EXPECTED) == EXPECTED  # 0 CAs below the issuer
    root_key, inter_key = ca.root_key, _new_key()
    # a middle CA that allows no CA below it, above the leaf's issuer
    tight = _cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tight CA")]),
        ca.root_cert.subject,
        inter_key,
        root_key,
        ca=True,  # _cert gives CAs pathLenConstraint 0
    )
    issuer_key = _new_key()
    issuer = _cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Below Tight")]),
        tight.subject,
        issuer_key,
        inter_key,
        ca=True,
    )
    leaf = _cert(EMPTY_NAME, issuer.subject, _new_key(), issuer_key, sans=GOOD_SANS)
    with pytest.raises(PeerVerificationError) as caught:
        verify_peer([leaf, issuer, tight], ca.root_cert, EXPECTED)
    assert caught.value.kind is PeerFailure.UNTRUSTED
    assert (
        "CA 'CN=Tight CA' allows 0 CAs below it (pathLenConstraint), has 1" in caught.value.reason
    )


@pytest.mark.parametrize("case", sorted(BAD_PEERS))
def test_verify_peer_rejects_bad_certificates(ca: MeshCA, foreign_ca: MeshCA, case: str) -> None:
    make, kind, reason = BAD_PEERS[case]
    chain = make(ca, foreign_ca)
    with pytest.raises(PeerVerificationError) as caught:
        verify_peer(chain, ca.root_cert, EXPECTED)
    assert caught.value.kind is kind, caught.value.reason
    assert reason in caught.value.reason
    assert str(caught.value) == caught.value.reason


def test_verify_peer_accepts_the_good_twin_of_each_bad_certificate(ca: MeshCA) -> None:
    # The hand-built certificates above differ from this one only in the defect under test,
    # so their rejections are caused by that defect and not by the helper.
    assert verify_peer(_mesh_leaf(ca), ca.root_cert, EXPECTED) == EXPECTED
    assert verify_peer(_mesh_leaf(ca, subject=CN), ca.root_cert, EXPECTED) == EXPECTED


def test_verify_peer_uses_separate_intermediates(ca: MeshCA) -> None:
    ident = ca.issue("ns", "sa")
    assert verify_peer([ident.cert], ca.root_cert, EXPECTED, intermediates=[ca.intermediate_cert])
    assert verify_peer(list(ident.chain), ca.root_cert, EXPECTED) == EXPECTED


def test_verify_peer_judges_validity_at_the_given_time(ca: MeshCA) -> None:
    ident = ca.issue("ns", "sa", lifetime=timedelta(hours=1))
    chain = list(ident.chain)
    assert verify_peer(chain, ca.root_cert, EXPECTED, now=ident.not_after) == EXPECTED
    with pytest.raises(PeerVerificationError) as caught:
        verify_peer(chain, ca.root_cert, EXPECTED, now=ident.not_after + timedelta(seconds=1))
    assert caught.value.kind is PeerFailure.EXPIRED
    with pytest.raises(PeerVerificationError) as caught:
        verify_peer(chain, ca.root_cert, EXPECTED, now=ident.not_before - timedelta(seconds=1))
    assert caught.value.kind is PeerFailure.NOT_YET_VALID


def test_verify_peer_input_errors(ca: MeshCA) -> None:
    with pytest.raises(PeerVerificationError) as caught:
        verify_peer([], ca.root_cert, EXPECTED)
    assert caught.value.kind is PeerFailure.NO_CERTIFICATE
    with pytest.raises(UsageError, match="timezone-aware"):
        verify_peer(
            list(ca.issue("ns", "sa").chain), ca.root_cert, EXPECTED, now=datetime(2030, 1, 1)
        )


names = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=30)


@settings(max_examples=30, deadline=None)
@given(namespace=names, service_account=names, other=names)
def test_issued_identities_verify_as_themselves_only(
    ca: MeshCA, namespace: str, service_account: str, other: str
) -> None:
    ident = ca.issue(namespace, service_account)
    assert verify_peer(list(ident.chain), ca.root_cert, ident.spiffe_id) == ident.spiffe_id
    if other != service_account:
        with pytest.raises(PeerVerificationError) as caught:
            verify_peer(
                list(ident.chain),
                ca.root_cert,
                SpiffeId.for_workload("cluster.local", namespace, other),
            )
        assert caught.value.kind is PeerFailure.WRONG_IDENTITY
