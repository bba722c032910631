"""Verifying a peer's X.509-SVID as Envoy does: the path to the mesh root, then the
SPIFFE ID it carries (re-exported by :mod:`securemetrics_e2e.pki`)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from securemetrics_e2e.errors import SecureMetricsError, UsageError
from securemetrics_e2e.spiffe import InvalidSpiffeId, SpiffeId

__all__ = ["PeerFailure", "PeerVerificationError", "verify_peer"]

# Far more than any mesh chain (leaf, intermediate, root); bounds the walk to the root.
MAX_CHAIN_DEPTH = 8


class PeerFailure(enum.StrEnum):
    """Why a peer's certificate was not accepted."""

    NO_CERTIFICATE = "no-certificate"
    UNTRUSTED = "untrusted"  # does not chain to the mesh root
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    NO_URI_SAN = "no-uri-san"
    SEVERAL_URI_SANS = "several-uri-sans"
    NOT_SPIFFE = "not-spiffe"  # the one URI SAN is not a valid SPIFFE ID
    WRONG_IDENTITY = "wrong-identity"


class PeerVerificationError(SecureMetricsError):
    """A peer's certificate does not prove the expected mesh identity."""

    def __init__(self, reason: str, kind: PeerFailure) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def verify_peer(
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    expected: SpiffeId,
    *,
    intermediates: Sequence[x509.Certificate] = (),
    now: datetime | None = None,
) -> SpiffeId:
    """Check that ``chain[0]`` proves ``expected``; return the SPIFFE ID it carries.

    ``chain`` is what the peer presented, leaf first (often only the leaf: Python 3.11's
    ``ssl`` exposes no more); ``intermediates`` are further untrusted CA certificates to
    build the path with, e.g. :meth:`OutputCerts.intermediates`. Only ``root`` is trusted.

    Judged as Envoy judges a mesh peer, not by web-PKI rules: a path by issuer name and
    signature to ``root``; every certificate on it within its validity; basic constraints
    (issuers are CAs, within their pathLenConstraint), key usage (issuers may sign
    certificates; the leaf may sign), the leaf's extended key usage allows a TLS client
    (the same workload certificate is Envoy's client certificate in the mesh), no
    unhandled critical extension (BoringSSL's X509_verify_cert with the ssl purpose, as
    Envoy's default certificate validator runs it); then the SPIFFE X.509-SVID rules:
    exactly one URI SAN, a ``spiffe://`` ID. Nothing stricter: an Authority or Subject
    Key Identifier, a subject, a CRL distribution point are not required (RFC 5280 and
    the SPIFFE X.509-SVID specification do not require them of a leaf).
    """
    if not chain:
        raise PeerVerificationError("the peer presented no certificate", PeerFailure.NO_CERTIFICATE)
    when = datetime.now(UTC) if now is None else now
    if when.tzinfo is None:
        raise UsageError(f"now must be timezone-aware (use UTC), got {now!r}")
    leaf = chain[0]
    untrusted = [*chain[1:], *intermediates]
    path, complete = _issuer_path(leaf, untrusted, root)
    if not complete:
        raise _untrusted(leaf, path, root)
    _check_validity(leaf, path, when)
    problem = _path_problem(path)
    if problem is not None:
        raise PeerVerificationError(
            f"peer certificate {_describe(leaf)} chains to '{root.subject.rfc4514_string()}' "
            f"but fails X.509 path validation: {problem}",
            PeerFailure.UNTRUSTED,
        )
    actual = _spiffe_id_of(leaf)
    if actual != expected:
        detail = ""
        if actual.trust_domain != expected.trust_domain:
            detail = f" (trust domain {actual.trust_domain!r}, expected {expected.trust_domain!r})"
        raise PeerVerificationError(
            f"peer certificate is for {actual}, expected {expected}{detail}",
            PeerFailure.WRONG_IDENTITY,
        )
    return actual


