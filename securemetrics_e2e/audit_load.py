"""Reading audit inputs: files and directories into documents, and documents into a model
(scrape jobs, pod templates) the rules judge."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from securemetrics_e2e.audit_findings import AuditInputError, AuditResult

SECURE_PORT_ANNOTATION: Final = "prometheus.istio.io/secure-port"
SECURE_ENVOY_PORT_ANNOTATION: Final = "prometheus.istio.io/secure-envoy-port"
PROXY_CONFIG_ANNOTATION: Final = "proxy.istio.io/config"
USER_VOLUME_MOUNT: Final = "sidecar.istio.io/userVolumeMount"
INCLUDE_INBOUND: Final = "traffic.sidecar.istio.io/includeInboundPorts"
INCLUDE_OUTBOUND: Final = "traffic.sidecar.istio.io/includeOutboundIPRanges"
INJECT: Final = "sidecar.istio.io/inject"
MERGED_ENV: Final = "ENVOY_SECURE_MERGED_METRICS_PORT"
ENVOY_ENV: Final = "ENVOY_SECURE_METRICS_PORT"
GATEWAY_NAME_LABEL: Final = "gateway.networking.k8s.io/gateway-name"
PLAINTEXT_PORTS: Final = frozenset({15020, 15090})
SECURE_PORTS: Final = frozenset({15091, 15092})
SD_ANNOTATION = "__meta_kubernetes_pod_annotation_"


# ---------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Doc:
    file: str
    line: int
    data: Any
    #: job name -> line of its entry, for a Prometheus configuration read from YAML
    job_lines: Mapping[str, int] = field(default_factory=dict)


def _job_lines(node: yaml.Node) -> dict[str, int]:
    lines: dict[str, int] = {}
    if not isinstance(node, yaml.MappingNode):
        return lines
    for key, value in node.value:
        if key.value != "scrape_configs" or not isinstance(value, yaml.SequenceNode):
            continue
        for job in value.value:
            if not isinstance(job, yaml.MappingNode):
                continue
            for k, v in job.value:
                if k.value == "job_name" and isinstance(v, yaml.ScalarNode):
                    lines.setdefault(str(v.value), job.start_mark.line + 1)
    return lines


def _documents(path: Path, text: str) -> Iterator[tuple[int, Any, dict[str, int]]]:
    if path.suffix.lower() == ".json":
        try:
            yield 1, json.loads(text), {}
        except json.JSONDecodeError as exc:
            raise AuditInputError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        return
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            lines = _job_lines(node)
            yield node.start_mark.line + 1, loader.construct_document(node), lines
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise AuditInputError(f"{path}{where}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


_INPUT_SUFFIXES: Final = frozenset({".yaml", ".yml", ".json"})


def _files(paths: Sequence[Path]) -> list[Path]:
    """The input files, each once however often it is given (a file and its directory)."""
    files: dict[Path, Path] = {}
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _INPUT_SUFFIXES
            )
        elif path.is_file():
            found = [path]
        else:
            raise AuditInputError(
                f"{path} does not exist: give Prometheus configs, manifests or dirs"
            )
        for file in found:
            files.setdefault(file.resolve(), file)
    return list(files.values())


def load(paths: Sequence[Path], result: AuditResult) -> list[Doc]:
    """Every document of every input file; Helm templates are skipped and listed."""
    if not paths:
        raise AuditInputError("nothing to audit: give Prometheus configs, manifests or directories")
    docs: list[Doc] = []
    for file in _files(paths):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditInputError(f"cannot read {file}: {exc}") from None
        result.files += 1
        try:
            found = [
                Doc(str(file), line, data, jobs) for line, data, jobs in _documents(file, text)
            ]
        except AuditInputError:
            if "{{" in text:
                # an unrendered Helm template: its final form is unknown
                result.templates.append(str(file))
                continue
            raise
        docs.extend(d for d in found if d.data is not None)
    return docs


# ---------------------------------------------------------------------- model


@dataclass(frozen=True)
class ScrapeJob:
    name: str
    config: Mapping[str, Any]
    file: str
    line: int
    origin: str  # "" for a file, "ConfigMap ns/name data[key]" when embedded


@dataclass(frozen=True)
class PodView:
    """A pod as its template declares it (Pod, workload template, Prometheus CR, Gateway)."""

    subject: str
    file: str
    line: int
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    containers: tuple[Mapping[str, Any], ...]
    volumes: tuple[Mapping[str, Any], ...]
    injected: bool  # the sidecar injector processes this pod
    #: the Prometheus Operator mounts into its own prometheus container
    operator_mounts: tuple[Mapping[str, Any], ...] = ()
    secret_dirs: tuple[str, ...] = ()


def as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def str_map(value: Any) -> dict[str, str]:
    return {str(k): "" if v is None else str(v) for k, v in as_map(value).items()}


def subject_of(obj: Mapping[str, Any]) -> str:
    meta = as_map(obj.get("metadata"))
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{obj.get('kind')} {ns}/{name}" if ns else f"{obj.get('kind')} {name}"


_WORKLOADS: Final = frozenset(
    {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}
)


def _pod_template(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    kind = obj.get("kind")
    spec = as_map(obj.get("spec"))
    if kind == "Pod":
        return obj
    if kind in _WORKLOADS:
        return as_map(spec.get("template"))
    if kind == "CronJob":
        return as_map(as_map(as_map(spec.get("jobTemplate")).get("spec")).get("template"))
    return None


def _is_injected(labels: Mapping[str, str], annotations: Mapping[str, str]) -> bool:
    flag = labels.get(INJECT, annotations.get(INJECT, ""))
    return flag.lower() != "false"


def _view(doc: Doc, meta: Mapping[str, Any], spec: Mapping[str, Any], **extra: Any) -> PodView:
    """The pod a workload's template (or a Prometheus resource) describes."""
    obj = doc.data
    labels, annotations = str_map(meta.get("labels")), str_map(meta.get("annotations"))
    return PodView(
        subject_of(obj),
        doc.file,
        doc.line,
        str(as_map(obj.get("metadata")).get("namespace", "") or ""),
        labels,
        annotations,
        tuple(as_map(c) for c in as_list(spec.get("containers"))),
        tuple(as_map(v) for v in as_list(spec.get("volumes"))),
        _is_injected(labels, annotations),
        **extra,
    )


