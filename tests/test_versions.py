"""Istio version parsing, ordering, support table and capabilities."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.versions import (
    DEFAULT_VERSION,
    IstioVersion,
    UnsupportedIstioVersion,
    capabilities,
    resolve,
    supported_versions,
)

pres = st.one_of(
    st.none(),
    st.builds(
        lambda kind, n: f"{kind}.{n}", st.sampled_from(["alpha", "beta", "rc"]), st.integers(0, 20)
    ),
)
versions = st.builds(IstioVersion, st.integers(0, 3), st.integers(0, 40), st.integers(0, 30), pres)
supported_minor_versions = st.builds(
    IstioVersion, st.just(1), st.integers(28, 31), st.integers(0, 30), pres
)


@settings(max_examples=100)
@given(versions)
def test_parse_format_round_trip(version: IstioVersion) -> None:
    text = str(version)
    assert IstioVersion.parse(text) == version
    assert str(IstioVersion.parse(text)) == text


@settings(max_examples=100)
@given(versions, versions, versions)
def test_ordering_is_total_and_agrees_with_packaging(
    a: IstioVersion, b: IstioVersion, c: IstioVersion
) -> None:
    pa, pb = Version(str(a)), Version(str(b))
    assert (a < b) == (pa < pb)
    assert (a <= b) == (pa <= pb)
    assert (a > b) == (pa > pb)
    assert (a == b) == (pa == pb)
    assert sum([a < b, a == b, a > b]) == 1  # trichotomy
    if a <= b <= c:
        assert a <= c
    assert sorted([a, b, c]) == sorted([a, b, c], key=lambda v: Version(str(v)))


@settings(max_examples=100)
@given(supported_minor_versions, supported_minor_versions)
def test_capabilities_are_monotonic(a: IstioVersion, b: IstioVersion) -> None:
    low, high = sorted([a, b])
    caps_low, caps_high = capabilities(low), capabilities(high)
    assert caps_high.native_secure_ports >= caps_low.native_secure_ports
    assert caps_high.localhost_only_metrics >= caps_low.localhost_only_metrics


def test_prereleases_sort_before_the_release() -> None:
    ordered = ["1.30.5", "1.31.0-alpha.0", "1.31.0-beta.2", "1.31.0-rc.0", "1.31.0-rc.1", "1.31.0"]
    parsed = [IstioVersion.parse(t) for t in ordered]
    assert sorted(reversed(parsed)) == parsed
    assert [str(v) for v in parsed] == ordered


def test_native_secure_ports_start_at_the_1_31_0_release() -> None:
    assert not capabilities("1.31.0-rc.0").native_secure_ports
    assert capabilities("1.31.0").native_secure_ports
    assert capabilities("1.31").native_secure_ports
    assert not capabilities("1.30.5").native_secure_ports
    assert all(capabilities(v).localhost_only_metrics for v in supported_versions())


def test_supported_versions_and_default() -> None:
    assert [str(v) for v in supported_versions()] == ["1.28.10", "1.29.8", "1.30.5", "1.31.1"]
    assert IstioVersion(1, 31, 1) == DEFAULT_VERSION
    assert str(DEFAULT_VERSION) == "1.31.1"


@pytest.mark.parametrize(
    ("text", "latest"),
    [("1.31", "1.31.1"), ("1.30", "1.30.5"), ("1.29", "1.29.8"), ("1.28", "1.28.10")],
)
def test_minor_resolves_to_latest_patch(text: str, latest: str) -> None:
    assert str(resolve(text)) == latest
    assert str(IstioVersion.parse(text)) == latest


@pytest.mark.parametrize(
    ("text", "kubernetes", "k8s_minors", "gateway_api", "prometheus"),
    [
        ("1.31.1", "1.32-1.36", 5, "v1.6.0", "docker.io/prom/prometheus:v3.10.0"),
        ("1.30.5", "1.32-1.36", 5, "v1.5.1", "docker.io/prom/prometheus:v3.10.0"),
        ("1.29.8", "1.31-1.35", 5, "v1.4.1", "docker.io/prom/prometheus:v3.8.1"),
        ("1.28.10", "1.30-1.34", 5, "v1.4.1", "docker.io/prom/prometheus:v3.5.0"),
    ],
)
def test_table(
    text: str, kubernetes: str, k8s_minors: int, gateway_api: str, prometheus: str
) -> None:
    caps = capabilities(resolve(text))
    assert caps.version == resolve(text)
    assert str(caps.kubernetes_range) == kubernetes
    assert len(caps.kubernetes_range.minors()) == k8s_minors
    assert caps.gateway_api_version == gateway_api
    assert caps.prometheus_image == prometheus


def test_kubernetes_range_membership() -> None:
    k8s = capabilities("1.29").kubernetes_range
    assert k8s.minors() == ["1.31", "1.32", "1.33", "1.34", "1.35"]
    assert "1.31" in k8s
    assert "v1.35.2" in k8s
    assert "1.33.0-rc.1" in k8s
    assert "1.30" not in k8s
    assert "1.36.0" not in k8s
    assert "one.thirty" not in k8s


def test_newer_patch_than_the_table_is_supported() -> None:
    version = resolve("1.31.5")
    assert version == IstioVersion(1, 31, 5)
    assert version > DEFAULT_VERSION
    assert capabilities(version).gateway_api_version == "v1.6.0"
    assert capabilities(version).native_secure_ports


def test_parse_accepts_v_prefix_and_whitespace() -> None:
    assert IstioVersion.parse(" v1.30.0-rc.0 ") == IstioVersion(1, 30, 0, "rc.0")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("1.27", "names minor 1.27, which is unknown"),
        ("2.0", "names minor 2.0, which is unknown"),
        ("1.27.3", "is in minor 1.27, which is not supported"),
        ("1.32.0", "is in minor 1.32, which is not supported"),
        ("1.x", "is not a version like"),
        ("", "is not a version like"),
        ("1.31.1.2", "is not a version like"),
        ("1.31.0-gamma.1", "is not a version like"),
        ("1.31.0rc0", "is not a version like"),
        ("01.31.0", "is not a version like"),
        ("1.31.0-rc.01", "is not a version like"),
    ],
)
def test_unsupported_and_malformed_versions(text: str, problem: str) -> None:
    with pytest.raises(UnsupportedIstioVersion) as caught:
        resolve(text)
    message = str(caught.value)
    assert f"Istio version {text!r} {problem}" in message
    assert "supported versions: 1.28.10, 1.29.8, 1.30.5, 1.31.1" in message
    assert isinstance(caught.value, UsageError)


def test_capabilities_of_an_unsupported_parsed_version() -> None:
    with pytest.raises(UnsupportedIstioVersion, match=r"minor 1\.27"):
        capabilities(IstioVersion(1, 27, 0))


def test_direct_construction_is_validated() -> None:
    with pytest.raises(UnsupportedIstioVersion, match="pre-release"):
        IstioVersion(1, 31, 0, "rc0")
    with pytest.raises(UnsupportedIstioVersion, match="negative"):
        IstioVersion(1, -1, 0)
