"""Audit a user's own Prometheus configuration and Kubernetes manifests for secure-metrics mistakes.

The conformance run proves a mesh works; the audit reads what a user is about to deploy
(or has deployed and exported) and points at the known ways secure scraping breaks, each
as a coded finding with a hint, in the manner of ``istioctl analyze``:

=====  ========  =================================================================
code   severity  finding
=====  ========  =================================================================
SM001  error     a scrape job reads the plaintext Istio ports 15020 / 15090
SM002  warning   an http job follows ``prometheus.io/port``, which is 15020 on meshed pods
SM003  error     secure merged port open, ``prometheus.istio.io/secure-port`` missing or wrong
SM004  warning   secure Envoy port open, ``prometheus.istio.io/secure-envoy-port`` missing
SM005  error     the OUTPUT_CERTS volume is not mounted in both containers
SM006  warning   ``INBOUND_CAPTURE_PORTS`` set: nothing in Istio reads it
SM007  warning   Prometheus client certificates from a static Secret: they never rotate
SM008  warning   the scraper's sidecar captures the scrape traffic
SM009  error     a secure-port job presents no client certificate
SM010  error     a secure-port job verifies the server certificate against the pod IP
SM011  warning   a Gateway API gateway opens the ports only through infrastructure annotations
=====  ========  =================================================================

The facts behind each finding are in the project's ISTIO-FACTS.md; the issue numbers in
the hints are Istio's, where users reported the breakage.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from securemetrics_e2e.audit_findings import (
    EXIT_STATUS,
    RULES,
    AuditInputError,
    AuditResult,
    Finding,
    Rule,
    Severity,
    plural,
    render_json,
    render_text,
    summary_line,
)
from securemetrics_e2e.audit_load import (
    ENVOY_ENV,
    GATEWAY_NAME_LABEL,
    INCLUDE_INBOUND,
    INCLUDE_OUTBOUND,
    MERGED_ENV,
    PLAINTEXT_PORTS,
    PROXY_CONFIG_ANNOTATION,
    SD_ANNOTATION,
    SECURE_ENVOY_PORT_ANNOTATION,
    SECURE_PORT_ANNOTATION,
    SECURE_PORTS,
    USER_VOLUME_MOUNT,
    Doc,
    PodView,
    ScrapeJob,
    as_list,
    as_map,
    container_env,
    load,
    pod_views,
    proxy_metadata,
    selects,
    str_map,
    subject_of,
)

__all__ = [
    "EXIT_STATUS",
    "RULES",
    "AuditInputError",
    "AuditResult",
    "Finding",
    "Rule",
    "Severity",
    "audit",
    "proxy_metadata",
    "render_json",
    "render_text",
    "summary_line",
]


# ---------------------------------------------------------------------- prometheus rules


def _relabels(job: ScrapeJob) -> list[dict[str, Any]]:
    return [as_map(r) for r in as_list(job.config.get("relabel_configs"))]


def _sources(rule: Mapping[str, Any]) -> list[str]:
    return [str(s) for s in as_list(rule.get("source_labels"))]


def _scheme(job: ScrapeJob) -> str:
    return str(job.config.get("scheme", "http")).lower()


def _static_ports(job: ScrapeJob) -> set[int]:
    ports = set()
    for group in as_list(job.config.get("static_configs")):
        for target in as_list(as_map(group).get("targets")):
            match = re.search(r":(\d+)$", str(target))
            if match:
                ports.add(int(match[1]))
    return ports


def _regex_matches_port(regex: str, ports: Iterable[int]) -> set[int]:
    try:
        compiled = re.compile(regex)
    except re.error:
        return set()
    return {p for p in ports if compiled.fullmatch(str(p))}


def _plaintext_ports_read(job: ScrapeJob) -> set[int]:
    """Which of 15020 / 15090 the job's targets end up on (by static target or relabeling)."""
    ports = _static_ports(job) & PLAINTEXT_PORTS
    for rule in _relabels(job):
        action = str(rule.get("action", "replace")).lower()
        sources = _sources(rule)
        if rule.get("target_label") == "__address__" and action == "replace":
            for port in PLAINTEXT_PORTS:
                if re.search(rf":{port}\b", str(rule.get("replacement", ""))):
                    ports.add(port)
        if action == "keep":
            regex = str(rule.get("regex", "(.*)"))
            if "__meta_kubernetes_pod_container_port_name" in sources and "envoy-prom" in regex:
                ports.add(15090)  # Istio names 15090 "http-envoy-prom"
            if "__meta_kubernetes_pod_container_port_number" in sources:
                ports |= _regex_matches_port(regex, PLAINTEXT_PORTS)
    return ports


