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
import enum
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

import yaml

from securemetrics_e2e.errors import UsageError

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
_SD_ANNOTATION = "__meta_kubernetes_pod_annotation_"


class Severity(enum.IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2

    def __str__(self) -> str:
        return self.name.lower()


#: exit status per highest severity at or above the threshold (2 is a usage error)
EXIT_STATUS: Final = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 3}


@dataclass(frozen=True)
class Rule:
    code: str
    severity: Severity
    title: str
    hint: str


RULES: Final[dict[str, Rule]] = {
    r.code: r
    for r in (
        Rule(
            "SM001",
            Severity.ERROR,
            "scrape job reads a plaintext Istio metrics port (15020 / 15090)",
            "scrape the secure ports instead: scheme https, tls_config with the OUTPUT_CERTS "
            "files, and the address from the prometheus.istio.io/secure-port annotation "
            "(`securemetrics-e2e scrape-config` prints a working configuration); with "
            "METRICS_LOCALHOST_ACCESS_ONLY these ports refuse other pods anyway",
        ),
        Rule(
            "SM002",
            Severity.WARNING,
            "http job follows prometheus.io/port, which the injector sets to 15020 on meshed pods",
            "drop meshed pods from this job (e.g. a drop rule on "
            "__meta_kubernetes_pod_annotation_prometheus_istio_io_secure_port or "
            "__meta_kubernetes_pod_annotationpresent_sidecar_istio_io_status) and scrape "
            "them with a secure-port job",
        ),
        Rule(
            "SM003",
            Severity.ERROR,
            "secure merged port open but prometheus.istio.io/secure-port missing or wrong",
            "annotate the pod template with prometheus.istio.io/secure-port set to "
            "ENVOY_SECURE_MERGED_METRICS_PORT: the injector adds it only to injected sidecars "
            "whose proxyMetadata sets the port; without it the secure job silently finds "
            "zero targets (istio#19874)",
        ),
        Rule(
            "SM004",
            Severity.WARNING,
            "secure Envoy port open but prometheus.istio.io/secure-envoy-port missing",
            "nothing sets prometheus.istio.io/secure-envoy-port automatically: annotate the "
            "pod template with the ENVOY_SECURE_METRICS_PORT value, or the Envoy-only job "
            "never scrapes it",
        ),
        Rule(
            "SM005",
            Severity.ERROR,
            "the OUTPUT_CERTS volume is not mounted in both istio-proxy and Prometheus",
            "declare one volume (emptyDir, medium Memory), mount it into istio-proxy with "
            "sidecar.istio.io/userVolumeMount at the OUTPUT_CERTS path, and into the "
            "Prometheus container where tls_config reads the files (istio#29919)",
        ),
        Rule(
            "SM006",
            Severity.WARNING,
            "INBOUND_CAPTURE_PORTS is set, but nothing in Istio reads it",
            'use the pod annotations traffic.sidecar.istio.io/includeInboundPorts: "" and '
            'traffic.sidecar.istio.io/includeOutboundIPRanges: "" to keep the scraper\'s '
            "sidecar out of its traffic, as Istio's own integration test does",
        ),
        Rule(
            "SM007",
            Severity.WARNING,
            "Prometheus client certificates come from a static Secret and will never rotate",
            "workload certificates live 24 h by default: let the scraper's sidecar write "
            "them with OUTPUT_CERTS into a shared emptyDir, which the agent rewrites on "
            "rotation (istio#28050)",
        ),
        Rule(
            "SM008",
            Severity.WARNING,
            "the scraper's sidecar captures the scrape traffic",
            'annotate the scraper pod with traffic.sidecar.istio.io/includeInboundPorts: "" '
            'and traffic.sidecar.istio.io/includeOutboundIPRanges: "": its sidecar is there '
            "only to write certificates",
        ),
        Rule(
            "SM009",
            Severity.ERROR,
            "a job scraping the secure ports presents no client certificate",
            "the secure ports require a client certificate from the mesh CA: set tls_config "
            "cert_file and key_file to the OUTPUT_CERTS cert-chain.pem and key.pem",
        ),
        Rule(
            "SM010",
            Severity.ERROR,
            "a job scraping the secure ports verifies the server certificate by address",
            "workload certificates carry SPIFFE URI SANs and no IP SANs: set "
            "insecure_skip_verify: true (the CA and client certificate still apply); the "
            "conformance suite checks the SPIFFE identity with its own probe",
        ),
        Rule(
            "SM011",
            Severity.WARNING,
            "Gateway API gateway opens the secure ports only through infrastructure annotations",
            "Istio builds a generated gateway's environment from ProxyConfig and mesh "
            "defaults, not from its pod annotations (read in Istio's code): add a ProxyConfig "
            "selecting gateway.networking.k8s.io/gateway-name with environmentVariables; "
            "`securemetrics-e2e run --scenario gateway-api` shows what your Istio does",
        ),
    )
}


