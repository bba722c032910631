"""Render the project's Helm charts with a real Helm engine.

The engine is Helm v4's own library, embedded by the ``helm-python-sdk`` wheel and called
in-process (no cluster, no network). Where that wheel cannot load, a ``helm`` binary on
PATH renders instead (``helm template``). Both apply the chart's ``values.schema.json``
exactly as ``helm install`` would; a schema violation, or a value a chart refuses with
``fail``, becomes a :class:`UsageError` naming the chart, the value and the constraint.

Renders are cached per (chart, values, release, namespace) for the life of the process:
the suite renders the same few combinations many times.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Protocol

import yaml

from securemetrics_e2e.errors import EnvironmentProblem, SecureMetricsError, UsageError

_PACKAGE_DIR = Path(__file__).resolve().parent
_CANDIDATES = (_PACKAGE_DIR / "_data" / "charts", _PACKAGE_DIR.parent / "charts")


def _find_charts_dir() -> Path:
    # An installed wheel carries the charts inside the package (pyproject force-include); a
    # source checkout has them beside the package. Prefer the packaged copy when both exist.
    for candidate in _CANDIDATES:
        if (candidate / "httpbin" / "Chart.yaml").is_file():
            return candidate
    return _CANDIDATES[-1]


#: The directory holding the project's charts (each a subdirectory with a Chart.yaml).
CHARTS_DIR: Final[Path] = _find_charts_dir()

# Helm's install order by kind (pkg/release/util/kind_sorter.go): objects are returned in
# the order ``helm install`` would create them; kinds it does not know go last.
_INSTALL_ORDER: Final[tuple[str, ...]] = (
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
)  # fmt: skip

_SCHEMA_LINE = re.compile(r"^\s*- at '(?P<pointer>[^']*)': (?P<message>.*)$")
_FAIL_MESSAGE = re.compile(r"execution error at \([^)]*\): (?P<message>.*)", re.DOTALL)


class ChartRenderError(SecureMetricsError):
    """A chart failed to render for a reason other than its values: a defect in the chart."""


class _Engine(Protocol):
    description: str

    def render(
        self, path: Path, values: dict[str, Any], release: str, namespace: str
    ) -> list[tuple[str, str]]:
        """(template path, rendered text) pairs; raises _ValuesRejected or ChartRenderError."""

    def lint(self, path: Path, values: dict[str, Any], namespace: str) -> list[str]:
        """Warnings and errors of a strict lint."""

    def merged_values(self, path: Path, values: dict[str, Any]) -> dict[str, Any]:
        """The chart's defaults coalesced with ``values``."""


class _ValuesRejected(Exception):
    """The engine refused the values: a schema violation or a chart's ``fail``."""

    def __init__(self, text: str, *, schema: bool) -> None:
        super().__init__(text)
        self.text = text
        self.schema = schema


class _SdkEngine:
    """Helm's library in-process, through the helm-python-sdk wheel."""

    def __init__(self) -> None:
        import helm_python

        self._helm = helm_python
        # Loads libhelm_c now, so a broken wheel is detected before the first render.
        sdk = helm_python.helm_sdk_version()
        self.description = f"helm-python-sdk {helm_python.__version__} (Helm {sdk}, in-process)"
        self._charts: dict[Path, Any] = {}

    def _chart(self, path: Path) -> Any:
        if path not in self._charts:
            try:
                self._charts[path] = self._helm.Chart.load(path)
            except self._helm.HelmError as exc:
                raise ChartRenderError(f"cannot load chart {path}: {exc}") from exc
        return self._charts[path]

    def render(
        self, path: Path, values: dict[str, Any], release: str, namespace: str
    ) -> list[tuple[str, str]]:
        chart = self._chart(path)
        try:
            rendered: dict[str, str] = chart.render(values, name=release, namespace=namespace)
        except self._helm.HelmValuesError as exc:
            raise _ValuesRejected(str(exc), schema=True) from exc
        except self._helm.HelmRenderError as exc:
            if _FAIL_MESSAGE.search(str(exc)):
                raise _ValuesRejected(str(exc), schema=False) from exc
            raise ChartRenderError(f"chart {path.name} failed to render: {exc}") from exc
        return sorted(rendered.items())

    def lint(self, path: Path, values: dict[str, Any], namespace: str) -> list[str]:
        report = self._helm.lint(path, values, strict=True, namespace=namespace)
        findings = [
            f"{m['path']}: {m['error']}" for m in report.get("messages", []) if m["severity"] >= 2
        ]
        return findings + [str(e) for e in report.get("errors", [])]

    def merged_values(self, path: Path, values: dict[str, Any]) -> dict[str, Any]:
        merged: dict[str, Any] = self._chart(path).merge_values(values)
        return merged


