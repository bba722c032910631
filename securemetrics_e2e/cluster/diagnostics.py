"""Capture cluster state when something fails, before anything is torn down.

Written to ``<artifacts>/<timestamp>-<label>/``: pods as YAML, events, container logs
(the previous instance's too when a container restarted), each proxy's config_dump,
``istioctl proxy-config listeners`` and ``istioctl analyze`` output, and the
scraper's Prometheus targets. A collector that fails writes its error into
``errors.txt`` and the others carry on: a partial capture beats none.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from securemetrics_e2e.cluster.istio import KubeTarget, analyze_command, listeners_command
from securemetrics_e2e.cluster.kube import KubeAPI, Obj
from securemetrics_e2e.istionames import PROXY_CONTAINER

CONFIG_DUMP_COMMAND = ("pilot-agent", "request", "GET", "config_dump")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "capture"


@dataclass
class Capture:
    """One diagnostics directory being written."""

    directory: Path
    written: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def write(self, relative: str, text: str) -> None:
        path = self.directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.written.append(relative)

    def attempt(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # a failing collector must not stop the others
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")

    def attempt_write(self, what: str, relative: str, produce: Callable[[], str]) -> None:
        self.attempt(what, lambda: self.write(relative, produce()))


def collect(
    api: KubeAPI,
    *,
    artifacts_dir: Path,
    label: str,
    reason: str,
    namespaces: Sequence[str],
    istioctl: str | None = None,
    target: KubeTarget | None = None,
    prometheus_targets: Callable[[], Any] | None = None,
    command_timeout: float = 60.0,
) -> Path:
    """Write everything worth seeing about ``namespaces`` and return the directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    directory = artifacts_dir / f"{stamp}-{_slug(label)}"
    suffix = 1
    while directory.exists():
        suffix += 1
        directory = artifacts_dir / f"{stamp}-{_slug(label)}-{suffix}"
    directory.mkdir(parents=True)
    cap = Capture(directory)
    cap.write("reason.txt", reason.rstrip() + "\n")
    for ns in dict.fromkeys(namespaces):
        _namespace_diagnostics(api, cap, ns, istioctl, target, command_timeout)
    if prometheus_targets is not None:
        fetch = prometheus_targets
        cap.attempt_write(
            "Prometheus targets",
            "prometheus-targets.json",
            lambda: json.dumps(fetch(), indent=1, default=str),
        )
    summary = [f"reason: {reason.splitlines()[0] if reason else ''}", "written:"]
    summary += [f"  {item}" for item in cap.written]
    if cap.errors:
        summary.append("not captured:")
        summary += [f"  {e}" for e in cap.errors]
        (directory / "errors.txt").write_text("\n".join(cap.errors) + "\n")
    (directory / "summary.txt").write_text("\n".join(summary) + "\n")
    return directory


def _namespace_diagnostics(
    api: KubeAPI,
    cap: Capture,
    ns: str,
    istioctl: str | None,
    target: KubeTarget | None,
    timeout: float,
) -> None:
    pods: list[Obj] = []
    try:
        pods = api.list("v1", "Pod", ns)
        cap.write(f"{ns}/pods.yaml", yaml.safe_dump_all(pods, sort_keys=False))
    except Exception as exc:
        cap.errors.append(f"pods in {ns}: {type(exc).__name__}: {exc}")
    cap.attempt_write(f"events in {ns}", f"{ns}/events.txt", partial(_events, api, ns))
    for pod in pods:
        _pod_diagnostics(api, cap, ns, pod, istioctl, target, timeout)
    if istioctl is not None and target is not None:
        cap.attempt_write(
            f"istioctl analyze -n {ns}",
            f"{ns}/istioctl-analyze.txt",
            partial(_run, analyze_command(istioctl, target, ns), timeout),
        )


def _pod_diagnostics(
    api: KubeAPI,
    cap: Capture,
    ns: str,
    pod: Obj,
    istioctl: str | None,
    target: KubeTarget | None,
    timeout: float,
) -> None:
    name = str((pod.get("metadata") or {}).get("name", ""))
    status = pod.get("status") or {}
    statuses = list(status.get("initContainerStatuses") or []) + list(
        status.get("containerStatuses") or []
    )
    for cs in statuses:
        container = str(cs.get("name", ""))
        cap.attempt_write(
            f"log of {ns}/{name}/{container}",
            f"{ns}/logs/{name}.{container}.log",
            partial(api.logs, ns, name, container),
        )
        if int(cs.get("restartCount") or 0) > 0:
            cap.attempt_write(
                f"previous log of {ns}/{name}/{container}",
                f"{ns}/logs/{name}.{container}.previous.log",
                partial(api.logs, ns, name, container, previous=True),
            )
    running = {
        str(cs.get("name"))
        for cs in status.get("containerStatuses") or []
        if "running" in (cs.get("state") or {})
    }
    if PROXY_CONTAINER not in running:
        return

    def config_dump() -> str:
        result = api.exec(ns, name, PROXY_CONTAINER, CONFIG_DUMP_COMMAND, timeout=timeout)
        if result.exit_code != 0:
            raise RuntimeError(f"exit {result.exit_code}: {result.stderr.strip()[:300]}")
        return result.stdout

    cap.attempt_write(f"config_dump of {ns}/{name}", f"{ns}/config_dump/{name}.json", config_dump)
    if istioctl is not None and target is not None:
        cap.attempt_write(
            f"istioctl proxy-config listeners {name}",
            f"{ns}/proxy-config/{name}.listeners.txt",
            partial(_run, listeners_command(istioctl, target, name, ns), timeout),
        )


def _events(api: KubeAPI, ns: str) -> str:
    events = api.list("v1", "Event", ns)
    events.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    lines = []
    for e in events:
        obj = e.get("involvedObject") or {}
        lines.append(
            f"{e.get('lastTimestamp') or e.get('eventTime') or '-'} {e.get('type', '')} "
            f"{obj.get('kind', '')}/{obj.get('name', '')} {e.get('reason', '')}: "
            f"{e.get('message', '')}"
        )
    return "\n".join(lines) + ("\n" if lines else "")


def _run(command: Iterable[str], timeout: float) -> str:
    args = list(command)
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"$ {' '.join(args)}\n(timed out after {timeout:g}s)\n"
    return f"$ {' '.join(args)}\n(exit {done.returncode})\n{done.stdout}{done.stderr}"
