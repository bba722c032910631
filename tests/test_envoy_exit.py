"""An Envoy that aborts before it is ready is reported with the reason it logged.

The real Envoy is made to abort the way a loaded machine made it abort: it runs as a
user (uid 4242, nobody's) whose inotify instances are all held, so it cannot watch its
SDS files (source/common/filesystem/inotify/watcher_impl.cc asserts). The reason is in
the first line of the abort, above a stack trace longer than a log tail.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from securemetrics_e2e.local.envoy import envoy_binary, exit_problem

UID = 4242
IN_NONBLOCK = 0o4000


def _hold_every_inotify_instance_as_uid() -> None:
    """In the child, before exec: become ``UID`` and take every inotify instance that
    user may have; the descriptors stay open across exec, so Envoy finds none left."""
    os.setgroups([])
    os.setgid(UID)
    os.setuid(UID)
    libc = ctypes.CDLL(None, use_errno=True)
    while libc.inotify_init1(IN_NONBLOCK) >= 0:
        pass


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory ``UID`` can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="smx-envoy-exit-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _config(sds_dir: Path) -> dict[str, object]:
    """Admin, and one TLS listener whose root comes from a watched SDS file."""
    tls = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
    source = {"path": str(sds_dir / "root.json"), "watched_directory": {"path": str(sds_dir)}}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "secure",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "tcp",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions."
                                        "filters.network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "tcp",
                                        "cluster": "none",
                                    },
                                }
                            ],
                            "transport_socket": {
                                "name": "tls",
                                "typed_config": {
                                    "@type": f"{tls}.DownstreamTlsContext",
                                    "common_tls_context": {
                                        "validation_context_sds_secret_config": {
                                            "name": "ROOTCA",
                                            "sds_config": {"path_config_source": source},
                                        }
                                    },
                                },
                            },
                        }
                    ],
                }
            ],
            "clusters": [{"name": "none", "connect_timeout": "1s"}],
        },
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run Envoy as another user")
def test_an_envoy_without_inotify_is_reported_with_the_fix(public_dir: Path) -> None:
    binary = public_dir / "envoy"
    shutil.copyfile(envoy_binary(), binary)  # its own path may be private to root
    binary.chmod(0o755)
    root = {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "ROOTCA",
                "validation_context": {"trusted_ca": {"inline_string": "unused"}},
            }
        ]
    }
    (public_dir / "root.json").write_text(json.dumps(root))
    config = public_dir / "envoy.json"
    config.write_text(json.dumps(_config(public_dir)))
    for path in public_dir.iterdir():
        path.chmod(0o755 if path == binary else 0o644)
    argv = [str(binary), "-c", str(config), "--disable-hot-restart", "--concurrency", "1"]
    argv += ["--service-node", "n", "--service-cluster", "n"]
    done = subprocess.run(
        argv,
        preexec_fn=_hold_every_inotify_instance_as_uid,
        close_fds=False,  # fds are closed after preexec_fn: it would free what it took
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0, done.stderr[-2000:]
    # the reason is above a stack trace longer than the twenty lines a tail keeps
    assert "inotify" not in "\n".join(done.stderr.splitlines()[-20:])
    problem = exit_problem("httpbin-1", done.returncode, done.stderr)
    assert "Envoy in pod httpbin-1 aborted: no inotify instance left" in str(problem)
    assert "sysctl -w fs.inotify.max_user_instances=1024" in str(problem)


def test_another_early_exit_names_the_first_critical_line() -> None:
    log = "\n".join(
        ["[2026-11-26][1][critical][main] error initializing config: no such file"]
        + [f"[backtrace] #{i}" for i in range(30)]
    )
    problem = str(exit_problem("httpbin-1", 1, log))
    assert problem.startswith("Envoy in pod httpbin-1 exited with 1: ")
    assert "error initializing config: no such file" in problem.splitlines()[0]