class _CliEngine:
    """A ``helm`` binary on PATH: ``helm template`` and ``helm lint``."""

    def __init__(self, binary: str) -> None:
        self._binary = binary
        version = self._run(["version", "--short"], "").stdout.strip()
        self.description = f"helm CLI {version} ({binary})"

    def _run(self, args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self._binary, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EnvironmentProblem(f"running {self._binary} {args[0]} failed: {exc}") from exc

    def render(
        self, path: Path, values: dict[str, Any], release: str, namespace: str
    ) -> list[tuple[str, str]]:
        # Values go through stdin ("--values -"), so nothing is written to disk.
        args = ["template", release, str(path), "--namespace", namespace, "--values", "-"]
        proc = self._run(args, json.dumps(values))
        if proc.returncode != 0:
            err = proc.stderr.strip()
            if "don't meet the specifications of the schema" in err:
                raise _ValuesRejected(err, schema=True)
            if _FAIL_MESSAGE.search(err):
                raise _ValuesRejected(err, schema=False)
            raise ChartRenderError(f"helm template {path.name} failed: {err}")
        # `helm template` separates documents with "---" and names each "# Source: <path>".
        pieces: list[tuple[str, str]] = []
        source = ""
        for doc in re.split(r"^---\s*$", proc.stdout, flags=re.MULTILINE):
            match = re.search(r"^# Source: (.+)$", doc, flags=re.MULTILINE)
            source = match.group(1).strip() if match else source
            pieces.append((source, doc))
        return pieces

    def lint(self, path: Path, values: dict[str, Any], namespace: str) -> list[str]:
        args = ["lint", "--strict", str(path), "--namespace", namespace, "--values", "-"]
        proc = self._run(args, json.dumps(values))
        if proc.returncode == 0:
            return []
        return [line for line in proc.stdout.splitlines() if re.match(r"\[(WARNING|ERROR)\]", line)]

    def merged_values(self, path: Path, values: dict[str, Any]) -> dict[str, Any]:
        defaults = yaml.safe_load((path / "values.yaml").read_text()) or {}
        return _coalesce(defaults, values)


def _coalesce(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Helm's coalescing for plain data: maps merge, anything else replaces, null deletes."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _coalesce(out[key], value)
        else:
            out[key] = value
    return out


@functools.cache
def _engine() -> _Engine:
    sdk_problem: str
    try:
        return _SdkEngine()
    except ImportError as exc:
        sdk_problem = f"the helm-python-sdk wheel is not installed ({exc})"
    except Exception as exc:  # any failure to load the native library
        sdk_problem = f"the helm-python-sdk wheel cannot load its Helm library ({exc})"
    binary = shutil.which("helm")
    if binary is not None:
        return _CliEngine(binary)
    raise EnvironmentProblem(
        f"no Helm engine to render the charts: {sdk_problem}, and there is no `helm` on PATH. "
        "Install the package's dependencies (pip install helm-python-sdk) on a platform its "
        "wheel supports, or install Helm 3.8+ / 4 and put `helm` on PATH."
    )


def engine_description() -> str:
    """Which Helm engine renders: the in-process SDK or the CLI (for reports)."""
    return _engine().description


def chart_names() -> tuple[str, ...]:
    """The charts shipped in :data:`CHARTS_DIR`."""
    if not CHARTS_DIR.is_dir():
        return ()
    return tuple(sorted(p.parent.name for p in CHARTS_DIR.glob("*/Chart.yaml")))


def chart_path(chart: str | Path) -> Path:
    """The directory of ``chart``: a chart name in :data:`CHARTS_DIR`, or a chart directory."""
    if isinstance(chart, Path) or "/" in chart:
        path = Path(chart).resolve()
        if not (path / "Chart.yaml").is_file():
            raise UsageError(f"{path} is not a Helm chart directory (it has no Chart.yaml)")
        return path
    path = CHARTS_DIR / chart
    if not (path / "Chart.yaml").is_file():
        known = ", ".join(chart_names()) or f"none: {CHARTS_DIR} holds no charts"
        raise UsageError(f"unknown chart {chart!r}; known charts: {known}")
    return path


def render_chart(
    chart: str | Path, values: Mapping[str, Any], *, release: str, namespace: str
) -> list[dict[str, Any]]:
    """Render ``chart`` with ``values`` as release ``release`` in ``namespace``.

    Returns the Kubernetes objects in Helm's install order (a fresh copy on every call, so
    callers may change them). Raises :class:`UsageError` when the chart rejects the values,
    :class:`EnvironmentProblem` when no Helm engine is available, and
    :class:`ChartRenderError` when the chart itself is broken.
    """
    path = chart_path(chart)
    try:
        canonical = json.dumps(values, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"values for chart {path.name!r} are not plain JSON data: {exc}") from exc
    return copy.deepcopy(_render_cached(path, canonical, release, namespace))


@functools.lru_cache(maxsize=512)
def _render_cached(path: Path, values_json: str, release: str, namespace: str) -> list[Any]:
    values = json.loads(values_json)
    eng = _engine()
    try:
        pieces = eng.render(path, values, release, namespace)
    except _ValuesRejected as rejected:
        raise _usage_error(eng, path, values, rejected) from None
    objects: list[tuple[int, str, int, dict[str, Any]]] = []
    for template, text in pieces:
        name = template.rsplit("/", 1)[-1]
        if name == "NOTES.txt" or name.startswith("_"):
            continue
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise ChartRenderError(f"{template} rendered invalid YAML: {exc}") from exc
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            if not isinstance(doc, dict) or not {"apiVersion", "kind"} <= doc.keys():
                raise ChartRenderError(
                    f"{template} rendered a document that is not a Kubernetes object: {doc!r:.200}"
                )
            kind = str(doc["kind"])
            order = _INSTALL_ORDER.index(kind) if kind in _INSTALL_ORDER else len(_INSTALL_ORDER)
            objects.append((order, template, index, doc))
    objects.sort(key=lambda item: item[:3])
    return [doc for *_, doc in objects]


def lint_chart(
    chart: str | Path, values: Mapping[str, Any] | None = None, *, namespace: str = "default"
) -> list[str]:
    """Findings of a strict ``helm lint`` (warnings count); an empty list means clean."""
    path = chart_path(chart)
    return _engine().lint(path, dict(values or {}), namespace)


def clear_cache() -> None:
    """Forget cached renders (after a chart's files change within one process)."""
    _render_cached.cache_clear()


# --- turning the engine's refusal into a message a user can act on --------------------


def _usage_error(
    eng: _Engine, path: Path, values: dict[str, Any], rejected: _ValuesRejected
) -> UsageError:
    chart = path.name
    if not rejected.schema:
        match = _FAIL_MESSAGE.search(rejected.text)
        detail = match.group("message").strip() if match else rejected.text
        detail = detail.removeprefix(f"{chart}: ")
        return UsageError(f"chart {chart!r} rejects its values: {detail}")
    merged = eng.merged_values(path, values)
    schema = _load_schema(path)
    problems = []
    for line in rejected.text.splitlines():
        match = _SCHEMA_LINE.match(line)
        if match is None:
            continue
        pointer, message = match["pointer"], match["message"].strip()
        if message in {"'allOf' failed", "'anyOf' failed", "'oneOf' failed"}:
            continue  # the nested lines that follow say which part failed
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
        where = ".".join(parts) or "(top level)"
        # The caller's own value when they gave one: the engine's copy went through float64.
        found, value = _lookup(values, parts)
        if not found:
            found, value = _lookup(merged, parts)
        shown = f" = {json.dumps(value)}" if found and not isinstance(value, dict | list) else ""
        expected = _describe(schema, parts)
        hint = f" (expected {expected})" if expected else ""
        problems.append(f"{where}{shown}: {_plain(message)}{hint}")
    if not problems:
        return UsageError(f"chart {chart!r} rejects its values: {rejected.text.strip()}")
    listed = "; ".join(problems)
    return UsageError(f"chart {chart!r} rejects its values: {listed}")


def _plain(message: str) -> str:
    if message == "'not' failed":
        return "is a value the chart forbids"
    return message


@functools.cache
def _load_schema(path: Path) -> dict[str, Any]:
    schema_file = path / "values.schema.json"
    if not schema_file.is_file():
        return {}
    loaded: dict[str, Any] = json.loads(schema_file.read_text())
    return loaded


def _lookup(data: Any, parts: list[str]) -> tuple[bool, Any]:
    for part in parts:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return False, None
    return True, data


def _describe(schema: dict[str, Any], parts: list[str]) -> str:
    """The ``description`` of the schema node that governs the value at ``parts``."""
    node: Any = _deref(schema, schema)
    for part in parts:
        if not isinstance(node, dict):
            return ""
        props = node.get("properties", {})
        if part in props:
            node = props[part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif isinstance(node.get("items"), dict):
            node = node["items"]
        else:
            return ""
        node = _deref(schema, node)
    return str(node.get("description", "")) if isinstance(node, dict) else ""


def _deref(root: dict[str, Any], node: Any) -> Any:
    seen = 0
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 16:
        ref: str = node["$ref"]
        if not ref.startswith("#/"):
            break
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        # Keep a description written beside the $ref over the referenced one's.
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        seen += 1
    return node
