"""What an audit found, the rules behind each finding code, and how a result is shown."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Final

from securemetrics_e2e.errors import UsageError


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


# ---------------------------------------------------------------------- output


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_line(result: AuditResult) -> str:
    c = result.counts()
    text = (
        f"securemetrics-e2e audit: {plural(c[Severity.ERROR], 'error')}, "
        f"{plural(c[Severity.WARNING], 'warning')}, {c[Severity.INFO]} info "
        f"({plural(result.prometheus_configs, 'Prometheus config')}, "
        f"{plural(result.objects, 'Kubernetes object')} in {plural(result.files, 'file')}"
    )
    if result.templates:
        text += f"; {plural(len(result.templates), 'unrendered Helm template')} skipped"
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
