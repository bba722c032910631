"""A FAKE Kubernetes API at the cluster backend's client seam (``KubeAPI``).

No cluster can run on the machines this project is built on, so control flow that
depends on what a live API server reports (a pod stuck in ImagePullBackOff, which
namespaces exist) is driven through this in-memory stand-in. It is deliberately small:
objects in a dict, label selectors, a hook per kind to play a controller, canned exec
answers. It proves nothing about Kubernetes itself and is used for nothing else.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import requests

from securemetrics_e2e.cluster.kube import FIELD_MANAGER, ExecResult, KubeAPI

Obj = dict[str, Any]
Key = tuple[str, str, str | None, str]
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
}

_SET_EXPR = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics for =, ==, !=, in, notin, key and !key."""
    if not selector:
        return True
    # split on commas that are not inside parentheses
    parts, depth, current = [], 0, ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for raw in parts:
        part = raw.strip()
        match = _SET_EXPR.match(part)
        if match:
            key, op, values = match[1], match[2], {v.strip() for v in match[3].split(",")}
            inside = labels.get(key) in values
            if (op == "in") != inside:
                return False
        elif "!=" in part:
            key, value = part.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif part.startswith("!"):
            if part[1:] in labels:
                return False
        elif part not in labels:
            return False
    return True


@dataclass
class FakeKube:
    """In-memory objects behind the ``KubeAPI`` protocol."""

    version: str = "v1.36.4-fake"
    #: where service proxy URLs point (nothing answers there unless a test puts a server)
    proxy_base: str = "http://127.0.0.1:9"
    #: a misbehaving server (or proxy) that ignores label selectors on list
    ignore_selectors: bool = False
    objects: dict[Key, Obj] = field(default_factory=dict)
    #: called as hook(fake, obj) whenever an object of that kind is read: plays a controller
    on_get: dict[str, Callable[[FakeKube, Obj], None]] = field(default_factory=dict)
    #: answers for exec: (pod, container, first word of the command) -> result
    exec_answers: dict[tuple[str, str, str], ExecResult] = field(default_factory=dict)
    logs_by_container: dict[tuple[str, str, bool], str] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    deleted: list[Key] = field(default_factory=list)

    # -- helpers for tests ------------------------------------------------------------

    def add(self, obj: Mapping[str, Any]) -> Obj:
        stored = copy.deepcopy(dict(obj))
        meta = stored.setdefault("metadata", {})
        meta.setdefault("generation", 1)
        self.objects[self._key_of(stored)] = stored
        return stored

    def find(self, kind: str, name: str, namespace: str | None = None) -> Obj | None:
        for (_, k, ns, n), obj in self.objects.items():
            if k == kind and n == name and ns == (None if kind in CLUSTER_SCOPED else namespace):
                return obj
        return None

    def _key_of(self, obj: Mapping[str, Any]) -> Key:
        kind = str(obj["kind"])
        meta = obj.get("metadata") or {}
        namespace = None if kind in CLUSTER_SCOPED else meta.get("namespace", "default")
        return (str(obj["apiVersion"]), kind, namespace, str(meta["name"]))

    # -- KubeAPI ----------------------------------------------------------------------

    def server_version(self) -> str:
        self.calls.append(("version",))
        return self.version

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> Obj | None:
        self.calls.append(("get", kind, name, str(namespace)))
        key = (api_version, kind, None if kind in CLUSTER_SCOPED else namespace, name)
        obj = self.objects.get(key)
        if obj is None:
            return None
        hook = self.on_get.get(kind)
        if hook is not None:
            hook(self, obj)
        return copy.deepcopy(obj)

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str = "",
    ) -> list[Obj]:
        self.calls.append(("list", kind, str(namespace), label_selector))
        found = []
        for (av, k, ns, _), obj in self.objects.items():
            if av != api_version or k != kind:
                continue
            if namespace is not None and ns != namespace:
                continue
            labels = (obj.get("metadata") or {}).get("labels") or {}
            if self.ignore_selectors or selector_matches(label_selector, labels):
                found.append(copy.deepcopy(obj))
        return found

    def apply(self, obj: Mapping[str, Any], *, field_manager: str = FIELD_MANAGER) -> Obj:
        self.calls.append(("apply", str(obj["kind"]), str(obj["metadata"]["name"]), field_manager))
        key = self._key_of(obj)
        stored = copy.deepcopy(dict(obj))
        previous = self.objects.get(key)
        generation = (previous or {}).get("metadata", {}).get("generation", 0) + 1
        stored.setdefault("metadata", {})["generation"] = generation
        if previous is not None and "status" in previous:
            stored["status"] = previous["status"]
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        self.calls.append(("delete", kind, name, str(namespace)))
        key = (api_version, kind, None if kind in CLUSTER_SCOPED else namespace, name)
        if key not in self.objects:
            return False
        del self.objects[key]
        self.deleted.append(key)
        if kind == "Namespace":  # as the namespace controller does, eventually
            for other in [k for k in self.objects if k[2] == name]:
                del self.objects[other]
        return True

    def patch(
        self,
        api_version: str,
        kind: str,
        name: str,
        namespace: str | None,
        body: Any,
        *,
        patch_type: str = "strategic",
    ) -> Obj:
        """Enough patching for control flow: a json 'replace' or a recursive dict merge."""
        self.calls.append(("patch", kind, name, patch_type))
        key = (api_version, kind, None if kind in CLUSTER_SCOPED else namespace, name)
        obj = self.objects[key]
        if patch_type == "json":
            for op in body:
                parts = [p for p in op["path"].split("/") if p]
                target = obj
                for part in parts[:-1]:
                    target = target[part]
                target[parts[-1]] = copy.deepcopy(op["value"])
        else:
            _merge(obj, body)
        obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        return copy.deepcopy(obj)

    def exec(
        self, namespace: str, pod: str, container: str, command: Sequence[str], *, timeout: float
    ) -> ExecResult:
        self.calls.append(("exec", pod, container, " ".join(command)))
        answer = self.exec_answers.get((pod, container, command[0]))
        return answer or ExecResult("", f"fake: no answer for {command[0]}", 126)

    def service_proxy_url(self, namespace: str, service: str, port: int) -> str:
        return f"{self.proxy_base}/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy"

    def http_session(self) -> requests.Session:
        return requests.Session()

    def logs(self, namespace: str, pod: str, container: str, *, previous: bool = False) -> str:
        self.calls.append(("logs", pod, container, str(previous)))
        return self.logs_by_container.get((pod, container, previous), "")