@dataclass(frozen=True)
class Finding:
    code: str
    message: str
    file: str
    line: int
    subject: str  # "Deployment monitoring/prometheus", "job 'kubernetes-pods'"

    @property
    def rule(self) -> Rule:
        return RULES[self.code]

    @property
    def severity(self) -> Severity:
        return self.rule.severity

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": str(self.severity),
            "title": self.rule.title,
            "message": self.message,
            "hint": self.rule.hint,
            "file": self.file,
            "line": self.line,
            "subject": self.subject,
        }


@dataclass
class AuditResult:
    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    documents: int = 0
    prometheus_configs: int = 0
    objects: int = 0
    ignored: list[str] = field(default_factory=list)  # documents neither config nor object
    templates: list[str] = field(default_factory=list)  # unrendered Helm templates skipped

    def counts(self) -> dict[Severity, int]:
        counts = dict.fromkeys(Severity, 0)
        for f in self.findings:
            counts[f.severity] += 1
        return counts

    def exit_status(self, fail_on: Severity = Severity.WARNING) -> int:
        relevant = [f.severity for f in self.findings if f.severity >= fail_on]
        return EXIT_STATUS[max(relevant)] if relevant else 0


class AuditInputError(UsageError):
    """An input the audit cannot read: it names the file and what is wrong."""


# ---------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Doc:
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


