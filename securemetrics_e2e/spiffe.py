"""SPIFFE IDs: the identities Istio writes into workload certificates.

Parsing follows the SPIFFE ID standard (github.com/spiffe/spiffe, standards/SPIFFE-ID.md):
lowercase ``spiffe`` scheme, a lowercase trust domain of ``[a-z0-9._-]``, no port, userinfo,
query or fragment, path segments of ``[A-Za-z0-9._-]`` that are neither empty nor ``.``/``..``,
and at most 2048 bytes in all. Istio names a workload ``spiffe://<td>/ns/<ns>/sa/<sa>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from securemetrics_e2e.errors import UsageError

SCHEME_PREFIX = "spiffe://"
MAX_ID_LENGTH = 2048  # bytes, whole URI
MAX_TRUST_DOMAIN_LENGTH = 255  # bytes; the spec bounds it like a DNS name

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[A-Za-z0-9._-]+")


class InvalidSpiffeId(UsageError, ValueError):
    """Text that is not a valid SPIFFE ID; ``reason`` says which rule it breaks."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid SPIFFE ID {text!r}: {reason}")
        self.text = text
        self.reason = reason


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A SPIFFE ID. ``path`` is ``""`` (the trust domain itself) or starts with ``/``.

    Construct through :meth:`parse` or :meth:`for_workload`; direct construction is
    validated too, so every instance is a valid ID.
    """

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        text = f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"
        _check_trust_domain(text, self.trust_domain)
        _check_path(text, self.path)
        _check_length(text)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain>[/<segment>...]``; raise :class:`InvalidSpiffeId`."""
        if not isinstance(text, str):
            raise InvalidSpiffeId(repr(text), f"expected a string, got {type(text).__name__}")
        if not text:
            raise InvalidSpiffeId(text, "empty; expected spiffe://<trust-domain>/<path>")
        if not text.startswith(SCHEME_PREFIX):
            if text[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
                raise InvalidSpiffeId(text, "scheme must be lowercase 'spiffe'")
            raise InvalidSpiffeId(text, "scheme must be 'spiffe://'")
        _check_length(text)
        rest = text[len(SCHEME_PREFIX) :]
        if "#" in rest:
            raise InvalidSpiffeId(text, "a fragment ('#...') is not allowed")
        if "?" in rest:
            raise InvalidSpiffeId(text, "a query ('?...') is not allowed")
        authority, slash, path = rest.partition("/")
        _check_trust_domain(text, authority)
        path = slash + path
        _check_path(text, path)
        return cls(authority, path)

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """The ID Istio gives a workload: ``spiffe://<td>/ns/<namespace>/sa/<service_account>``."""
        for what, name in (("namespace", namespace), ("service account", service_account)):
            if "/" in name:
                raise InvalidSpiffeId(
                    f"{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}",
                    f"the {what} {name!r} must be a single path segment (no '/')",
                )
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """The namespace of an Istio workload ID (``/ns/<ns>/sa/<sa>``), else ``None``."""
        parts = self.segments
        return parts[1] if _is_workload_path(parts) else None

    @property
    def service_account(self) -> str | None:
        """The service account of an Istio workload ID, else ``None``."""
        parts = self.segments
        return parts[3] if _is_workload_path(parts) else None

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"


def _is_workload_path(parts: tuple[str, ...]) -> bool:
    return len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa"


def _check_length(text: str) -> None:
    size = len(text.encode("utf-8"))
    if size > MAX_ID_LENGTH:
        raise InvalidSpiffeId(
            text[:64] + "...", f"too long: {size} bytes, the maximum is {MAX_ID_LENGTH}"
        )


def _check_trust_domain(text: str, trust_domain: str) -> None:
    if not trust_domain:
        raise InvalidSpiffeId(text, "the trust domain is missing")
    if "@" in trust_domain:
        raise InvalidSpiffeId(text, "userinfo ('user@') is not allowed before the trust domain")
    if ":" in trust_domain:
        raise InvalidSpiffeId(text, "a port is not allowed in the trust domain")
    _check_chars(
        text, trust_domain, _TRUST_DOMAIN_CHARS, "trust domain", "lowercase letters, digits"
    )
    if len(trust_domain.encode("utf-8")) > MAX_TRUST_DOMAIN_LENGTH:
        raise InvalidSpiffeId(text, f"trust domain longer than {MAX_TRUST_DOMAIN_LENGTH} bytes")


def _check_path(text: str, path: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise InvalidSpiffeId(text, "the path must start with '/'")
    for segment in path[1:].split("/"):
        if not segment:
            raise InvalidSpiffeId(text, "the path has an empty segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise InvalidSpiffeId(text, f"the path has a dot segment {segment!r}")
        if "%" in segment:
            raise InvalidSpiffeId(text, "percent-encoding is not allowed in the path")
        _check_chars(text, segment, _SEGMENT_CHARS, "path", "letters, digits")


def _check_chars(text: str, value: str, allowed: re.Pattern[str], part: str, use: str) -> None:
    """InvalidSpiffeId naming the first character of ``value`` that ``allowed`` refuses."""
    if not allowed.fullmatch(value):
        bad = next(ch for ch in value if not allowed.fullmatch(ch))
        raise InvalidSpiffeId(
            text, f"{part} character {bad!r} is not allowed: use {use}, '.', '-' and '_'"
        )
