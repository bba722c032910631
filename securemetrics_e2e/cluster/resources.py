"""Objects a run creates, and waiting for them: run labels, namespaces, rollouts.

Every object a run creates carries :data:`RUN_LABEL` with the run's id, and cleanup
deletes only objects that carry it. Rollout waits poll the controllers and their pods
and stop at once when a container is stuck for a reason waiting will not fix
(ImagePullBackOff, CrashLoopBackOff, ...), with the pod's events in the error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securemetrics_e2e.cluster.errors import DeployFailed
from securemetrics_e2e.cluster.kube import MANAGED_BY, RUN_LABEL, KubeAPI, Obj
from securemetrics_e2e.waiting import NotYet, WaitTimeout, wait_for

#: container waiting reasons that will not resolve by waiting longer
FATAL_WAITING_REASONS = frozenset(
    {
        "ImagePullBackOff",
        "InvalidImageName",
        "CrashLoopBackOff",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


# -- labels and namespaces ------------------------------------------------------------


def with_run_label(obj: Mapping[str, Any], run_id: str) -> Obj:
    """A copy of ``obj`` labelled as created by run ``run_id``."""
    out = copy.deepcopy(dict(obj))
    labels = out.setdefault("metadata", {}).setdefault("labels", {})
    labels.update(MANAGED_BY)
    labels[RUN_LABEL] = run_id
    return out


def namespace_manifest(
    name: str, run_id: str, *, injection: bool = True, revision: str | None = None
) -> Obj:
    """A namespace for one scenario: run-labelled, with sidecar injection switched on."""
    labels: dict[str, str] = {}
    if injection:
        if revision:
            labels["istio.io/rev"] = revision
        else:
            labels["istio-injection"] = "enabled"
    return with_run_label(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}},
        run_id,
    )


def is_ours(obj: Mapping[str, Any], run_id: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return bool(run_id) and labels.get(RUN_LABEL) == run_id


def delete_run_namespaces(api: KubeAPI, run_id: str) -> list[str]:
    """Delete every namespace labelled with ``run_id``, and nothing else.

    The label is checked again on each namespace returned, so a server (or proxy) that
    ignored the selector still cannot make this delete a namespace the run did not make.
    """
    if not run_id:
        raise ValueError("refusing to clean up without a run id")
    found = api.list("v1", "Namespace", label_selector=f"{RUN_LABEL}={run_id}")
    deleted = []
    for ns in found:
        name = str((ns.get("metadata") or {}).get("name", ""))
        if name and is_ours(ns, run_id) and api.delete("v1", "Namespace", name):
            deleted.append(name)
    return deleted


def delete_objects(api: KubeAPI, objects: Iterable[Mapping[str, Any]], run_id: str) -> list[str]:
    """Delete those of ``objects`` that exist and carry this run's label, in reverse order."""
    deleted = []
    for obj in reversed(list(objects)):
        meta = obj.get("metadata") or {}
        name, namespace = str(meta.get("name", "")), meta.get("namespace")
        live = api.get(str(obj["apiVersion"]), str(obj["kind"]), name, namespace)
        if live is not None and is_ours(live, run_id):
            api.delete(str(obj["apiVersion"]), str(obj["kind"]), name, namespace)
            deleted.append(f"{obj['kind']}/{name}")
    return deleted


# -- rollouts -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """A controller whose rollout a deploy waits for."""

    kind: str  # Deployment | StatefulSet | DaemonSet
    name: str
    namespace: str

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name} in {self.namespace}"


@dataclass
class RolloutState:
    done: bool
    summary: str
    pods: list[Obj] = field(default_factory=list)


def rollout_state(api: KubeAPI, workload: Rollout) -> RolloutState:
    """How far ``workload``'s rollout is, as ``kubectl rollout status`` judges it."""
    api_version = "apps/v1"
    obj = api.get(api_version, workload.kind, workload.name, workload.namespace)
    if obj is None:
        return RolloutState(False, f"{workload} does not exist yet")
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    selector = _selector(spec.get("selector") or {})
    pods = api.list("v1", "Pod", workload.namespace, label_selector=selector) if selector else []
    generation = (obj.get("metadata") or {}).get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return RolloutState(False, f"{workload}: spec change not yet observed", pods)
    if workload.kind == "DaemonSet":
        want = status.get("desiredNumberScheduled", 0)
        have = (status.get("updatedNumberScheduled", 0), status.get("numberAvailable", 0))
        done = want > 0 and have == (want, want)
        return RolloutState(done, f"{workload}: {have[1]}/{want} available", pods)
    want = spec.get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    total = status.get("replicas", 0)
    ready_key = "availableReplicas" if workload.kind == "Deployment" else "readyReplicas"
    ready = status.get(ready_key, 0)
    done = updated == want and ready >= want and total == updated
    if workload.kind == "StatefulSet" and status.get("updateRevision"):
        done = done and status.get("currentRevision") == status.get("updateRevision")
    return RolloutState(done, f"{workload}: {ready}/{want} ready, {updated} updated", pods)