def _uses_annotation(job: ScrapeJob, annotation: str) -> bool:
    label = SD_ANNOTATION + re.sub(r"[^a-zA-Z0-9_]", "_", annotation)
    return any(label in _sources(rule) for rule in _relabels(job))


def _drops_meshed(job: ScrapeJob) -> bool:
    for rule in _relabels(job):
        action = str(rule.get("action", "replace")).lower()
        joined = " ".join(_sources(rule))
        meshed = "sidecar_istio_io_status" in joined or "prometheus_istio_io_secure" in joined
        if action == "drop" and meshed:
            return True
        if action == "keep" and "sidecar_istio_io_inject" in joined:
            return "false" in str(rule.get("regex", ""))
    return False


def _secure_job(job: ScrapeJob) -> bool:
    return (
        _uses_annotation(job, SECURE_PORT_ANNOTATION)
        or _uses_annotation(job, SECURE_ENVOY_PORT_ANNOTATION)
        or bool(_static_ports(job) & SECURE_PORTS)
    )


def _job_subject(job: ScrapeJob) -> str:
    where = f" in {job.origin}" if job.origin else ""
    return f"job {job.name!r}{where}"


def _audit_job(job: ScrapeJob, pods: Sequence[PodView]) -> Iterator[Finding]:
    subject = _job_subject(job)

    def finding(code: str, message: str) -> Finding:
        return Finding(code, message, job.file, job.line, subject)

    scheme = _scheme(job)
    if scheme != "https":
        read = sorted(_plaintext_ports_read(job))
        if read:
            yield finding(
                "SM001",
                f"scrapes port {', '.join(map(str, read))} over {scheme}: Istio's plaintext "
                "metrics, readable by any pod that can reach them",
            )
        elif _uses_annotation(job, "prometheus.io/port") and not _drops_meshed(job):
            yield finding(
                "SM002",
                "takes the target port from prometheus.io/port over http; on every meshed pod "
                "that is 15020, so this job reads their merged metrics in plaintext",
            )
    if not _secure_job(job):
        return
    tls = as_map(job.config.get("tls_config"))
    if scheme == "https" and not (tls.get("cert_file") and tls.get("key_file")):
        yield finding(
            "SM009",
            "scrapes the secure metrics port without tls_config cert_file and key_file: the "
            "handshake is refused",
        )
    if scheme == "https" and not tls.get("insecure_skip_verify") and not tls.get("server_name"):
        yield finding(
            "SM010",
            "verifies the server certificate against the pod IP, which workload certificates "
            "never carry: every scrape fails with an x509 error",
        )
    for path in (str(tls.get(k, "")) for k in ("cert_file", "key_file")):
        source = _static_secret_source(path, pods) if path else None
        if source:
            yield finding("SM007", f"reads {path} from {source}")


def _static_secret_source(path: str, pods: Sequence[PodView]) -> str | None:
    """The Secret a file path of a Prometheus pod comes from, if any pod mounts one there."""
    target = PurePosixPath(path)
    for pod in pods:
        volumes = {str(v.get("name")): v for v in pod.volumes}
        mounts = list(pod.operator_mounts) + [
            as_map(m) for c in pod.containers for m in as_list(c.get("volumeMounts"))
        ]
        for mount in mounts:
            base = PurePosixPath(str(mount.get("mountPath", "/nonexistent")))
            if target == base or base in target.parents:
                secret = as_map(volumes.get(str(mount.get("name")), {}).get("secret"))
                if secret:
                    return f"Secret {secret.get('secretName', '?')} mounted by {pod.subject}"
        for directory in pod.secret_dirs:
            if PurePosixPath(directory) in target.parents:
                return f"a Secret listed in spec.secrets of {pod.subject}"
    return None


# ---------------------------------------------------------------------- pod rules


