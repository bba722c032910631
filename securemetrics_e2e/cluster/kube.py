"""The Kubernetes seam: a small protocol the backend needs, and the real client behind it.

Everything the cluster backend does to a cluster goes through :class:`KubeAPI`: apply
(server-side), get, list, delete, exec, logs. The real implementation wraps the official
``kubernetes`` client; tests substitute a fake at exactly this seam to drive control
flow (fail fast on ImagePullBackOff, delete only labelled namespaces) that a machine
without a cluster cannot reach otherwise.

The logic that uses the seam lives in :mod:`.resources` (run-labelled objects, rollout
waits) and :mod:`.kubeconfig` (a bad file or a dead API server as a clear error).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests
import requests.auth
import yaml

from securemetrics_e2e.cluster.errors import ClusterUnreachable, KubeAPIError, KubeconfigInvalid
from securemetrics_e2e.cluster.kubeconfig import KubeconfigInfo, check_reachable, read_kubeconfig

Obj = dict[str, Any]

FIELD_MANAGER = "securemetrics-e2e"
PATCH_TYPES = {
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
    "merge": "application/merge-patch+json",
}
#: every object a run creates carries this label with the run's id; cleanup selects on it
RUN_LABEL = "securemetrics-e2e.io/run"
MANAGED_BY = {"app.kubernetes.io/managed-by": "securemetrics-e2e"}


@dataclass(frozen=True)
class ExecResult:
    stdout: str
    stderr: str
    exit_code: int


class KubeAPI(Protocol):
    """What the cluster backend asks of a Kubernetes API server."""

    def server_version(self) -> str:
        """``gitVersion`` of the API server, e.g. ``v1.36.4``."""

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> Obj | None:
        """The object, or None when it does not exist (or its kind is not served)."""

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str = "",
    ) -> list[Obj]:
        """Objects of a kind, in one namespace or all, filtered by a label selector."""

    def apply(self, obj: Mapping[str, Any], *, field_manager: str = FIELD_MANAGER) -> Obj:
        """Server-side apply ``obj`` (forcing conflicts: the run owns what it applies)."""

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        """Delete an object; False when it was already gone."""

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
        """Patch an object the run does not own: ``strategic`` merge or ``json`` patch."""

    def exec(
        self, namespace: str, pod: str, container: str, command: Sequence[str], *, timeout: float
    ) -> ExecResult:
        """Run ``command`` in a container and collect its output and exit code."""

    def logs(self, namespace: str, pod: str, container: str, *, previous: bool = False) -> str:
        """A container's log (``previous``: of its last terminated instance)."""

    def service_proxy_url(self, namespace: str, service: str, port: int) -> str:
        """The API server's proxy URL of a Service port (no port-forward involved)."""

    def http_session(self) -> requests.Session:
        """A requests session carrying the kubeconfig's credentials for the API server."""


# -- the real client ------------------------------------------------------------------