def load(paths: Sequence[Path], result: AuditResult) -> list[_Doc]:
    """Every document of every input file; Helm templates are skipped and listed."""
    if not paths:
        raise AuditInputError("nothing to audit: give Prometheus configs, manifests or directories")
    docs: list[_Doc] = []
    for file in _files(paths):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditInputError(f"cannot read {file}: {exc}") from None
        result.files += 1
        try:
            found = [
                _Doc(str(file), line, data, jobs) for line, data, jobs in _documents(file, text)
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


def _map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str_map(value: Any) -> dict[str, str]:
    return {str(k): "" if v is None else str(v) for k, v in _map(value).items()}


def _subject(obj: Mapping[str, Any]) -> str:
    meta = _map(obj.get("metadata"))
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{obj.get('kind')} {ns}/{name}" if ns else f"{obj.get('kind')} {name}"


_WORKLOADS: Final = frozenset(
    {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}
)


def _pod_template(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    kind = obj.get("kind")
    spec = _map(obj.get("spec"))
    if kind == "Pod":
        return obj
    if kind in _WORKLOADS:
        return _map(spec.get("template"))
    if kind == "CronJob":
        return _map(_map(_map(spec.get("jobTemplate")).get("spec")).get("template"))
    return None


def _is_injected(labels: Mapping[str, str], annotations: Mapping[str, str]) -> bool:
    flag = labels.get(INJECT, annotations.get(INJECT, ""))
    return flag.lower() != "false"


def _pod_views(doc: _Doc) -> Iterator[PodView]:
    obj = doc.data
    namespace = str(_map(obj.get("metadata")).get("namespace", "") or "")
    template = _pod_template(obj)
    if template is not None:
        meta = _map(template.get("metadata"))
        spec = _map(template.get("spec"))
        labels, annotations = _str_map(meta.get("labels")), _str_map(meta.get("annotations"))
        yield PodView(
            _subject(obj),
            doc.file,
            doc.line,
            namespace,
            labels,
            annotations,
            tuple(_map(c) for c in _list(spec.get("containers"))),
            tuple(_map(v) for v in _list(spec.get("volumes"))),
            _is_injected(labels, annotations),
        )
    elif obj.get("kind") == "Prometheus" and str(obj.get("apiVersion", "")).startswith(
        "monitoring.coreos.com/"
    ):
        spec = _map(obj.get("spec"))
        meta = _map(spec.get("podMetadata"))
        labels, annotations = _str_map(meta.get("labels")), _str_map(meta.get("annotations"))
        secrets = tuple(f"/etc/prometheus/secrets/{s}" for s in _list(spec.get("secrets")))
        yield PodView(
            _subject(obj),
            doc.file,
            doc.line,
            namespace,
            labels,
            annotations,
            tuple(_map(c) for c in _list(spec.get("containers"))),
            tuple(_map(v) for v in _list(spec.get("volumes"))),
            _is_injected(labels, annotations),
            operator_mounts=tuple(_map(m) for m in _list(spec.get("volumeMounts"))),
            secret_dirs=secrets,
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
    return _str_map(_map(config).get("proxyMetadata"))


def _container_env(container: Mapping[str, Any]) -> dict[str, str]:
    env = {}
    for item in _list(container.get("env")):
        var = _map(item)
        if "name" in var and "value" in var:
            env[str(var["name"])] = str(var["value"])
    return env


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    match = _str_map(_map(selector).get("matchLabels"))
    return all(labels.get(k) == v for k, v in match.items())


# ---------------------------------------------------------------------- prometheus rules


def _relabels(job: ScrapeJob) -> list[dict[str, Any]]:
    return [_map(r) for r in _list(job.config.get("relabel_configs"))]


def _sources(rule: Mapping[str, Any]) -> list[str]:
    return [str(s) for s in _list(rule.get("source_labels"))]


def _scheme(job: ScrapeJob) -> str:
    return str(job.config.get("scheme", "http")).lower()


def _static_ports(job: ScrapeJob) -> set[int]:
    ports = set()
    for group in _list(job.config.get("static_configs")):
        for target in _list(_map(group).get("targets")):
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
    label = _SD_ANNOTATION + re.sub(r"[^a-zA-Z0-9_]", "_", annotation)
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
    tls = _map(job.config.get("tls_config"))
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
            _map(m) for c in pod.containers for m in _list(c.get("volumeMounts"))
        ]
        for mount in mounts:
            base = PurePosixPath(str(mount.get("mountPath", "/nonexistent")))
            if target == base or base in target.parents:
                secret = _map(volumes.get(str(mount.get("name")), {}).get("secret"))
                if secret:
                    return f"Secret {secret.get('secretName', '?')} mounted by {pod.subject}"
        for directory in pod.secret_dirs:
            if PurePosixPath(directory) in target.parents:
                return f"a Secret listed in spec.secrets of {pod.subject}"
    return None


# ---------------------------------------------------------------------- pod rules


def _secure_ports_env(pod: PodView, proxy_configs: Sequence[_Doc]) -> tuple[dict[str, str], str]:
    """The secure-port variables a pod's proxy gets, and how (decides auto-annotation)."""
    meta = proxy_metadata(pod.annotations)
    env = {k: v for k, v in meta.items() if k in (MERGED_ENV, ENVOY_ENV) and v not in ("", "0")}
    if env:
        return env, "proxyMetadata"
    for container in pod.containers:
        if container.get("name") == "istio-proxy":
            found = _container_env(container)
            env = {k: v for k, v in found.items() if k in (MERGED_ENV, ENVOY_ENV) and v != "0"}
            if env:
                return env, "container env"
    for doc in proxy_configs:
        spec = _map(doc.data.get("spec"))
        ns = str(_map(doc.data.get("metadata")).get("namespace", "") or "")
        if ns and pod.namespace and ns != pod.namespace:
            continue
        if "selector" in spec and _selects(_map(spec.get("selector")), pod.labels):
            found = _str_map(spec.get("environmentVariables"))
            env = {k: v for k, v in found.items() if k in (MERGED_ENV, ENVOY_ENV) and v != "0"}
            if env:
                return env, "ProxyConfig"
    return {}, ""


def _audit_pod_ports(pod: PodView, proxy_configs: Sequence[_Doc]) -> Iterator[Finding]:
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
        return [{"name": k, **_map(v)} for k, v in value.items()]
    return [_map(v) for v in _list(value)]


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
                _map(m)
                for m in _list(container.get("volumeMounts"))
                if PurePosixPath(str(_map(m).get("mountPath", ""))) == target
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
        and any(_map(m).get("name") == name for m in _list(c.get("volumeMounts")))
    ]
    if not others and not any(m.get("name") == name for m in pod.operator_mounts):
        problems.append(
            f"volume {name!r} is mounted into istio-proxy but into no other container: "
            "Prometheus cannot read the certificates"
        )
    return problems


# ---------------------------------------------------------------------- other objects


def _audit_monitor(doc: _Doc) -> Iterator[Finding]:
    """ServiceMonitor / PodMonitor endpoints: plaintext Istio ports, static Secrets."""
    obj = doc.data
    spec = _map(obj.get("spec"))
    endpoints = _list(spec.get("endpoints")) + _list(spec.get("podMetricsEndpoints"))
    for ep in map(_map, endpoints):
        port = str(ep.get("port", "")) + " " + str(ep.get("targetPort", ""))
        scheme = str(ep.get("scheme", "http")).lower()
        if scheme != "https" and re.search(r"\b(15020|15090)\b|envoy-prom", port):
            yield Finding(
                "SM001",
                f"endpoint port {port.strip()!r} is Istio's plaintext metrics port, scraped "
                f"over {scheme}",
                doc.file,
                doc.line,
                _subject(obj),
            )
        tls = _map(ep.get("tlsConfig"))
        cert = _map(_map(tls.get("cert")).get("secret"))
        key = _map(tls.get("keySecret"))
        if cert or key:
            name = cert.get("name") or key.get("name") or "?"
            yield Finding(
                "SM007",
                f"tlsConfig takes the client certificate from Secret {name!r}",
                doc.file,
                doc.line,
                _subject(obj),
            )


def _audit_gateway(doc: _Doc, proxy_configs: Sequence[_Doc]) -> Iterator[Finding]:
    obj = doc.data
    name = str(_map(obj.get("metadata")).get("name", ""))
    annotations = _str_map(_map(_map(obj.get("spec")).get("infrastructure")).get("annotations"))
    meta = proxy_metadata(annotations)
    ports = {k: v for k, v in meta.items() if k in (MERGED_ENV, ENVOY_ENV)}
    pod_labels = {GATEWAY_NAME_LABEL: name}
    namespace = str(_map(obj.get("metadata")).get("namespace", "") or "")
    pod = PodView(
        _subject(obj), doc.file, doc.line, namespace, pod_labels, annotations, (), (), False
    )
    via_config = _secure_ports_env(
        PodView(_subject(obj), doc.file, doc.line, namespace, pod_labels, {}, (), (), False),
        proxy_configs,
    )[0]
    if ports and not via_config:
        yield Finding(
            "SM011",
            f"sets {', '.join(sorted(ports))} in spec.infrastructure.annotations "
            f"{PROXY_CONFIG_ANNOTATION} and no ProxyConfig selects {GATEWAY_NAME_LABEL}={name}",
            doc.file,
            doc.line,
            _subject(obj),
        )
    if via_config:
        yield from _audit_pod_ports(pod, proxy_configs)


def _embedded_configs(doc: _Doc) -> Iterator[tuple[str, Any]]:
    """Prometheus configurations inside a ConfigMap or Secret (key, parsed data)."""
    obj = doc.data
    kind = obj.get("kind")
    if kind not in ("ConfigMap", "Secret"):
        return
    items: dict[str, str] = {}
    for key, value in _map(obj.get("data")).items():
        if kind == "Secret":
            try:
                items[str(key)] = base64.b64decode(str(value), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                continue
        else:
            items[str(key)] = str(value)
    items.update({str(k): str(v) for k, v in _map(obj.get("stringData")).items()})
    for key, text in items.items():
        if "scrape_configs" not in text and "job_name" not in text:
            continue
        try:
            yield key, yaml.safe_load(text)
        except yaml.YAMLError:
            continue


def _jobs_of(config: Any, file: str, line: int, origin: str) -> Iterator[ScrapeJob]:
    # A full configuration, or a bare list of jobs (Prometheus Operator additionalScrapeConfigs).
    jobs = _list(config.get("scrape_configs")) if isinstance(config, dict) else _list(config)
    for job in map(_map, jobs):
        if "job_name" in job:
            yield ScrapeJob(str(job["job_name"]), job, file, line, origin)


def _is_prometheus_config(data: Any) -> bool:
    return isinstance(data, dict) and "scrape_configs" in data and "kind" not in data


def _objects(data: Any) -> Iterator[dict[str, Any]]:
    if isinstance(data, dict) and "apiVersion" in data and "kind" in data:
        if str(data["kind"]).endswith("List"):
            for item in _list(data.get("items")):
                yield from _objects(item)
        else:
            yield data


def audit(paths: Sequence[Path]) -> AuditResult:
    """Read ``paths`` (files or directories) and return every finding, in input order."""
    result = AuditResult()
    docs = load(paths, result)
    result.documents = len(docs)
    jobs: list[ScrapeJob] = []
    objects: list[_Doc] = []
    for doc in docs:
        if _is_prometheus_config(doc.data):
            result.prometheus_configs += 1
            for job in _jobs_of(doc.data, doc.file, doc.line, ""):
                line = doc.job_lines.get(job.name, doc.line)
                jobs.append(ScrapeJob(job.name, job.config, job.file, line, job.origin))
            continue
        found = [_Doc(doc.file, doc.line, obj) for obj in _objects(doc.data)]
        if not found:
            result.ignored.append(f"{doc.file}:{doc.line}")
        for obj in found:
            objects.append(obj)
            for key, config in _embedded_configs(obj):
                origin = f"{_subject(obj.data)} key {key}"
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
    pods = [view for doc in objects for view in _pod_views(doc)]
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
        f"nothing to audit in {given}: {_plural(result.files, 'file')} read, no Prometheus "
        "configuration (scrape_configs) and no Kubernetes object (apiVersion, kind) found; give "
        "your prometheus.yml or rendered manifests"
    )


# ---------------------------------------------------------------------- output


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_line(result: AuditResult) -> str:
    c = result.counts()
    text = (
        f"securemetrics-e2e audit: {_plural(c[Severity.ERROR], 'error')}, "
        f"{_plural(c[Severity.WARNING], 'warning')}, {c[Severity.INFO]} info "
        f"({_plural(result.prometheus_configs, 'Prometheus config')}, "
        f"{_plural(result.objects, 'Kubernetes object')} in {_plural(result.files, 'file')}"
    )
    if result.templates:
        text += f"; {_plural(len(result.templates), 'unrendered Helm template')} skipped"
    return text + ")"


def render_text(result: AuditResult) -> str:
    lines = []
    for f in result.findings:
        lines.append(f"{f.file}:{f.line}: {f.severity} {f.code} {f.subject}: {f.message}")
        lines.append(f"    hint: {f.rule.hint}")
    if result.templates:
        lines.append(
            "skipped (Helm templates; render them with `helm template` and audit the output): "
            + ", ".join(result.templates)
        )
    lines.append(summary_line(result))
    return "\n".join(lines) + "\n"


def render_json(result: AuditResult, fail_on: Severity = Severity.WARNING) -> str:
    counts = result.counts()
    doc = {
        "findings": [f.as_dict() for f in result.findings],
        "summary": {
            "error": counts[Severity.ERROR],
            "warning": counts[Severity.WARNING],
            "info": counts[Severity.INFO],
            "files": result.files,
            "prometheusConfigs": result.prometheus_configs,
            "objects": result.objects,
            "skippedTemplates": result.templates,
        },
        "failOn": str(fail_on),
        "exitStatus": result.exit_status(fail_on),
    }
    return json.dumps(doc, indent=2) + "\n"
