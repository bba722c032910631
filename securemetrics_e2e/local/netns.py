"""Pods as network namespaces on this machine.

Each run makes a private "node" namespace holding a bridge, and one namespace per pod
joined to it by a veth pair, so every pod has its own address, its own loopback and a
real "outside" (another pod). Nothing is added to the host's own network: pod
addresses live only inside namespaces this run created, and removing the node
namespace removes every veth and route with it.

Where namespaces cannot be created (no CAP_SYS_ADMIN), :class:`LoopbackNetwork` gives
each pod a distinct 127.0.0.0/8 address on the host loopback instead; that network has
no "outside the pod", so scenarios needing pod isolation skip with that reason.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from securemetrics_e2e.errors import EnvironmentProblem

T = TypeVar("T")

_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/var/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise EnvironmentProblem(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def _enter(netns: str) -> None:
    """Move the calling thread (only it) into ``netns``; threads it starts inherit it."""
    fd = os.open(os.path.join(_NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class Pod:
    """A pod's network identity: where its processes run and how to reach it."""

    name: str
    ip: str
    #: the address "localhost" means inside this pod (127.0.0.1 in a namespace)
    loopback: str
    netns: str | None = None
    #: the run that made this pod: its processes carry it (see local/owner.py)
    run_id: str = ""
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` with this pod's network (sockets it opens belong to the pod)."""
        if self.netns is None:
            return fn()
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                _enter(self.netns)  # type: ignore[arg-type]
                box["value"] = fn()
            except BaseException as exc:  # handed back to the caller's thread
                box["error"] = exc

        worker = threading.Thread(target=body, name=f"netns-{self.name}", daemon=True)
        worker.start()
        worker.join()
        if "error" in box:
            raise box["error"]
        return box["value"]  # type: ignore[no-any-return]

    def start_thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        """Start a daemon thread living in this pod's network (e.g. a server loop)."""

        def body() -> None:
            if self.netns is not None:
                _enter(self.netns)
            target()

        thread = threading.Thread(target=body, name=f"{self.name}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped so that the process runs inside this pod's network."""
        if self.netns is None:
            return list(argv)
        return ["ip", "netns", "exec", self.netns, *argv]


_scratch_names = itertools.count()


def try_in_scratch_netns(prefix: str, then: Callable[[str], str | None]) -> str | None:
    """Add a throwaway network namespace, run ``then`` with its name, delete it: None when
    both went, else why not (the machine's answer, for an "unavailable" reason).

    The name is this call's own: threads asking at once (three meshes started side by
    side, each asking whether it may capture) each add their namespace. With one name per
    process, all but one failed to add it and took "File exists" for the machine's answer,
    and their mesh went without inbound capture, skipping what needs it."""
    probe = f"{prefix}-{os.getpid()}-{next(_scratch_names)}"
    proc = subprocess.run(
        ["ip", "netns", "add", probe], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        return f"`ip netns add` failed: {proc.stderr.strip() or 'no ip command'}"
    try:
        return then(probe)
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


@functools.cache
def _netns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_SYS_ADMIN)"
    return try_in_scratch_netns("smx-probe", lambda _: None)


_loopback_networks = itertools.count()


class PodNetwork:
    """Namespaces joined by a bridge in a private node namespace. Always :meth:`close`."""

    kind = "netns"
    isolated = True

    def __init__(self, run_id: str, subnet_prefix: str = "10.244.0") -> None:
        self.run_id = run_id
        self._prefix = subnet_prefix
        self.node = f"smx-{run_id}-node"
        self.pods: dict[str, Pod] = {}
        self._namespaces: list[str] = []
        self._indexes = itertools.count(2)  # .1 is left unused, like a gateway address
        try:
            self._add_netns(self.node)
            _ip("-n", self.node, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.node, "link", "set", "br0", "up")
            _ip("-n", self.node, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def available() -> str | None:
        """None when namespaces can be made here, else why not (asked once per process)."""
        return _netns_unavailable_reason()

    def _add_netns(self, name: str) -> None:
        if os.path.exists(os.path.join(_NETNS_DIR, name)):
            raise EnvironmentProblem(
                f"network namespace {name!r} already exists: another run with id "
                f"{self.run_id!r} is active; delete it with `ip netns del {name}`"
            )
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def add_pod(self, name: str) -> Pod:
        index = next(self._indexes)  # never reused within a run: no stale neighbour entries
        if index > 254:
            raise EnvironmentProblem("a local pod network holds at most 253 pods")
        netns = f"smx-{self.run_id}-{name}"
        self._add_netns(netns)
        veth = f"v{index}"
        _ip(
            "-n",
            self.node,
            "link",
            "add",
            veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        )
        _ip("-n", self.node, "link", "set", veth, "master", "br0", "up")
        ip = f"{self._prefix}.{index}"
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        pod = Pod(name=name, ip=ip, loopback="127.0.0.1", netns=netns, run_id=self.run_id)
        self.pods[name] = pod
        return pod

    def remove_pod(self, name: str) -> None:
        """Delete a pod's namespace (its veth goes with it). Stop its processes first."""
        pod = self.pods.pop(name, None)
        if pod is not None and pod.netns in self._namespaces:
            _ip("netns", "del", pod.netns)
            self._namespaces.remove(pod.netns)

    def close(self) -> None:
        """Delete every namespace this network made (pods first, then the node), including
        one a stop signal cut off between `ip netns add` and its name being recorded:
        every name of this run starts with ``smx-<run id>-`` and run ids are unique."""
        try:
            present = os.listdir(_NETNS_DIR)
        except OSError:
            present = []
        prefix = f"smx-{self.run_id}-"
        mine = dict.fromkeys(
            [*self._namespaces, *sorted(n for n in present if n.startswith(prefix))]
        )
        # the node goes last: the pods' veth peers live in it
        self._namespaces = [self.node] if self.node in mine else []
        self._namespaces += [n for n in mine if n != self.node]
        for name in reversed(self._namespaces):
            proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            if proc.returncode != 0 and os.path.exists(os.path.join(_NETNS_DIR, name)):
                # a process still inside keeps it busy; the caller stops processes first
                raise EnvironmentProblem(f"could not delete network namespace {name}")
        self._namespaces.clear()
        self.pods.clear()


class LoopbackNetwork:
    """Fallback without namespaces: each pod is a distinct 127.0.0.0/8 address."""

    kind = "loopback"
    isolated = False

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        # a block of addresses of its own per network, so runs in other processes and
        # other networks of this process do not collide
        block = hash((os.getpid(), next(_loopback_networks))) % (150 * 250)
        self._octets = f"127.{100 + block % 150}.{block // 150}"
        self.pods: dict[str, Pod] = {}
        self._indexes = itertools.count(2)

    def add_pod(self, name: str) -> Pod:
        index = next(self._indexes)
        if index > 254:
            raise EnvironmentProblem("a local loopback pod network holds at most 253 pods")
        ip = f"{self._octets}.{index}"
        pod = Pod(name=name, ip=ip, loopback=ip, netns=None, run_id=self.run_id)
        self.pods[name] = pod
        return pod

    def remove_pod(self, name: str) -> None:
        self.pods.pop(name, None)

    def close(self) -> None:
        self.pods.clear()