def _secure_ports_env(pod: PodView, proxy_configs: Sequence[Doc]) -> tuple[dict[str, str], str]:
    """The secure-port variables a pod's proxy gets, and how (decides auto-annotation)."""
    meta = proxy_metadata(pod.annotations)
    env = {k: v for k, v in meta.items() if k in (MERGED_ENV, ENVOY_ENV) and v not in ("", "0")}
    if env:
        return env, "proxyMetadata"
    for container in pod.containers:
        if container.get("name") == "istio-proxy":
            found = container_env(container)
            env = {k: v for k, v in found.items() if k in (MERGED_ENV, ENVOY_ENV) and v != "0"}
            if env:
                return env, "container env"
    for doc in proxy_configs:
        spec = as_map(doc.data.get("spec"))
        ns = str(as_map(doc.data.get("metadata")).get("namespace", "") or "")
        if ns and pod.namespace and ns != pod.namespace:
            continue
        if "selector" in spec and selects(as_map(spec.get("selector")), pod.labels):
            found = str_map(spec.get("environmentVariables"))
            env = {k: v for k, v in found.items() if k in (MERGED_ENV, ENVOY_ENV) and v != "0"}
            if env:
                return env, "ProxyConfig"
    return {}, ""


def _audit_pod_ports(pod: PodView, proxy_configs: Sequence[Doc]) -> Iterator[Finding]:
    env, how = _secure_ports_env(pod, proxy_configs)

    def finding(code: str, message: str) -> Finding:
        return Finding(code, message, pod.file, pod.line, pod.subject)

    merged = env.get(MERGED_ENV)
    annotated = pod.annotations.get(SECURE_PORT_ANNOTATION)
    if merged:
        # The injector copies the merged port into the annotation only for injected pods
        # whose proxyMetadata sets it (istio/istio PR #60430).
        automatic = how == "proxyMetadata" and pod.injected
        if annotated is None and not automatic:
            yield finding(
                "SM003",
                f"opens {MERGED_ENV}={merged} through {how} but has no {SECURE_PORT_ANNOTATION} "
                "annotation, and the injector will not add one here",
            )
        elif annotated is not None and annotated not in (merged, env.get(ENVOY_ENV)):
            yield finding(
                "SM003",
                f"{SECURE_PORT_ANNOTATION} is {annotated!r}, but {MERGED_ENV} is {merged}: the "
                "secure job scrapes a port nothing serves",
            )
    envoy = env.get(ENVOY_ENV)
    if envoy and SECURE_ENVOY_PORT_ANNOTATION not in pod.annotations:
        yield finding(
            "SM004",
            f"opens {ENVOY_ENV}={envoy} through {how} but has no "
            f"{SECURE_ENVOY_PORT_ANNOTATION} annotation",
        )


def _user_volume_mounts(pod: PodView) -> list[dict[str, Any]]:
    text = pod.annotations.get(USER_VOLUME_MOUNT, "")
    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if isinstance(value, dict):  # the older map form: {"volume": {"mountPath": ...}}
        return [{"name": k, **as_map(v)} for k, v in value.items()]
    return [as_map(v) for v in as_list(value)]


def _audit_scraper(pod: PodView) -> Iterator[Finding]:
    meta = proxy_metadata(pod.annotations)

    def finding(code: str, message: str) -> Finding:
        return Finding(code, message, pod.file, pod.line, pod.subject)

    if "INBOUND_CAPTURE_PORTS" in meta:
        yield finding(
            "SM006",
            "proxyMetadata sets INBOUND_CAPTURE_PORTS, which no Istio component reads"
            + ("" if INCLUDE_INBOUND in pod.annotations else f"; {INCLUDE_INBOUND} is not set"),
        )
    out_dir = meta.get("OUTPUT_CERTS")
    if not out_dir:
        return
    missing = [a for a in (INCLUDE_INBOUND, INCLUDE_OUTBOUND) if pod.annotations.get(a) != ""]
    if pod.injected and missing:
        yield finding(
            "SM008",
            f'writes certificates with OUTPUT_CERTS but lacks {", ".join(missing)} set to ""',
        )
    problems = _output_certs_problems(pod, out_dir)
    if problems:
        yield finding("SM005", f"OUTPUT_CERTS={out_dir}: " + "; ".join(problems))


