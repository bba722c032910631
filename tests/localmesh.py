"""Helpers for tests that run the local backend: skip reasons and leftover detection."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from securemetrics_e2e.local.netns import PodNetwork


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def child_pids(pid: int) -> set[int]:
    """Live descendants of ``pid`` (from /proc), to prove nothing was left running."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


requires_local_mesh = pytest.mark.skipif(
    shutil.which("prometheus") is None or PodNetwork.available() is not None,
    reason="the local mesh needs a `prometheus` binary (Debian package prometheus) and "
    "permission to create network namespaces (root)",
)