#: extensions path validation understands; any other one marked critical rejects the
#: certificate (RFC 5280 4.2, BoringSSL X509_V_ERR_UNHANDLED_CRITICAL_EXTENSION)
_HANDLED = (
    x509.BasicConstraints,
    x509.KeyUsage,
    x509.ExtendedKeyUsage,
    x509.SubjectAlternativeName,
    x509.NameConstraints,
    x509.AuthorityKeyIdentifier,
    x509.SubjectKeyIdentifier,
    x509.CertificatePolicies,
    x509.PolicyConstraints,
    x509.InhibitAnyPolicy,
)
_CLIENT_USAGES = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _path_problem(path: Sequence[x509.Certificate]) -> str | None:
    """What on a signature-complete path (leaf first, root last) a verifier rejects."""
    leaf = path[0]
    try:
        extensions = [(cert, list(cert.extensions)) for cert in path]
    except ValueError as exc:  # e.g. a duplicated extension
        return f"malformed extensions: {exc}"
    for cert, exts in extensions:
        for ext in exts:
            if ext.critical and not isinstance(ext.value, _HANDLED):
                oid = ext.oid.dotted_string
                return f"{_who(cert, leaf)} has an unhandled critical extension {oid}"
    for depth, cert in enumerate(path[1:], start=1):
        who = _who(cert, leaf)
        constraints = _extension(cert, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            return f"{who} issues certificates but is not a CA (basicConstraints cA)"
        below = depth - 1  # CA certificates between this one and the leaf
        if constraints.path_length is not None and below > constraints.path_length:
            return (
                f"{who} allows {constraints.path_length} CAs below it (pathLenConstraint), "
                f"has {below}"
            )
        usage = _extension(cert, x509.KeyUsage)
        if usage is not None and not usage.key_cert_sign:
            return f"{who} issues certificates but its key usage lacks keyCertSign"
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not (usage.digital_signature or usage.key_agreement):
        return "its key usage allows neither digitalSignature nor keyAgreement"
    for cert in path[:-1]:
        extended = _extension(cert, x509.ExtendedKeyUsage)
        if extended is not None and not any(u in _CLIENT_USAGES for u in extended):
            return f"{_who(cert, leaf)}'s extended key usage does not allow clientAuth"
    return None


def _who(cert: x509.Certificate, leaf: x509.Certificate) -> str:
    return "the leaf" if cert is leaf else f"CA '{cert.subject.rfc4514_string()}'"


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    except ValueError as exc:  # e.g. a duplicated extension: cryptography parses lazily
        raise PeerVerificationError(
            f"peer certificate has malformed extensions: {exc}", PeerFailure.UNTRUSTED
        ) from None
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    uris = _uri_sans(cert)
    who = _describe(cert)
    if not uris:
        raise PeerVerificationError(
            f"peer certificate {who} has no URI SAN, so it names no SPIFFE identity",
            PeerFailure.NO_URI_SAN,
        )
    if len(uris) > 1:
        raise PeerVerificationError(
            f"peer certificate has {len(uris)} URI SANs ({', '.join(uris)}); "
            "a SPIFFE certificate carries exactly one",
            PeerFailure.SEVERAL_URI_SANS,
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise PeerVerificationError(
            f"peer certificate's URI SAN {uris[0]!r} is not a SPIFFE ID: {exc.reason}",
            PeerFailure.NOT_SPIFFE,
        ) from None


def _describe(cert: x509.Certificate) -> str:
    uris = _uri_sans(cert)
    if uris:
        return ", ".join(uris)
    subject = cert.subject.rfc4514_string()
    return f"'{subject}'" if subject else f"serial {cert.serial_number:x}"


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issuer_path(
    leaf: x509.Certificate, untrusted: Sequence[x509.Certificate], root: x509.Certificate
) -> tuple[list[x509.Certificate], bool]:
    """Walk from the leaf towards ``root`` by signatures alone, ignoring time and policy.

    Returns the certificates walked and whether the walk reached ``root`` (then last).
    """
    path = [leaf]
    while len(path) <= MAX_CHAIN_DEPTH:
        current = path[-1]
        if _issued_by(current, root):
            return [*path, root], True
        issuer = next((c for c in untrusted if c not in path and _issued_by(current, c)), None)
        if issuer is None:
            break
        path.append(issuer)
    return path, False


def _untrusted(
    leaf: x509.Certificate, path: Sequence[x509.Certificate], root: x509.Certificate
) -> PeerVerificationError:
    """Why the walk from ``leaf`` by signatures did not reach the mesh root."""
    root_name = root.subject.rfc4514_string()
    last = path[-1]
    issuer = last.issuer.rfc4514_string()
    if last.issuer == root.subject:
        hint = f"; '{issuer}' is the mesh root's name but not its key"
    elif last.issuer == last.subject:
        hint = f"; it chains to the self-signed '{issuer}' instead"
    else:
        hint = (
            f"; its path ends at issuer '{issuer}', which is not the mesh root and whose "
            "certificate was neither presented nor passed as intermediates"
        )
    return PeerVerificationError(
        f"peer certificate {_describe(leaf)} (issuer '{leaf.issuer.rfc4514_string()}') "
        f"does not chain to the mesh root '{root_name}'{hint}",
        PeerFailure.UNTRUSTED,
    )


def _check_validity(
    leaf: x509.Certificate, path: Sequence[x509.Certificate], now: datetime
) -> None:
    """Every certificate on the path, the root included, must be valid ``now``."""
    for cert in path:
        what = "peer certificate" if cert is leaf else f"CA '{cert.subject.rfc4514_string()}'"
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now > end:
            raise PeerVerificationError(
                f"{what} expired at {end.isoformat()} (now {now.isoformat()})",
                PeerFailure.EXPIRED,
            )
        if now < start:
            raise PeerVerificationError(
                f"{what} is not valid before {start.isoformat()} (now {now.isoformat()})",
                PeerFailure.NOT_YET_VALID,
            )