def _output_certs_problems(pod: PodView, out_dir: str) -> list[str]:
    target = PurePosixPath(out_dir)
    proxy_mounts = [
        m for m in _user_volume_mounts(pod) if PurePosixPath(str(m.get("mountPath", ""))) == target
    ]
    for container in pod.containers:
        if container.get("name") == "istio-proxy":  # a template that declares the proxy itself
            proxy_mounts += [
                as_map(m)
                for m in as_list(container.get("volumeMounts"))
                if PurePosixPath(str(as_map(m).get("mountPath", ""))) == target
            ]
    if not proxy_mounts:
        return [
            f"no volume is mounted at {out_dir} in istio-proxy ({USER_VOLUME_MOUNT}), so the "
            "certificates stay inside the sidecar"
        ]
    name = str(proxy_mounts[0].get("name", ""))
    declared = {str(v.get("name")) for v in pod.volumes}
    problems = []
    if name not in declared:
        problems.append(f"volume {name!r} mounted into istio-proxy is not declared in the pod")
    others = [
        str(c.get("name"))
        for c in pod.containers
        if c.get("name") != "istio-proxy"
        and any(as_map(m).get("name") == name for m in as_list(c.get("volumeMounts")))
    ]
    if not others and not any(m.get("name") == name for m in pod.operator_mounts):
        problems.append(
            f"volume {name!r} is mounted into istio-proxy but into no other container: "
            "Prometheus cannot read the certificates"
        )
    return problems


# ---------------------------------------------------------------------- other objects


def _audit_monitor(doc: Doc) -> Iterator[Finding]:
    """ServiceMonitor / PodMonitor endpoints: plaintext Istio ports, static Secrets."""
    obj = doc.data
    spec = as_map(obj.get("spec"))
    endpoints = as_list(spec.get("endpoints")) + as_list(spec.get("podMetricsEndpoints"))
    for ep in map(as_map, endpoints):
        port = str(ep.get("port", "")) + " " + str(ep.get("targetPort", ""))
        scheme = str(ep.get("scheme", "http")).lower()
        if scheme != "https" and re.search(r"\b(15020|15090)\b|envoy-prom", port):
            yield Finding(
                "SM001",
                f"endpoint port {port.strip()!r} is Istio's plaintext metrics port, scraped "
                f"over {scheme}",
                doc.file,
                doc.line,
                subject_of(obj),
            )
        tls = as_map(ep.get("tlsConfig"))
        cert = as_map(as_map(tls.get("cert")).get("secret"))
        key = as_map(tls.get("keySecret"))
        if cert or key:
            name = cert.get("name") or key.get("name") or "?"
            yield Finding(
                "SM007",
                f"tlsConfig takes the client certificate from Secret {name!r}",
                doc.file,
                doc.line,
                subject_of(obj),
            )


def _audit_gateway(doc: Doc, proxy_configs: Sequence[Doc]) -> Iterator[Finding]:
    obj = doc.data
    name = str(as_map(obj.get("metadata")).get("name", ""))
    annotations = str_map(as_map(as_map(obj.get("spec")).get("infrastructure")).get("annotations"))
    meta = proxy_metadata(annotations)
    ports = {k: v for k, v in meta.items() if k in (MERGED_ENV, ENVOY_ENV)}
    pod_labels = {GATEWAY_NAME_LABEL: name}
    namespace = str(as_map(obj.get("metadata")).get("namespace", "") or "")
    pod = PodView(
        subject_of(obj), doc.file, doc.line, namespace, pod_labels, annotations, (), (), False
    )
    via_config = _secure_ports_env(
        PodView(subject_of(obj), doc.file, doc.line, namespace, pod_labels, {}, (), (), False),
        proxy_configs,
    )[0]
    if ports and not via_config:
        yield Finding(
            "SM011",
            f"sets {', '.join(sorted(ports))} in spec.infrastructure.annotations "
            f"{PROXY_CONFIG_ANNOTATION} and no ProxyConfig selects {GATEWAY_NAME_LABEL}={name}",
            doc.file,
            doc.line,
            subject_of(obj),
        )
    if via_config:
        yield from _audit_pod_ports(pod, proxy_configs)