def pod_views(doc: Doc) -> Iterator[PodView]:
    obj = doc.data
    template = _pod_template(obj)
    if template is not None:
        yield _view(doc, as_map(template.get("metadata")), as_map(template.get("spec")))
    elif obj.get("kind") == "Prometheus" and str(obj.get("apiVersion", "")).startswith(
        "monitoring.coreos.com/"
    ):
        spec = as_map(obj.get("spec"))
        yield _view(
            doc,
            as_map(spec.get("podMetadata")),
            spec,
            operator_mounts=tuple(as_map(m) for m in as_list(spec.get("volumeMounts"))),
            secret_dirs=tuple(f"/etc/prometheus/secrets/{s}" for s in as_list(spec.get("secrets"))),
        )


def proxy_metadata(annotations: Mapping[str, str]) -> dict[str, str]:
    """The ``proxyMetadata`` of a ``proxy.istio.io/config`` annotation ({} if none/unreadable)."""
    text = annotations.get(PROXY_CONFIG_ANNOTATION)
    if not text:
        return {}
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        return {}
    return str_map(as_map(config).get("proxyMetadata"))


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    env = {}
    for item in as_list(container.get("env")):
        var = as_map(item)
        if "name" in var and "value" in var:
            env[str(var["name"])] = str(var["value"])
    return env


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    match = str_map(as_map(selector).get("matchLabels"))
    return all(labels.get(k) == v for k, v in match.items())
