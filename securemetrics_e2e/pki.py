"""A throwaway mesh CA, workload identities, and verification of a peer's SPIFFE identity.

:class:`MeshCA` plays istiod's CA in the shape of Istio's plug-in CA (a self-signed root and
one intermediate that signs workload certificates). A :class:`WorkloadIdentity` is what the
istio-agent holds for a pod: a leaf with one SPIFFE URI SAN, its key, and the chain. It can be
written as the ``OUTPUT_CERTS`` files Prometheus reads, or as any other file set (Envoy SDS).

:func:`verify_peer` checks what Prometheus cannot (its sample config runs with
``insecure_skip_verify``): that a peer's certificate chains to the mesh root, is valid now,
and names exactly the expected SPIFFE ID.
"""

from __future__ import annotations

import contextlib
import enum
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.spiffe import InvalidSpiffeId, SpiffeId
from securemetrics_e2e.svid import PeerFailure, PeerVerificationError, verify_peer

__all__ = [
    "InvalidSpiffeId",
    "KeyType",
    "MeshCA",
    "OutputCerts",
    "PeerFailure",
    "PeerVerificationError",
    "PluginCaFiles",
    "PrivateKey",
    "SpiffeId",
    "WorkloadIdentity",
    "atomic_write",
    "verify_peer",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

KEY_MODE = 0o600
CERT_MODE = 0o644

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=730)
# CA certificates start well in the past so that backdated negative-control leaves
# (issue_expired) still fall inside their issuer's validity: "expired" is then their
# only defect, and verify_peer names exactly that.
CA_BACKDATE = timedelta(days=30)


class KeyType(enum.StrEnum):
    """Key algorithm for the CA and the workload certificates it issues."""

    EC_P256 = "ec-p256"  # the default: what Istio uses, and fast to generate
    RSA_2048 = "rsa-2048"

    def generate(self) -> PrivateKey:
        if self is KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    @classmethod
    def of(cls, key: PrivateKey) -> KeyType:
        return cls.RSA_2048 if isinstance(key, rsa.RSAPrivateKey) else cls.EC_P256


# --------------------------------------------------------------------------- files


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int) -> Path:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new, never part.

    The bytes go to a temporary file in the same directory that already has ``mode``
    (so a key is never readable by others, not even briefly), are fsynced, and the file
    is renamed over ``path``; the directory is fsynced so the rename survives a crash.
    """
    target = Path(path)
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(
            f"cannot write {target}: directory {directory} does not exist; create it first"
        )
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # explicit, so the umask cannot widen or narrow it
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


@dataclass(frozen=True)
class OutputCerts:
    """Where a workload's certificate files were written (Istio's ``OUTPUT_CERTS`` layout)."""

    directory: Path
    root_cert: Path
    cert_chain: Path
    key: Path

    def root(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.root_cert.read_bytes())

    def chain(self) -> list[x509.Certificate]:
        """The certificates in ``cert_chain``, leaf first."""
        return x509.load_pem_x509_certificates(self.cert_chain.read_bytes())

    def intermediates(self) -> list[x509.Certificate]:
        """The CA certificates after the leaf, for :func:`verify_peer`'s ``intermediates``."""
        return self.chain()[1:]


@dataclass(frozen=True)
class PluginCaFiles:
    """The files of Istio's plug-in CA (the ``cacerts`` secret)."""

    directory: Path
    root_cert: Path  # root-cert.pem
    ca_cert: Path  # ca-cert.pem: the intermediate
    ca_key: Path  # ca-key.pem: the intermediate's key, mode 0600
    cert_chain: Path  # cert-chain.pem: intermediate then root


def _cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class WorkloadIdentity:
    """A workload certificate, its key, and the chain up to (not including) the root."""

    spiffe_id: SpiffeId
    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]  # leaf, intermediate
    root_cert: x509.Certificate

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    @property
    def not_before(self) -> datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    def cert_chain_pem(self) -> bytes:
        return _cert_pem(*self.chain)

    def key_pem(self) -> bytes:
        return _key_pem(self.key)

    def root_pem(self) -> bytes:
        return _cert_pem(self.root_cert)

    def write_files(
        self,
        directory: str | os.PathLike[str],
        *,
        cert_name: str = "cert-chain.pem",
        key_name: str = "key.pem",
        root_name: str = "root-cert.pem",
    ) -> OutputCerts:
        """Write root, key and chain atomically (each file) into ``directory``, creating it.

        The chain is written last, so a watcher that reloads when the chain changes
        finds the matching key already in place.
        """
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        root = atomic_write(base / root_name, self.root_pem(), CERT_MODE)
        key = atomic_write(base / key_name, self.key_pem(), KEY_MODE)
        chain = atomic_write(base / cert_name, self.cert_chain_pem(), CERT_MODE)
        return OutputCerts(directory=base, root_cert=root, cert_chain=chain, key=key)

    def write_output_certs(self, directory: str | os.PathLike[str]) -> OutputCerts:
        """Write ``root-cert.pem``, ``cert-chain.pem`` and ``key.pem`` as istio-agent does."""
        return self.write_files(directory)


# --------------------------------------------------------------------------- the CA


def _now() -> datetime:
    # Certificates hold whole seconds; truncating keeps lifetimes exact.
    return datetime.now(UTC).replace(microsecond=0)