class KubernetesAPI:
    """:class:`KubeAPI` over the official ``kubernetes`` client (dynamic client)."""

    def __init__(
        self,
        info: KubeconfigInfo,
        *,
        request_timeout: float = 30.0,
        discovery_cache: Path | None = None,
    ) -> None:
        from kubernetes import client, config, dynamic

        self.info = info
        configuration = client.Configuration()
        load: Callable[..., None] = config.load_kube_config  # untyped in the library
        try:
            load(
                config_file=os.pathsep.join(str(p) for p in info.files),
                context=info.context,
                client_configuration=configuration,
                persist_config=False,
            )
        except (config.ConfigException, ValueError, KeyError, TypeError, OSError) as exc:
            raise KubeconfigInvalid(
                f"kubeconfig {', '.join(map(str, info.files))} context {info.context!r} "
                f"cannot be used: {exc}"
            ) from None
        configuration.retries = 1
        self.configuration = configuration
        self.api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api_client)
        self._timeout = request_timeout
        self._discovery_cache = discovery_cache
        self._dynamic_factory: Callable[..., Any] = dynamic.DynamicClient
        self._dyn: Any = None

    def close(self) -> None:
        close: Callable[[], None] = self.api_client.close  # untyped in the library
        close()

    @property
    def dyn(self) -> Any:
        if self._dyn is None:
            # The discovery cache goes where our other caches live, not into /tmp.
            cache_file = None
            if self._discovery_cache is not None:
                self._discovery_cache.parent.mkdir(parents=True, exist_ok=True)
                cache_file = str(self._discovery_cache)
            self._dyn = self._dynamic_factory(self.api_client, cache_file=cache_file)
        return self._dyn

    def server_version(self) -> str:
        from kubernetes import client

        info = client.VersionApi(self.api_client).get_code(_request_timeout=(3, 5))
        return str(info.git_version)

    def _resource(self, api_version: str, kind: str) -> Any:
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        for attempt in range(2):
            try:
                return self.dyn.resources.get(api_version=api_version, kind=kind)
            except ResourceNotFoundError:
                if attempt == 0:
                    # a CRD installed during this run: rediscover once before giving up
                    self.dyn.resources.invalidate_cache()
        return None

    def get(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> Obj | None:
        resource = self._resource(api_version, kind)
        if resource is None:
            return None
        return self._call(
            f"get {kind} {name}",
            lambda: self.dyn.get(
                resource, name=name, namespace=namespace, _request_timeout=self._timeout
            ),
            missing_ok=True,
        )

    def list(
        self,
        api_version: str,
        kind: str,
        namespace: str | None = None,
        label_selector: str = "",
    ) -> list[Obj]:
        resource = self._resource(api_version, kind)
        if resource is None:
            return []
        body = self._call(
            f"list {kind}",
            lambda: self.dyn.get(
                resource,
                namespace=namespace,
                label_selector=label_selector or None,
                _request_timeout=self._timeout,
            ),
        )
        return list((body or {}).get("items") or [])

    def apply(self, obj: Mapping[str, Any], *, field_manager: str = FIELD_MANAGER) -> Obj:
        api_version, kind = str(obj["apiVersion"]), str(obj["kind"])
        resource = self._resource(api_version, kind)
        if resource is None:
            raise KubeAPIError(
                f"apply {kind} {obj.get('metadata', {}).get('name')}",
                404,
                f"the cluster serves no {kind} in {api_version} (is its CRD installed?)",
            )
        namespace = (obj.get("metadata") or {}).get("namespace")
        result = self._call(
            f"apply {kind} {obj.get('metadata', {}).get('name')}",
            lambda: self.dyn.server_side_apply(
                resource,
                body=dict(obj),
                namespace=namespace,
                field_manager=field_manager,
                force_conflicts=True,
                _request_timeout=self._timeout,
            ),
        )
        return result or {}

    def delete(self, api_version: str, kind: str, name: str, namespace: str | None = None) -> bool:
        resource = self._resource(api_version, kind)
        if resource is None:
            return False
        result = self._call(
            f"delete {kind} {name}",
            lambda: self.dyn.delete(
                resource,
                name=name,
                namespace=namespace,
                propagation_policy="Background",
                _request_timeout=self._timeout,
            ),
            missing_ok=True,
        )
        return result is not None

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
        content_type = PATCH_TYPES.get(patch_type)
        if content_type is None:
            raise ValueError(f"patch type {patch_type!r}; use one of {', '.join(PATCH_TYPES)}")
        resource = self._resource(api_version, kind)
        if resource is None:
            raise KubeAPIError(f"patch {kind} {name}", 404, f"the cluster serves no {kind}")
        result = self._call(
            f"patch {kind} {name}",
            lambda: self.dyn.patch(
                resource,
                body=body,
                name=name,
                namespace=namespace,
                content_type=content_type,
                field_manager=FIELD_MANAGER,
                _request_timeout=self._timeout,
            ),
        )
        return result or {}

    def service_proxy_url(self, namespace: str, service: str, port: int) -> str:
        host = str(self.configuration.host).rstrip("/")
        return f"{host}/api/v1/namespaces/{namespace}/services/{service}:{port}/proxy"

    def http_session(self) -> requests.Session:
        cfg = self.configuration
        session = requests.Session()
        session.trust_env = False  # the kubeconfig decides how to reach the API server
        session.verify = (
            cfg.ssl_ca_cert if (cfg.verify_ssl and cfg.ssl_ca_cert) else bool(cfg.verify_ssl)
        )
        if cfg.cert_file and cfg.key_file:
            session.cert = (cfg.cert_file, cfg.key_file)
        session.auth = _BearerAuth(cfg)
        return session

    def _call(
        self, action: str, call: Callable[[], Any], *, missing_ok: bool = False
    ) -> Obj | None:
        from kubernetes.client.exceptions import ApiException
        from kubernetes.dynamic.exceptions import DynamicApiError, NotFoundError

        try:
            result = call()
        except NotFoundError as exc:
            if missing_ok:
                return None
            raise KubeAPIError(action, 404, _reason(exc)) from None
        except (DynamicApiError, ApiException) as exc:
            status = int(getattr(exc, "status", 0) or 0)
            if status == 404 and missing_ok:
                return None
            raise KubeAPIError(action, status, _reason(exc)) from None
        if hasattr(result, "to_dict"):
            out: Obj = result.to_dict()
            return out
        return dict(result) if isinstance(result, Mapping) else {}

    def exec(
        self, namespace: str, pod: str, container: str, command: Sequence[str], *, timeout: float
    ) -> ExecResult:
        from kubernetes.stream import stream

        ws = stream(
            self.core.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            container=container,
            command=list(command),
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
            _preload_content=False,
        )
        out: list[str] = []
        err: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while ws.is_open() and time.monotonic() < deadline:
                ws.update(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                if ws.peek_stdout():
                    out.append(ws.read_stdout())
                if ws.peek_stderr():
                    err.append(ws.read_stderr())
            timed_out = ws.is_open()
            status_text = ws.read_channel(3) if not timed_out else ""
        finally:
            ws.close()
        if timed_out:
            return ExecResult("".join(out), "".join(err) + f"\n(timed out after {timeout:g}s)", 124)
        return ExecResult("".join(out), "".join(err), _exit_code(status_text))

    def logs(self, namespace: str, pod: str, container: str, *, previous: bool = False) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            text = self.core.read_namespaced_pod_log(
                pod,
                namespace,
                container=container,
                previous=previous,
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            return f"(no log: HTTP {exc.status}: {_reason(exc)})"
        return str(text)


class _BearerAuth(requests.auth.AuthBase):
    """The kubeconfig's bearer token, refreshed (exec / OIDC plugins) on every request."""

    def __init__(self, configuration: Any) -> None:
        self.configuration = configuration

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        token = self.configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            request.headers["Authorization"] = str(token)
        return request


def _exit_code(status_text: str) -> int:
    """The exit code from the exec status channel (a metav1.Status document)."""
    if not status_text:
        return 0
    try:
        status = yaml.safe_load(status_text) or {}
    except yaml.YAMLError:
        return 1
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message", 1))
            except ValueError:
                return 1
    return 126  # the command could not run at all (e.g. not found in the image)


def _reason(exc: BaseException) -> str:
    body = getattr(exc, "body", None) or getattr(exc, "summary", lambda: "")()
    if isinstance(body, (bytes, str)):
        try:
            parsed = yaml.safe_load(body)
            if isinstance(parsed, dict) and parsed.get("message"):
                return str(parsed["message"])
        except yaml.YAMLError:
            pass
        return str(body)[:300]
    return str(getattr(exc, "reason", "") or exc)[:300]


def connect(
    kubeconfig: Path | None,
    context: str | None,
    *,
    timeout: float = 3.0,
    discovery_cache: Path | None = None,
) -> KubernetesAPI:
    """A client for the cluster, after checking the kubeconfig and that the server answers.

    Every failure here is a clear error within a few seconds: the file, the context,
    TCP reachability, then one ``/version`` request with short timeouts.
    """
    info = read_kubeconfig(kubeconfig, context)
    check_reachable(info, timeout=timeout)
    api = KubernetesAPI(info, discovery_cache=discovery_cache)
    try:
        api.server_version()
    except Exception as exc:  # urllib3/ssl/API errors arrive wrapped in many shapes
        api.close()
        cause: BaseException = exc
        while cause.__cause__ is not None or cause.__context__ is not None:
            nxt = cause.__cause__ or cause.__context__
            assert nxt is not None
            cause = nxt
        kind = "TLS" if isinstance(cause, ssl.SSLError) else type(cause).__name__
        raise ClusterUnreachable(
            f"the Kubernetes API server {info.server} (context {info.context!r}) accepted a "
            f"connection but /version failed ({kind}: {cause}); check the kubeconfig's "
            "certificate data and credentials"
        ) from None
    return api
