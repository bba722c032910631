"""Validate rendered objects against the schemas their APIs publish.

* Kubernetes kinds: the OpenAPI schemas of a given Kubernetes minor, as shipped by
  ``kubernetes-validate``, in strict mode (an unknown field is an error, as with
  ``kubectl apply --validate=strict``).
* Istio (``networking.istio.io``, ``security.istio.io``) and Prometheus Operator
  (``monitoring.coreos.com``) kinds: the models ``cloudcoil-models-istio`` and
  ``cloudcoil-models-prometheus-operator`` generate from those projects' CRDs. The models
  ignore unknown fields and coerce types, so an object is also required to survive the
  round trip unchanged: any field dropped or value changed is reported.
* Gateway API kinds: the ``openAPIV3Schema`` of the CRD at the Gateway API release the Istio
  version expects, shipped in ``schemas/`` (see its README for the source), with unknown
  fields rejected the way the API server's strict field validation does.
* The ``metadata`` of custom resources: Kubernetes' ObjectMeta schema.

CEL rules (``x-kubernetes-validations``) are not evaluated: they need the API server.

The validator packages are development dependencies: a missing one raises
:class:`EnvironmentProblem` naming the package to install.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any, Final

from securemetrics_e2e.errors import EnvironmentProblem, SecureMetricsError

_ISTIO_GROUPS: Final = {"networking.istio.io": "networking", "security.istio.io": "security"}
_OPERATOR_GROUP: Final = "monitoring.coreos.com"
_GATEWAY_API_GROUP: Final = "gateway.networking.k8s.io"


class InvalidObject(SecureMetricsError):
    """A rendered object that its API's schema rejects."""

    def __init__(self, obj: Mapping[str, Any], validator: str, problem: str) -> None:
        meta = obj.get("metadata") or {}
        where = f"{meta.get('namespace', '')}/{meta.get('name')}"
        ident = f"{obj.get('apiVersion')} {obj.get('kind')} {where}"
        super().__init__(f"{ident} is invalid for {validator}: {problem}")
        self.validator = validator
        self.problem = problem


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EnvironmentProblem(
            f"validating these objects needs the Python package {package} ({exc}); "
            f"install it with: pip install {package} (it is in the project's dev extra)"
        ) from exc


def _canonical(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True)


def validate_object(
    obj: Mapping[str, Any], *, kubernetes_version: str, gateway_api_version: str
) -> str:
    """Validate ``obj``; return which validator accepted it, raise :class:`InvalidObject`.

    ``kubernetes_version`` is a minor such as ``"1.33"``; ``gateway_api_version`` a Gateway
    API release such as ``"v1.6.0"``. Kinds no known schema covers raise too: an object
    nobody checked must not pass as checked.
    """
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    text = _canonical(obj)
    if group in _ISTIO_GROUPS or group == _OPERATOR_GROUP:
        return _validate_model(text)
    if group == _GATEWAY_API_GROUP:
        return _validate_gateway_api(text, gateway_api_version, kubernetes_version)
    return _validate_kubernetes(text, kubernetes_version)


# --- Kubernetes kinds -------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _validate_kubernetes(text: str, kubernetes_version: str) -> str:
    kv = _require("kubernetes_validate", "kubernetes-validate")
    obj = json.loads(text)
    validator = f"Kubernetes {kubernetes_version} (kubernetes-validate {kv.__version__}, strict)"
    _check_shipped(kv, kubernetes_version)
    try:
        kv.validate(obj, kubernetes_version, strict=True)
    except kv.SchemaNotFoundError as exc:
        raise InvalidObject(obj, validator, exc.message) from exc
    except kv.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(object)"
        raise InvalidObject(obj, validator, f"{where}: {exc.message}") from exc
    return validator


def _check_shipped(kv: Any, kubernetes_version: str) -> None:
    # kubernetes-validate falls back to the newest older schema it has; a silent fallback
    # would claim a check that did not happen, so a missing minor is an error.
    utils = _require("kubernetes_validate.utils", "kubernetes-validate")
    shipped = {".".join(v.split(".")[:2]) for v in utils.all_versions()}
    if kubernetes_version not in shipped:
        raise EnvironmentProblem(
            f"kubernetes-validate {kv.__version__} ships no schemas for Kubernetes "
            f"{kubernetes_version} (it has {', '.join(sorted(shipped))}); upgrade it"
        )


