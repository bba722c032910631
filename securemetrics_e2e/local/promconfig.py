"""The chart's scrape configuration, adapted only where a cluster supplies something.

The local backend loads ``charts/secure-metrics-prometheus/files/prometheus.yml``, the
file the chart ships, and changes exactly three things a cluster provides and this
machine does not: Kubernetes service discovery becomes file_sd carrying the same
``__meta_kubernetes_pod_*`` labels (so the chart's relabel rules decide the addresses),
the certificate directory ``/etc/istio-certs`` becomes the run's OUTPUT_CERTS directory,
and the global scrape interval is shortened so a run takes seconds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from securemetrics_e2e.errors import UsageError

CHART_CERTS_DIR = "/etc/istio-certs"
CHART_RELATIVE = Path("secure-metrics-prometheus") / "files" / "prometheus.yml"


def charts_dir() -> Path:
    """The charts/ directory: in the source tree, or packaged inside an installed wheel."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_data" / "charts", package.parent / "charts"):
        if (candidate / CHART_RELATIVE).is_file():
            return candidate
    raise FileNotFoundError(
        f"the charts directory (with {CHART_RELATIVE}) is neither packaged in "
        f"{package / '_data'} nor beside the package in {package.parent}; "
        "reinstall securemetrics-e2e"
    )


def chart_scrape_config_path() -> Path:
    return charts_dir() / CHART_RELATIVE


def local_scrape_config(text: str, *, sd_file: Path, certs_dir: Path, scrape_interval: str) -> str:
    """``text`` (the chart's prometheus.yml) with local service discovery and cert paths."""
    config = yaml.safe_load(text)
    glob = config.setdefault("global", {})
    glob["scrape_interval"] = scrape_interval
    glob["scrape_timeout"] = scrape_interval  # must not exceed the interval
    for job in config.get("scrape_configs", []):
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["file_sd_configs"] = [{"files": [str(sd_file)]}]
        tls = job.get("tls_config", {})
        for key in ("ca_file", "cert_file", "key_file"):
            if key in tls and tls[key].startswith(CHART_CERTS_DIR + "/"):
                tls[key] = str(certs_dir / tls[key][len(CHART_CERTS_DIR) + 1 :])
    return yaml.safe_dump(config, sort_keys=False)


def scrape_plaintext_envoy_port(text: str) -> str:
    """Negative control: the jobs scrape the plaintext Envoy port 15090 over http."""
    config = yaml.safe_load(text)
    for job in config["scrape_configs"]:
        job["scheme"] = "http"
        job.pop("tls_config", None)
        for rule in job.get("relabel_configs", []):
            if rule.get("target_label") == "__address__":
                rule["replacement"] = "$1:15090"
    return yaml.safe_dump(config, sort_keys=False)


def _label_name(key: str) -> str:
    """Kubernetes SD's sanitising of annotation and label keys into label names."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


@dataclass(frozen=True)
class PodRecord:
    """What Kubernetes pod discovery would report about one pod."""

    name: str
    namespace: str
    ip: str
    annotations: Mapping[str, str]
    labels: Mapping[str, str]
    container_ports: tuple[tuple[str, str, int], ...]  # (container, port name, number)


def pod_sd_targets(pods: Iterable[PodRecord]) -> list[dict[str, Any]]:
    """file_sd groups shaped like Kubernetes ``role: pod`` discovery: one per container port."""
    groups: list[dict[str, Any]] = []
    for pod in pods:
        base = {
            "__meta_kubernetes_namespace": pod.namespace,
            "__meta_kubernetes_pod_name": pod.name,
            "__meta_kubernetes_pod_ip": pod.ip,
            "__meta_kubernetes_pod_ready": "true",
            "__meta_kubernetes_pod_phase": "Running",
        }
        for key, value in pod.annotations.items():
            base[f"__meta_kubernetes_pod_annotation_{_label_name(key)}"] = value
            base[f"__meta_kubernetes_pod_annotationpresent_{_label_name(key)}"] = "true"
        for key, value in pod.labels.items():
            base[f"__meta_kubernetes_pod_label_{_label_name(key)}"] = value
            base[f"__meta_kubernetes_pod_labelpresent_{_label_name(key)}"] = "true"
        host = f"[{pod.ip}]" if ":" in pod.ip else pod.ip
        for container, port_name, number in pod.container_ports:
            labels = dict(base)
            labels["__meta_kubernetes_pod_container_name"] = container
            labels["__meta_kubernetes_pod_container_port_name"] = port_name
            labels["__meta_kubernetes_pod_container_port_number"] = str(number)
            labels["__meta_kubernetes_pod_container_port_protocol"] = "TCP"
            groups.append({"targets": [f"{host}:{number}"], "labels": labels})
    return groups


def write_sd_file(path: Path, pods: Iterable[PodRecord]) -> None:
    """Replace the file_sd file atomically: Prometheus must never read half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(pod_sd_targets(pods), indent=1))
    tmp.replace(path)


def duration_seconds(duration: str) -> float:
    """A Prometheus duration of seconds or milliseconds ("1s", "500ms") in seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0)):
        number = duration.removesuffix(suffix)
        if number != duration and number.isdigit():
            return int(number) * scale
    raise UsageError(f"scrape interval {duration!r} is not a duration like 1s or 500ms")
