"""Kubeconfig checks: a missing or broken file, an unknown context, a dead API server.

Each becomes a clear error naming the file, the context and the fix, within seconds
and before the client library (with its retries and temp files) is involved.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from securemetrics_e2e.cluster.errors import ClusterUnreachable, KubeconfigInvalid

# -- kubeconfig and reachability ------------------------------------------------------


@dataclass(frozen=True)
class KubeconfigInfo:
    """What a kubeconfig says about the cluster the run will talk to."""

    files: tuple[Path, ...]
    context: str
    cluster: str
    server: str


def kubeconfig_paths(explicit: Path | None) -> tuple[Path, ...]:
    if explicit is not None:
        return (explicit,)
    env = os.environ.get("KUBECONFIG")
    if env:
        return tuple(Path(p) for p in env.split(os.pathsep) if p)
    return (Path.home() / ".kube" / "config",)


def read_kubeconfig(explicit: Path | None, context: str | None) -> KubeconfigInfo:
    """Parse the kubeconfig and find the context; raise :class:`KubeconfigInvalid`."""
    paths = kubeconfig_paths(explicit)
    merged: dict[str, list[Mapping[str, Any]]] = {"contexts": [], "clusters": []}
    current: str | None = None
    readable = []
    for path in paths:
        source = "--kubeconfig" if explicit is not None else "KUBECONFIG / ~/.kube/config"
        if not path.is_file():
            if explicit is None and len(paths) > 1:
                continue  # kubectl too skips missing files of a KUBECONFIG list
            raise KubeconfigInvalid(
                f"kubeconfig {path} (from {source}) does not exist; pass --kubeconfig PATH "
                "of your cluster's kubeconfig"
            )
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise KubeconfigInvalid(f"kubeconfig {path} cannot be read: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise KubeconfigInvalid(
                f"kubeconfig {path} is not valid YAML{where}: "
                f"{getattr(exc, 'problem', None) or exc}; "
                "fix the file or point --kubeconfig at another one "
                "(kubectl config view --raw shows what kubectl reads)"
            ) from None
        if not isinstance(data, dict) or not (
            isinstance(data.get("clusters"), list) and isinstance(data.get("contexts"), list)
        ):
            raise KubeconfigInvalid(
                f"kubeconfig {path} is YAML but not a kubeconfig (it needs 'clusters' and "
                "'contexts' lists); point --kubeconfig at your cluster's kubeconfig"
            )
        readable.append(path)
        merged["contexts"] += [c for c in data["contexts"] if isinstance(c, dict)]
        merged["clusters"] += [c for c in data["clusters"] if isinstance(c, dict)]
        current = current or data.get("current-context") or None
    if not readable:
        raise KubeconfigInvalid(
            "none of the kubeconfig files exists: " + ", ".join(map(str, paths))
        )
    names = [str(c.get("name")) for c in merged["contexts"]]
    chosen = context or current
    if not chosen:
        raise KubeconfigInvalid(
            f"kubeconfig {', '.join(map(str, readable))} has no current-context; pass "
            f"--kube-context NAME (contexts: {', '.join(names) or 'none'})"
        )
    ctx = next((c for c in merged["contexts"] if c.get("name") == chosen), None)
    if ctx is None:
        raise KubeconfigInvalid(
            f"context {chosen!r} is not in kubeconfig {', '.join(map(str, readable))}; "
            f"contexts there: {', '.join(names) or 'none'}"
        )
    cluster_name = str((ctx.get("context") or {}).get("cluster", ""))
    cluster = next((c for c in merged["clusters"] if c.get("name") == cluster_name), None)
    server = str(((cluster or {}).get("cluster") or {}).get("server", ""))
    if not server:
        raise KubeconfigInvalid(
            f"context {chosen!r} names cluster {cluster_name!r}, which has no server URL in "
            f"kubeconfig {', '.join(map(str, readable))}"
        )
    return KubeconfigInfo(tuple(readable), str(chosen), cluster_name, server)


def check_reachable(info: KubeconfigInfo, timeout: float = 3.0) -> None:
    """Open a TCP connection to the API server; raise :class:`ClusterUnreachable`.

    A plain connect answers "is anything there" in milliseconds, before the client
    library's retries and TLS would turn a dead server into a long hang.
    """
    parts = urlsplit(info.server)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    hint = (
        f"check that the cluster is running and that context {info.context!r} in "
        f"{', '.join(map(str, info.files))} points at it (kubectl --context {info.context} "
        "get nodes); for a fresh cluster use --sm-backend kind"
    )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except TimeoutError:
        raise ClusterUnreachable(
            f"the Kubernetes API server {info.server} did not answer within {timeout:g}s; {hint}"
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ClusterUnreachable(
            f"the Kubernetes API server {info.server} is unreachable ({reason}); {hint}"
        ) from None