_OBJECT_META: Final = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@functools.cache
def _object_meta_validator(kubernetes_version: str) -> Any:
    import jsonschema
    import referencing

    kv = _require("kubernetes_validate", "kubernetes-validate")
    _check_shipped(kv, kubernetes_version)
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    data = (folder / f"v{kubernetes_version}.0-local-strict" / "_definitions.json").read_text()
    definitions = json.loads(data)
    # The definitions refer to each other relative to their own $id.
    registry: referencing.Registry[Any] = referencing.Registry().with_resource(
        definitions["$id"], referencing.Resource.from_contents(definitions)
    )
    schema = {"$ref": f"{definitions['$id']}#/$defs/{_OBJECT_META}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def _validate_metadata(obj: Mapping[str, Any], validator: str, kubernetes_version: str) -> None:
    import jsonschema

    checker = _object_meta_validator(kubernetes_version)
    error = jsonschema.exceptions.best_match(checker.iter_errors(obj.get("metadata", {})))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path)
        raise InvalidObject(obj, validator, f"metadata.{where}: {error.message}")


# --- Istio and Prometheus Operator kinds (cloudcoil models) ------------------------------


def _model_class(api_version: str, kind: str) -> tuple[Any, str]:
    group, _, version = api_version.rpartition("/")
    if group == _OPERATOR_GROUP:
        module, package = (
            f"cloudcoil.models.prometheus_operator.{version}",
            ("cloudcoil-models-prometheus-operator"),
        )
    else:
        module = f"cloudcoil.models.istio.{_ISTIO_GROUPS[group]}.{version}"
        package = "cloudcoil-models-istio"
    loaded = _require(module, package)
    model = getattr(loaded, kind, None)
    gvk = model.gvk() if model is not None and hasattr(model, "gvk") else None
    if gvk is None or (gvk.api_version, gvk.kind) != (api_version, kind):
        raise EnvironmentProblem(f"{package} has no model for {api_version} {kind}; upgrade it")
    from importlib.metadata import version as dist_version

    return model, f"{package} {dist_version(package)}"


@functools.lru_cache(maxsize=1024)
def _validate_model(text: str) -> str:
    import pydantic

    obj = json.loads(text)
    model, source = _model_class(obj["apiVersion"], obj["kind"])
    validator = f"{obj['kind']} schema ({source})"
    try:
        parsed = model.model_validate(copy.deepcopy(obj))
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidObject(obj, validator, f"{where}: {first['msg']}") from exc
    echoed = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    differences = _differences(obj, echoed, "")
    if differences:
        raise InvalidObject(obj, validator, "; ".join(differences))
    return validator


def _differences(given: Any, echoed: Any, where: str) -> list[str]:
    """What the model dropped (unknown fields) or changed (coerced values)."""
    if isinstance(given, dict) and isinstance(echoed, dict):
        out = []
        for key, value in given.items():
            path = f"{where}.{key}" if where else key
            if key not in echoed:
                out.append(f"{path}: unknown field")
            else:
                out.extend(_differences(value, echoed[key], path))
        return out
    if isinstance(given, list) and isinstance(echoed, list) and len(given) == len(echoed):
        return [
            d for i, (a, b) in enumerate(zip(given, echoed, strict=True))
            for d in _differences(a, b, f"{where}[{i}]")
        ]  # fmt: skip
    if given != echoed or type(given) is not type(echoed):
        return [f"{where}: {given!r} would be read as {echoed!r}"]
    return []


# --- Gateway API kinds (the CRD's openAPIV3Schema) ---------------------------------------


@functools.cache
def _gateway_api_schema(gateway_api_version: str, kind: str) -> dict[str, Any]:
    name = f"gateway-api-{gateway_api_version}-{kind.lower()}-v1.json"
    ref = resources.files("securemetrics_e2e") / "schemas" / name
    if not ref.is_file():
        raise EnvironmentProblem(
            f"no Gateway API {gateway_api_version} schema for {kind} is shipped "
            f"(securemetrics_e2e/schemas/{name}); see that folder's README to add one"
        )
    data: dict[str, Any] = json.loads(ref.read_text())
    strict: dict[str, Any] = _strict(data["openAPIV3Schema"])
    return strict


def _strict(node: Any) -> Any:
    """Reject unknown fields wherever the structural schema lists the known ones."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1024)
def _validate_gateway_api(text: str, gateway_api_version: str, kubernetes_version: str) -> str:
    import jsonschema

    obj = json.loads(text)
    kind = obj["kind"]
    if obj["apiVersion"] != f"{_GATEWAY_API_GROUP}/v1":
        raise InvalidObject(obj, "Gateway API", "only gateway.networking.k8s.io/v1 is covered")
    schema = _gateway_api_schema(gateway_api_version, kind)
    validator = f"Gateway API {gateway_api_version} {kind} CRD schema (strict)"
    # The CRD types metadata as a bare object: the API server checks it as ObjectMeta.
    body = {k: v for k, v in obj.items() if k != "metadata"}
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft7Validator(schema).iter_errors({**body, "metadata": {}})
    )
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(object)"
        raise InvalidObject(obj, validator, f"{where}: {error.message}")
    _validate_metadata(obj, validator, kubernetes_version)
    return validator