def _selector(selector: Mapping[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        op, key = expr.get("operator"), expr.get("key")
        values = ",".join(expr.get("values") or [])
        if op == "In":
            parts.append(f"{key} in ({values})")
        elif op == "NotIn":
            parts.append(f"{key} notin ({values})")
        elif op == "Exists":
            parts.append(str(key))
        elif op == "DoesNotExist":
            parts.append(f"!{key}")
    return ",".join(parts)


@dataclass(frozen=True)
class StuckContainer:
    pod: str
    namespace: str
    container: str
    reason: str
    message: str


def fatal_containers(pods: Iterable[Mapping[str, Any]]) -> list[StuckContainer]:
    """Containers waiting for a reason that waiting longer will not fix."""
    stuck = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        statuses = list(status.get("initContainerStatuses") or []) + list(
            status.get("containerStatuses") or []
        )
        for cs in statuses:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in FATAL_WAITING_REASONS:
                stuck.append(
                    StuckContainer(
                        pod=str(meta.get("name", "")),
                        namespace=str(meta.get("namespace", "")),
                        container=str(cs.get("name", "")),
                        reason=str(waiting["reason"]),
                        message=str(waiting.get("message", "")),
                    )
                )
    return stuck


def pod_events(api: KubeAPI, namespace: str, pod: str, limit: int = 15) -> list[str]:
    """The pod's events, oldest first, as ``Type Reason: message (xN)`` lines."""
    events = [
        e
        for e in api.list("v1", "Event", namespace)
        if (e.get("involvedObject") or {}).get("name") == pod
    ]
    events.sort(key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
    lines = []
    for e in events[-limit:]:
        count = e.get("count") or 1
        suffix = f" (x{count})" if count > 1 else ""
        lines.append(f"{e.get('type', '')} {e.get('reason', '')}: {e.get('message', '')}{suffix}")
    return lines


def wait_rollouts(
    api: KubeAPI,
    workloads: Sequence[Rollout],
    *,
    timeout: float,
    on_failure: Callable[[str], Path | None] | None = None,
    interval: float = 0.5,
    max_interval: float = 3.0,
) -> None:
    """Wait until every workload has rolled out; fail fast on a container that cannot start.

    ``on_failure`` runs before the error is raised (the backend captures diagnostics
    there, while the pods still exist) and returns the directory it wrote, which the
    error names.
    """
    pending = list(workloads)
    last: dict[Rollout, RolloutState] = {}

    def probe() -> None:
        for workload in list(pending):
            state = rollout_state(api, workload)
            last[workload] = state
            stuck = fatal_containers(state.pods)
            if stuck:
                raise _Fatal(stuck)
            if state.done:
                pending.remove(workload)
        if pending:
            raise NotYet("; ".join(last[w].summary for w in pending))

    try:
        wait_for(
            "rollout of " + ", ".join(str(w) for w in workloads),
            probe,
            timeout=timeout,
            interval=interval,
            max_interval=max_interval,
        )
    except _Fatal as fatal:
        lines = []
        for s in fatal.stuck:
            lines.append(f"pod {s.pod} in {s.namespace}: container {s.container} is {s.reason}")
            if s.message:
                lines.append(f"  {s.message}")
            lines += [f"  event: {line}" for line in pod_events(api, s.namespace, s.pod)]
        message = "deployment cannot become ready (not waiting for the timeout):\n" + "\n".join(
            lines
        )
        artifacts = on_failure(message) if on_failure else None
        raise DeployFailed(message, artifacts) from None
    except WaitTimeout as exc:
        lines = [f"rollout did not finish within {timeout:g}s:"]
        for w in pending:
            state = last.get(w)
            lines.append(f"  {state.summary if state else w}")
            for pod in state.pods if state else []:
                name = str((pod.get("metadata") or {}).get("name", ""))
                phase = (pod.get("status") or {}).get("phase", "?")
                lines.append(f"  pod {name}: {phase}")
                lines += [f"    event: {line}" for line in pod_events(api, w.namespace, name)]
        message = "\n".join(lines) if pending else str(exc)
        artifacts = on_failure(message) if on_failure else None
        raise DeployFailed(message, artifacts) from None


class _Fatal(Exception):
    def __init__(self, stuck: list[StuckContainer]) -> None:
        super().__init__(", ".join(f"{s.pod}/{s.container}: {s.reason}" for s in stuck))
        self.stuck = stuck


def running_pods(api: KubeAPI, namespace: str, selector: str) -> list[Obj]:
    """Pods matching ``selector`` that run and are not being deleted, newest first."""
    pods = [
        p
        for p in api.list("v1", "Pod", namespace, label_selector=selector)
        if (p.get("status") or {}).get("phase") == "Running"
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    pods.sort(
        key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp", "")), reverse=True
    )
    return pods
