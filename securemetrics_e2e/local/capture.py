"""Inbound capture: the iptables rules istio-iptables installs, in a pod's network namespace.

The rules follow istio/istio ``tools/istio-iptables/pkg/capture/run.go`` (``Run``,
``handleInboundPortsInclude``) in REDIRECT mode, as its golden files show them
(``tools/istio-iptables/pkg/capture/testdata/inbound-ports-wildcard.golden``): in the nat
table, chain ``ISTIO_INBOUND`` (entered from PREROUTING for TCP) returns the tunnel port
15008 and every excluded port, and sends the rest to ``ISTIO_IN_REDIRECT``, which
REDIRECTs to 15006. With an include list only those ports are redirected; with an empty
include list (``traffic.sidecar.istio.io/includeInboundPorts: ""``) PREROUTING gets no
jump at all: nothing inbound is captured.

Outbound capture (``ISTIO_OUTPUT`` / ``ISTIO_REDIRECT`` to 15001, owner uid 1337) is not
installed: the secure-metrics path is inbound only, the scraper excludes its own outbound
traffic (``includeOutboundIPRanges: ""``), and the one ISTIO_OUTPUT rule that touches
inbound traffic lets Envoy's 127.0.0.6-sourced passthrough connections pass untouched,
which is what a namespace without ISTIO_OUTPUT does as well.

Rules live only in the pod's namespace: they go when the namespace is deleted.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from securemetrics_e2e.errors import EnvironmentProblem
from securemetrics_e2e.local.bootstrap import SdsFiles
from securemetrics_e2e.local.faults import Fault
from securemetrics_e2e.local.inbound import (
    INBOUND_CAPTURE_PORT,
    TUNNEL_PORT,
    Capture,
    pod_inbound,
)
from securemetrics_e2e.local.netns import Pod, try_in_scratch_netns
from securemetrics_e2e.local.virtualinbound import (
    InboundLog,
    inbound_clusters,
    virtual_inbound_listener,
)


def iptables_rules(capture: Capture) -> list[str]:
    """The nat-table rules istio-iptables adds for inbound capture, in its order."""
    rules = [
        f"-A ISTIO_INBOUND -p tcp --dport {TUNNEL_PORT} -j RETURN",
        f"-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {INBOUND_CAPTURE_PORT}",
    ]
    if capture.include == "":
        return rules
    rules.append("-A PREROUTING -p tcp -j ISTIO_INBOUND")
    if capture.include == "*":
        rules += [f"-A ISTIO_INBOUND -p tcp --dport {p} -j RETURN" for p in capture.exclude]
        rules.append("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT")
    else:
        rules += [
            f"-A ISTIO_INBOUND -p tcp --dport {p.strip()} -j ISTIO_IN_REDIRECT"
            for p in capture.include.split(",")
        ]
    return rules


def restore_input(capture: Capture) -> str:
    """``iptables-restore --noflush`` input installing :func:`iptables_rules`."""
    lines = ["*nat", ":ISTIO_INBOUND - [0:0]", ":ISTIO_IN_REDIRECT - [0:0]"]
    return "\n".join([*lines, *iptables_rules(capture), "COMMIT", ""])


@functools.cache
def unavailable_reason() -> str | None:
    """None when iptables can capture inside a namespace here, else why not (asked once)."""
    if os.geteuid() != 0:
        return "installing iptables rules in a pod namespace needs root (CAP_NET_ADMIN)"
    if shutil.which("iptables-restore") is None or shutil.which("ip") is None:
        return "no iptables-restore on PATH: install the Debian package `iptables`"

    def load_rules(probe: str) -> str | None:
        done = subprocess.run(
            ["ip", "netns", "exec", probe, "iptables-restore", "--noflush"],
            input=restore_input(Capture("*", ())),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            return f"iptables-restore cannot load nat rules here: {done.stderr.strip()}"
        return None

    return try_in_scratch_netns("smx-iptprobe", load_rules)


def install(pod: Pod, capture: Capture) -> None:
    """Install ``capture``'s rules in ``pod``'s namespace (never on the host)."""
    if pod.netns is None:
        raise EnvironmentProblem(
            f"pod {pod.name} has no network namespace of its own: inbound capture would "
            "change the host's iptables; run with --local-network netns"
        )
    done = subprocess.run(
        pod.command(["iptables-restore", "--noflush"]),
        input=restore_input(capture),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise EnvironmentProblem(
            f"iptables-restore in pod {pod.name} failed (exit {done.returncode}): "
            f"{done.stderr.strip()}"
        )


def installed_rules(pod: Pod) -> list[str]:
    """The nat rules now in ``pod``'s namespace (``iptables -S``), for reports and tests."""
    done = subprocess.run(
        pod.command(["iptables", "-w", "-t", "nat", "-S"]),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise EnvironmentProblem(f"iptables -S in pod {pod.name} failed: {done.stderr.strip()}")
    return [line for line in done.stdout.splitlines() if line.startswith("-A ")]


def capture_sidecar(
    pod: Pod,
    objects: Sequence[Mapping[str, Any]],
    workload: str,
    sds: SdsFiles,
    access_log: Path,
    fault: Fault | None = None,
) -> tuple[tuple[dict[str, Any], list[dict[str, Any]]], InboundLog]:
    """Capture ``pod``'s inbound traffic as istio-init would; return the virtualInbound
    listener and clusters istiod would send its Envoy (for ``build_bootstrap``), and the
    access log that listener writes, with the capture feeding it.

    All come from ``objects``, the manifests of the pod's run unit. Under
    :attr:`Fault.CAPTURE_MISSING` the rules are not installed (a failed istio-init).
    """
    inbound = pod_inbound(objects, workload)
    listener = virtual_inbound_listener(inbound, sds, access_log=access_log, fault=fault)
    installed = fault is not Fault.CAPTURE_MISSING
    if installed:
        install(pod, inbound.capture)
    log = InboundLog(access_log, inbound.capture if installed else None)
    return (listener, inbound_clusters(inbound, pod.ip)), log