def _merge(target: Obj, patch: Mapping[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


# -- object builders used by the tests ------------------------------------------------------


def namespace(name: str, labels: Mapping[str, str] | None = None) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": dict(labels or {})},
    }


def deployment(name: str, ns: str, app: str, replicas: int = 1, ready: int = 0) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "generation": 1},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": app}}},
        "status": {
            "observedGeneration": 1,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "availableReplicas": ready,
            "readyReplicas": ready,
        },
    }


def pod(
    name: str,
    ns: str,
    app: str,
    *,
    phase: str = "Pending",
    waiting: Mapping[str, tuple[str, str]] | None = None,
    init_waiting: Mapping[str, tuple[str, str]] | None = None,
    ip: str = "10.244.0.7",
) -> Obj:
    def statuses(items: Mapping[str, tuple[str, str]] | None) -> list[Obj]:
        return [
            {"name": c, "ready": False, "state": {"waiting": {"reason": r, "message": m}}}
            for c, (r, m) in (items or {}).items()
        ]

    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
        "status": {
            "phase": phase,
            "podIP": ip,
            "containerStatuses": statuses(waiting),
            "initContainerStatuses": statuses(init_waiting),
        },
    }


def event(ns: str, pod_name: str, reason: str, message: str, when: str, count: int = 1) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{pod_name}.{reason}.{when}", "namespace": ns},
        "involvedObject": {"kind": "Pod", "name": pod_name, "namespace": ns},
        "type": "Warning" if reason in {"Failed", "BackOff"} else "Normal",
        "reason": reason,
        "message": message,
        "lastTimestamp": when,
        "count": count,
    }


if TYPE_CHECKING:
    # mypy (nox -s lint checks this file) holds the fake to the seam it stands in for
    _CONFORMS: KubeAPI = FakeKube()


# -- the API server's service proxy to a Prometheus --------------------------------------------


class PrometheusProxy(BaseHTTPRequestHandler):
    """The API server's service proxy to a Prometheus (``proxy_base`` of :class:`FakeKube`),
    served on loopback: a subclass's :meth:`data` is the ``data`` of Prometheus' JSON
    envelope for the request's path."""

    def data(self, path: str) -> Any:
        raise NotImplementedError

    def do_GET(self) -> None:
        body = json.dumps({"status": "success", "data": self.data(self.path)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        return


@contextmanager
def serving(handler: type[PrometheusProxy]) -> Iterator[str]:
    """``handler`` on a loopback port of its own, for the block: its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