def _ca_subject(common_name: str, trust_domain: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Istio"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(
    *, digital_signature: bool, key_encipherment: bool = False, cert_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_cert(
    subject: x509.Name,
    key: PrivateKey,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    *,
    path_length: int | None,
    not_before: datetime,
    lifetime: timedelta,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(digital_signature=True, cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if key is not issuer_key:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class MeshCA:
    """A root and an intermediate CA for one trust domain; issues workload certificates.

    A CA the mesh does not trust (the "foreign CA" negative control) is simply another
    ``MeshCA.create()``.
    """

    trust_domain: str
    key_type: KeyType
    root_cert: x509.Certificate
    intermediate_cert: x509.Certificate
    root_key: PrivateKey = field(repr=False)
    intermediate_key: PrivateKey = field(repr=False)

    @classmethod
    def create(
        cls, trust_domain: str = "cluster.local", *, key_type: KeyType = KeyType.EC_P256
    ) -> MeshCA:
        SpiffeId(trust_domain)  # raises InvalidSpiffeId naming the bad trust domain
        key_type = KeyType(key_type)
        # A random tag keeps two CAs' names apart, so error messages say which root is which.
        tag = secrets.token_hex(4)
        start = _now() - CA_BACKDATE
        root_key = key_type.generate()
        root_name = _ca_subject(f"Root CA {tag}", trust_domain)
        root = _ca_cert(
            root_name,
            root_key,
            root_name,
            root_key,
            path_length=None,
            not_before=start,
            lifetime=ROOT_LIFETIME,
        )
        intermediate_key = key_type.generate()
        intermediate = _ca_cert(
            _ca_subject(f"Intermediate CA {tag}", trust_domain),
            intermediate_key,
            root_name,
            root_key,
            path_length=0,
            not_before=start,
            lifetime=INTERMEDIATE_LIFETIME,
        )
        return cls(trust_domain, key_type, root, intermediate, root_key, intermediate_key)

    @property
    def root_pem(self) -> bytes:
        return _cert_pem(self.root_cert)

    def write_plugin_ca(self, directory: str | os.PathLike[str]) -> PluginCaFiles:
        """Write the plug-in CA files istiod reads from the ``cacerts`` secret."""
        base = Path(directory)
        base.mkdir(parents=True, exist_ok=True)
        return PluginCaFiles(
            directory=base,
            root_cert=atomic_write(base / "root-cert.pem", self.root_pem, CERT_MODE),
            ca_key=atomic_write(base / "ca-key.pem", _key_pem(self.intermediate_key), KEY_MODE),
            ca_cert=atomic_write(
                base / "ca-cert.pem", _cert_pem(self.intermediate_cert), CERT_MODE
            ),
            cert_chain=atomic_write(
                base / "cert-chain.pem",
                _cert_pem(self.intermediate_cert, self.root_cert),
                CERT_MODE,
            ),
        )

    def issue(
        self,
        namespace: str,
        service_account: str,
        *,
        lifetime: timedelta = timedelta(hours=24),
        not_before: datetime | None = None,
        spiffe_trust_domain: str | None = None,
    ) -> WorkloadIdentity:
        """Issue a workload certificate for ``spiffe://<td>/ns/<namespace>/sa/<sa>``.

        ``spiffe_trust_domain`` puts another trust domain in the SAN while this CA still
        signs it (the "wrong trust domain" negative control).
        """
        spiffe_id = SpiffeId.for_workload(
            spiffe_trust_domain or self.trust_domain, namespace, service_account
        )
        return self._issue(spiffe_id, self.key_type.generate(), lifetime, not_before)

    def issue_expired(
        self, namespace: str, service_account: str, *, ago: timedelta = timedelta(hours=1)
    ) -> WorkloadIdentity:
        """A 24-hour certificate that expired ``ago`` before now."""
        lifetime = timedelta(hours=24)
        return self.issue(
            namespace, service_account, lifetime=lifetime, not_before=_now() - ago - lifetime
        )

    def issue_not_yet_valid(
        self, namespace: str, service_account: str, *, starts_in: timedelta = timedelta(hours=1)
    ) -> WorkloadIdentity:
        """A 24-hour certificate whose validity starts ``starts_in`` from now."""
        return self.issue(namespace, service_account, not_before=_now() + starts_in)

    def rotate(self, identity: WorkloadIdentity) -> WorkloadIdentity:
        """Re-issue ``identity`` from this CA as istio-agent rotation does.

        New key (same algorithm), new serial, same SPIFFE ID and lifetime, valid from now.
        """
        return self._issue(
            identity.spiffe_id, KeyType.of(identity.key).generate(), identity.lifetime, None
        )

    def _issue(
        self,
        spiffe_id: SpiffeId,
        key: PrivateKey,
        lifetime: timedelta,
        not_before: datetime | None,
    ) -> WorkloadIdentity:
        if lifetime <= timedelta(0):
            raise UsageError(f"certificate lifetime must be positive, got {lifetime}")
        if not_before is not None and not_before.tzinfo is None:
            raise UsageError(f"not_before must be timezone-aware (use UTC), got {not_before!r}")
        start = _now() if not_before is None else not_before.replace(microsecond=0)
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        cert = (
            x509.CertificateBuilder()
            # Istio workload certificates have an empty subject; the identity lives only
            # in the SAN, which RFC 5280 then requires to be critical.
            .subject_name(x509.Name([]))
            .issuer_name(self.intermediate_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # keyEncipherment only means something for RSA key transport.
            .add_extension(
                _key_usage(digital_signature=True, key_encipherment=is_rsa), critical=True
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.intermediate_key.public_key()
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                critical=True,
            )
            .sign(self.intermediate_key, hashes.SHA256())
        )
        return WorkloadIdentity(
            spiffe_id=spiffe_id,
            cert=cert,
            key=key,
            chain=(cert, self.intermediate_cert),
            root_cert=self.root_cert,
        )
