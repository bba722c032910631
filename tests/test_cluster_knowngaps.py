"""On the fake Kubernetes API: a cluster check's result goes through the known-gap table.

The legacy Sidecar ingress in PERMISSIVE (known gap legacy-sidecar-permissive-plaintext)
is deployed on the fake cluster; its proxy's config_dump is what the test makes Istio
answer: the gap's shape (plaintext chain beside the mTLS one) is KNOWN-GAP, a TLS-only
port is FIXED, any other failure is a FAIL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from securemetrics_e2e.catalog import MtlsMode, scenario
from securemetrics_e2e.checks import LISTENERS
from securemetrics_e2e.cluster.backend import CONFIG_DUMP
from securemetrics_e2e.cluster.kube import ExecResult
from securemetrics_e2e.configdump import DOWNSTREAM_TLS, HCM, LISTENERS_DUMP
from securemetrics_e2e.istionames import PROXY_CONTAINER as PROXY
from securemetrics_e2e.results import Status
from securemetrics_e2e.runner import run_checks
from tests.fakekube import FakeKube
from tests.test_cluster_backend import Controller, _backend, fake  # noqa: F401 - fixture

GAP = "legacy-sidecar-permissive-plaintext"


def _chain(*, tls: bool, prefix: str = "/") -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filter_chain_match": {
            "destination_port": 15091,
            "transport_protocol": "tls" if tls else "raw_buffer",
        },
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM,
                    "route_config": {
                        "virtual_hosts": [
                            {"routes": [{"match": {"prefix": prefix}, "route": {"cluster": "x"}}]}
                        ]
                    },
                },
            }
        ],
    }
    if tls:
        chain["transport_socket"] = {
            "name": "tls",
            "typed_config": {"@type": DOWNSTREAM_TLS, "require_client_certificate": True},
        }
    return chain


def _dump(*chains: dict[str, Any]) -> str:
    """A sidecar config_dump: virtualInbound with the given chains for port 15091."""
    listener = {
        "name": "virtualInbound",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": 15006}},  # noqa: S104
        "filter_chains": list(chains),
    }
    section = {
        "@type": LISTENERS_DUMP,
        "dynamic_listeners": [{"active_state": {"listener": listener}}],
    }
    return json.dumps({"configs": [section]})


@pytest.mark.parametrize(
    ("chains", "status"),
    [
        # what Istio builds for an HTTP Sidecar ingress port in PERMISSIVE: the gap
        ((_chain(tls=True), _chain(tls=False)), Status.KNOWN_GAP),
        # mTLS only on that port: this distribution closes the gap
        ((_chain(tls=True),), Status.FIXED),
        # another outcome of the same check: the route is not the Sidecar's defaultEndpoint
        ((_chain(tls=True, prefix="/stats"),), Status.FAIL),
        # no chain for the port at all
        ((), Status.FAIL),
    ],
    ids=["gap", "fixed", "other-outcome", "missing"],
)
def test_legacy_sidecar_listener_outcome_is_mapped_through_the_gap_table(
    fake: FakeKube,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    chains: tuple[dict[str, Any], ...],
    status: Status,
) -> None:
    Controller(fake)
    backend = _backend(fake, tmp_path)
    dep = backend.deploy(scenario("legacy-sidecar"), MtlsMode.PERMISSIVE)
    assert dep.variant.id == "as-documented"
    pod = dep.workload("httpbin").pod_name
    fake.exec_answers[(pod, PROXY, CONFIG_DUMP[0])] = ExecResult(_dump(*chains), "", 0)
    (outcome,) = run_checks(backend, dep, "1.31.1", only={LISTENERS.id})
    assert outcome.status is status, outcome.message
    assert outcome.gap == ("" if status is Status.FAIL else GAP)
    if status is Status.FAIL:
        assert outcome.code == "SMC001"
    backend.close()


def test_the_same_failure_where_no_gap_applies_is_a_fail(
    fake: FakeKube,  # noqa: F811
    tmp_path: Path,
) -> None:
    Controller(fake)
    backend = _backend(fake, tmp_path)
    dep = backend.deploy(scenario("legacy-sidecar"), MtlsMode.STRICT)  # no gap in STRICT
    pod = dep.workload("httpbin").pod_name
    fake.exec_answers[(pod, PROXY, CONFIG_DUMP[0])] = ExecResult(
        _dump(_chain(tls=True), _chain(tls=False)), "", 0
    )
    (outcome,) = run_checks(backend, dep, "1.31.1", only={LISTENERS.id})
    assert outcome.status is Status.FAIL
    assert outcome.gap == ""
    backend.close()