def _embedded_configs(doc: Doc) -> Iterator[tuple[str, Any]]:
    """Prometheus configurations inside a ConfigMap or Secret (key, parsed data)."""
    obj = doc.data
    kind = obj.get("kind")
    if kind not in ("ConfigMap", "Secret"):
        return
    items: dict[str, str] = {}
    for key, value in as_map(obj.get("data")).items():
        if kind == "Secret":
            try:
                items[str(key)] = base64.b64decode(str(value), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                continue
        else:
            items[str(key)] = str(value)
    items.update({str(k): str(v) for k, v in as_map(obj.get("stringData")).items()})
    for key, text in items.items():
        if "scrape_configs" not in text and "job_name" not in text:
            continue
        try:
            yield key, yaml.safe_load(text)
        except yaml.YAMLError:
            continue


def _jobs_of(config: Any, file: str, line: int, origin: str) -> Iterator[ScrapeJob]:
    # A full configuration, or a bare list of jobs (Prometheus Operator additionalScrapeConfigs).
    jobs = as_list(config.get("scrape_configs")) if isinstance(config, dict) else as_list(config)
    for job in map(as_map, jobs):
        if "job_name" in job:
            yield ScrapeJob(str(job["job_name"]), job, file, line, origin)


def _is_prometheus_config(data: Any) -> bool:
    return isinstance(data, dict) and "scrape_configs" in data and "kind" not in data


def _objects(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict) and "apiVersion" in data and "kind" in data:
        if str(data["kind"]).endswith("List"):
            for item in as_list(data.get("items")):
                yield from _objects(item)
        else:
            yield data


def audit(paths: Sequence[Path]) -> AuditResult:
    """Read ``paths`` (files or directories) and return every finding, in input order."""
    result = AuditResult()
    docs = load(paths, result)
    result.documents = len(docs)
    jobs: list[ScrapeJob] = []
    objects: list[Doc] = []
    for doc in docs:
        if _is_prometheus_config(doc.data):
            result.prometheus_configs += 1
            for job in _jobs_of(doc.data, doc.file, doc.line, ""):
                line = doc.job_lines.get(job.name, doc.line)
                jobs.append(ScrapeJob(job.name, job.config, job.file, line, job.origin))
            continue
        found = [Doc(doc.file, doc.line, obj) for obj in _objects(doc.data)]
        if not found:
            result.ignored.append(f"{doc.file}:{doc.line}")
        for obj in found:
            objects.append(obj)
            for key, config in _embedded_configs(obj):
                origin = f"{subject_of(obj.data)} key {key}"
                embedded = list(_jobs_of(config, obj.file, obj.line, origin))
                if embedded:
                    result.prometheus_configs += 1
                    jobs.extend(embedded)
    result.objects = len(objects)
    proxy_configs = [
        d
        for d in objects
        if d.data.get("kind") == "ProxyConfig"
        and str(d.data.get("apiVersion", "")).startswith("networking.istio.io/")
    ]
    pods = [view for doc in objects for view in pod_views(doc)]
    for job in jobs:
        result.findings.extend(_audit_job(job, pods))
    for doc in objects:
        kind = doc.data.get("kind")
        if kind in ("ServiceMonitor", "PodMonitor"):
            result.findings.extend(_audit_monitor(doc))
        elif kind == "Gateway" and str(doc.data.get("apiVersion", "")).startswith(
            "gateway.networking.k8s.io/"
        ):
            result.findings.extend(_audit_gateway(doc, proxy_configs))
    for pod in pods:
        result.findings.extend(_audit_pod_ports(pod, proxy_configs))
        result.findings.extend(_audit_scraper(pod))
    if not result.prometheus_configs and not result.objects:
        raise AuditInputError(_nothing_audited(paths, result))
    return result


def _nothing_audited(paths: Sequence[Path], result: AuditResult) -> str:
    """Why an audit found nothing to judge: zero findings there would prove nothing."""
    given = ", ".join(str(p) for p in paths)
    if result.templates:
        return (
            f"nothing to audit in {given}: only unrendered Helm templates "
            f"({', '.join(result.templates)}); render them with `helm template` and audit that"
        )
    return (
        f"nothing to audit in {given}: {plural(result.files, 'file')} read, no Prometheus "
        "configuration (scrape_configs) and no Kubernetes object (apiVersion, kind) found; give "
        "your prometheus.yml or rendered manifests"
    )
