"""SPIFFE ID parsing against the rules of the SPIFFE ID standard."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.spiffe import InvalidSpiffeId, SpiffeId

TRUST_DOMAIN_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEGMENT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_"

trust_domains = st.text(TRUST_DOMAIN_ALPHABET, min_size=1, max_size=40)
segments = st.text(SEGMENT_ALPHABET, min_size=1, max_size=20).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=6).map(lambda parts: "".join(f"/{p}" for p in parts))
valid_ids = st.builds(lambda td, path: f"spiffe://{td}{path}", trust_domains, paths)


@settings(max_examples=100)
@given(valid_ids)
def test_valid_ids_round_trip(text: str) -> None:
    parsed = SpiffeId.parse(text)
    assert str(parsed) == text
    assert SpiffeId.parse(str(parsed)) == parsed
    assert text == f"spiffe://{parsed.trust_domain}{parsed.path}"


# Each mutation turns a valid ID into one that breaks a single rule, paired with a word the
# reason must contain so that the right rule is reported, not just any.
MUTATIONS: dict[str, tuple[str, Callable[[str, str], str]]] = {
    "uppercase scheme": ("lowercase", lambda td, p: f"SPIFFE://{td}{p}"),
    "other scheme": ("scheme", lambda td, p: f"https://{td}{p}"),
    "no scheme": ("scheme", lambda td, p: f"{td}{p}"),
    "port": ("port", lambda td, p: f"spiffe://{td}:8080{p}"),
    "userinfo": ("userinfo", lambda td, p: f"spiffe://user@{td}{p}"),
    "query": ("query", lambda td, p: f"spiffe://{td}{p}?a=b"),
    "fragment": ("fragment", lambda td, p: f"spiffe://{td}{p}#frag"),
    "trailing slash": ("empty segment", lambda td, p: f"spiffe://{td}{p}/"),
    "double slash": ("empty segment", lambda td, p: f"spiffe://{td}/{p}"),
    "dot segment": ("dot segment", lambda td, p: f"spiffe://{td}{p}/."),
    "dot-dot segment": ("dot segment", lambda td, p: f"spiffe://{td}/..{p}"),
    "uppercase trust domain": ("trust domain character", lambda td, p: f"spiffe://X{td}{p}"),
    "bad trust domain char": ("trust domain character", lambda td, p: f"spiffe://{td}!{p}"),
    "bad path char": ("path character", lambda td, p: f"spiffe://{td}{p}/a b"),
    "percent-encoding": ("percent", lambda td, p: f"spiffe://{td}{p}/a%20b"),
    "no trust domain": ("trust domain is missing", lambda td, p: f"spiffe://{p}"),
    "too long": ("too long", lambda td, p: f"spiffe://{td}/{'a' * 2048}"),
}


@settings(max_examples=100)
@given(trust_domains, paths, st.sampled_from(sorted(MUTATIONS)))
def test_invalid_ids_are_rejected_with_the_broken_rule(td: str, path: str, mutation: str) -> None:
    expected_word, mutate = MUTATIONS[mutation]
    text = mutate(td, path)
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.parse(text)
    assert expected_word in caught.value.reason, (mutation, text, caught.value.reason)
    assert caught.value.text in str(caught.value) or mutation == "too long"


def test_for_workload_builds_the_istio_identity() -> None:
    spiffe_id = SpiffeId.for_workload("cluster.local", "istio-system", "prometheus")
    assert str(spiffe_id) == "spiffe://cluster.local/ns/istio-system/sa/prometheus"
    assert spiffe_id.namespace == "istio-system"
    assert spiffe_id.service_account == "prometheus"
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


def test_non_workload_paths_have_no_namespace() -> None:
    assert SpiffeId.parse("spiffe://example.org").segments == ()
    assert SpiffeId.parse("spiffe://example.org").namespace is None
    assert SpiffeId.parse("spiffe://example.org/ns/a/x/b").service_account is None
    assert SpiffeId.parse("spiffe://example.org/a/b").segments == ("a", "b")


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("Cluster.Local", "ns", "sa"), "trust domain character"),
        (("cluster.local", "", "sa"), "empty segment"),
        (("cluster.local", "ns", "a/b"), "single path segment"),
        (("cluster.local", "a/b", "sa"), "single path segment"),
        (("cluster.local", "..", "sa"), "dot segment"),
        (("cluster.local", "ns", "s a"), "path character"),
    ],
)
def test_for_workload_validates_its_parts(args: tuple[str, str, str], word: str) -> None:
    with pytest.raises(InvalidSpiffeId) as caught:
        SpiffeId.for_workload(*args)
    assert word in caught.value.reason


def test_direct_construction_is_validated() -> None:
    with pytest.raises(InvalidSpiffeId, match="must start with '/'"):
        SpiffeId("example.org", "ns/a")
    with pytest.raises(InvalidSpiffeId, match="trust domain is missing"):
        SpiffeId("", "/a")


def test_invalid_id_is_a_usage_error_and_a_value_error() -> None:
    with pytest.raises(UsageError, match="invalid SPIFFE ID 'spiffe://a/b/'"):
        SpiffeId.parse("spiffe://a/b/")
    with pytest.raises(ValueError, match="empty"):
        SpiffeId.parse("")


def test_length_limit_is_inclusive() -> None:
    prefix = "spiffe://example.org/"
    longest = prefix + "a" * (2048 - len(prefix))
    assert str(SpiffeId.parse(longest)) == longest
    with pytest.raises(InvalidSpiffeId, match="too long"):
        SpiffeId.parse(longest + "a")
