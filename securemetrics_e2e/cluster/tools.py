"""kind, kubectl and istioctl: pinned versions, verified downloads, a shared cache.

Each tool comes, in this order, from a path the user gives (``--kind-bin`` style), from
``PATH`` (istioctl only when its client version is the one asked for), or from the
official release URL, checked against the ``.sha256`` file published beside it and,
where this module pins one, against a digest recorded here. Downloads land in the
user's cache directory; a lock file per tool version makes two runs that start at once
download it once, and a temporary file renamed into place means no run ever sees half
a binary.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from securemetrics_e2e.cluster.errors import ChecksumMismatch, DownloadFailed
from securemetrics_e2e.errors import UsageError

#: kind release; its notes list the node images built for it (see images.py)
KIND_VERSION = "v0.33.0"
#: kubectl within one minor of every node image we pin (1.34, 1.35, 1.36)
KUBECTL_VERSION = "v1.35.8"

KIND_BASE_URL = "https://github.com/kubernetes-sigs/kind/releases/download"
KUBECTL_BASE_URL = "https://dl.k8s.io/release"
ISTIO_BASE_URL = "https://github.com/istio/istio/releases/download"

# Environment variables that replace a base URL (a mirror, or a test's local server).
BASE_URL_ENV = {
    "kind": "SECUREMETRICS_E2E_KIND_BASE_URL",
    "kubectl": "SECUREMETRICS_E2E_KUBECTL_BASE_URL",
    "istioctl": "SECUREMETRICS_E2E_ISTIO_BASE_URL",
}
CACHE_ENV = "SECUREMETRICS_E2E_CACHE"

#: option that hands each tool over by path, for the "supply it by hand" hint
FLAGS = {"kind": "--kind-bin", "kubectl": "--kind-kubectl-bin", "istioctl": "--istioctl-bin"}

# Digests published in each release's .sha256 file, recorded here so that a release
# asset replaced upstream is caught even if its checksum file was replaced too. Each was
# found identical in several unrelated public projects that pin the same asset.
PINNED_SHA256: dict[tuple[str, str, str], str] = {
    ("kind", "v0.33.0", "linux-amd64"): (
        "aee6151561422756b764a4ae28e7f44cda5af5a9eead3cc9985112b1de8d8e0d"
    ),
    ("kind", "v0.33.0", "darwin-arm64"): (
        "0c8c7dbe5e23594a198b786c4bc13dacc101fa6196b0cb0b23a1ca44e61f4b4f"
    ),
    ("kubectl", "v1.35.8", "linux-amd64"): (
        "874d5e72dbb819f43cff16bcd1e4f8bac5b7f2361fe1e55049b0a6c676fb0cbf"
    ),
    ("kubectl", "v1.35.8", "linux-arm64"): (
        "cc749967b62f4422260bc9c0aa7a7c55f45175ae38cb8d95767b5d2b7e04c1fd"
    ),
}

_HEX64 = re.compile(r"\b([0-9a-fA-F]{64})\b")
_CHUNK = 1 << 16


@dataclass(frozen=True)
class Platform:
    os: str  # "linux" | "darwin"
    arch: str  # "amd64" | "arm64"

    @classmethod
    def current(cls) -> Platform:
        system = sys.platform
        os_name = (
            "darwin" if system == "darwin" else "linux" if system.startswith("linux") else system
        )
        machine = platform.machine().lower()
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
            machine, machine
        )
        return cls(os_name, arch)

    def __str__(self) -> str:
        return f"{self.os}-{self.arch}"


@dataclass(frozen=True)
class ToolSpec:
    """One binary at one version for one platform, and where it is published."""

    name: str
    version: str
    platform: Platform
    url: str
    checksum_url: str
    pinned_sha256: str | None = None
    archive_member: str | None = None  # the binary's name inside a .tar.gz

    def by_hand_hint(self) -> str:
        return (
            f"To supply {self.name} by hand, download {self.url}, check it against "
            f"{self.checksum_url}, make it executable and pass {FLAGS[self.name]} PATH "
            f"(or put it on PATH as `{self.name}`)."
        )


def _base(name: str, base_url: str | None, default: str) -> str:
    return (base_url or os.environ.get(BASE_URL_ENV[name]) or default).rstrip("/")


def kind_spec(
    version: str = KIND_VERSION, plat: Platform | None = None, base_url: str | None = None
) -> ToolSpec:
    plat = plat or Platform.current()
    url = f"{_base('kind', base_url, KIND_BASE_URL)}/{version}/kind-{plat.os}-{plat.arch}"
    return ToolSpec(
        "kind",
        version,
        plat,
        url,
        f"{url}.sha256sum",
        PINNED_SHA256.get(("kind", version, str(plat))),
    )


def kubectl_spec(
    version: str = KUBECTL_VERSION, plat: Platform | None = None, base_url: str | None = None
) -> ToolSpec:
    plat = plat or Platform.current()
    base = _base("kubectl", base_url, KUBECTL_BASE_URL)
    url = f"{base}/{version}/bin/{plat.os}/{plat.arch}/kubectl"
    return ToolSpec(
        "kubectl",
        version,
        plat,
        url,
        f"{url}.sha256",
        PINNED_SHA256.get(("kubectl", version, str(plat))),
    )


def istioctl_spec(
    istio_version: str, plat: Platform | None = None, base_url: str | None = None
) -> ToolSpec:
    """istioctl as Istio publishes it: a tarball per platform (macOS is called ``osx``)."""
    plat = plat or Platform.current()
    os_name = "osx" if plat.os == "darwin" else plat.os
    asset = f"istioctl-{istio_version}-{os_name}-{plat.arch}.tar.gz"
    url = f"{_base('istioctl', base_url, ISTIO_BASE_URL)}/{istio_version}/{asset}"
    return ToolSpec(
        "istioctl",
        istio_version,
        plat,
        url,
        f"{url}.sha256",
        PINNED_SHA256.get(("istioctl", istio_version, str(plat))),
        archive_member="istioctl",
    )


def default_cache_dir() -> Path:
    """``$SECUREMETRICS_E2E_CACHE``, else the platform's per-user cache directory."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "securemetrics-e2e"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "securemetrics-e2e"


@dataclass(frozen=True)
class ResolvedTool:
    """Where a tool was found and how: "flag", "PATH", "cache" or "download"."""

    spec: ToolSpec
    path: Path
    source: str


class ToolCache:
    """Verified tool binaries under ``root/tools/<name>/<version>/<os>-<arch>/``."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (10.0, 120.0),
    ) -> None:
        self.root = root if root is not None else default_cache_dir()
        self.session = session if session is not None else requests.Session()
        self.timeout = timeout

    def path_for(self, spec: ToolSpec) -> Path:
        return self.root / "tools" / spec.name / spec.version / str(spec.platform) / spec.name

    def cached(self, spec: ToolSpec) -> Path | None:
        """The cached binary if present and still matching the digest recorded for it."""
        target = self.path_for(spec)
        record = target.with_name(f"{spec.name}.sha256")
        if not (target.is_file() and record.is_file()):
            return None
        recorded = record.read_text().strip()
        return target if _sha256_file(target) == recorded else None

    def ensure(self, spec: ToolSpec) -> ResolvedTool:
        """The verified binary, downloading it once across concurrent runs."""
        target = self.path_for(spec)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / ".lock"):
            found = self.cached(spec)
            if found is not None:
                return ResolvedTool(spec, found, "cache")
            self._download(spec, target)
            return ResolvedTool(spec, target, "download")

    # -- downloading ---------------------------------------------------------------

    def _download(self, spec: ToolSpec, target: Path) -> None:
        published = self._published_digest(spec)
        if spec.pinned_sha256 and published != spec.pinned_sha256:
            raise ChecksumMismatch(
                what=spec.name,
                version=spec.version,
                url=spec.checksum_url,
                expected=spec.pinned_sha256,
                actual=published,
                source="pinned in securemetrics_e2e.cluster.tools; the published checksum "
                "file disagrees with it",
                hint=spec.by_hand_hint(),
            )
        fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.name}-", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual = self._stream(spec, spec.url, out)
            if actual != published:
                raise ChecksumMismatch(
                    what=spec.name,
                    version=spec.version,
                    url=spec.url,
                    expected=published,
                    actual=actual,
                    source=f"published in {spec.checksum_url}",
                    hint=spec.by_hand_hint(),
                )
            binary = tmp
            if spec.archive_member:
                binary = _extract_member(spec, tmp, target.parent)
                tmp.unlink()
            binary.chmod(0o755)
            digest = _sha256_file(binary)
            os.replace(binary, target)
            _atomic_text(target.with_name(f"{spec.name}.sha256"), digest + "\n")
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _get(self, spec: ToolSpec, url: str, *, stream: bool) -> requests.Response:
        try:
            response = self.session.get(url, stream=stream, timeout=self.timeout)
        except requests.RequestException as exc:
            raise DownloadFailed(
                f"cannot download {spec.name} {spec.version} from {url}: {exc}. "
                f"{spec.by_hand_hint()}"
            ) from None
        if response.status_code != 200:
            response.close()
            raise DownloadFailed(
                f"cannot download {spec.name} {spec.version}: {url} answered HTTP "
                f"{response.status_code} (is {spec.version} a released version?). "
                f"{spec.by_hand_hint()}"
            )
        return response

    def _published_digest(self, spec: ToolSpec) -> str:
        response = self._get(spec, spec.checksum_url, stream=False)
        match = _HEX64.search(response.text)
        if match is None:
            raise DownloadFailed(
                f"the checksum file {spec.checksum_url} holds no sha256 digest "
                f"(first bytes: {response.text[:80]!r}). {spec.by_hand_hint()}"
            )
        return match.group(1).lower()

    def _stream(self, spec: ToolSpec, url: str, out: io.BufferedWriter) -> str:
        digest = hashlib.sha256()
        with self._get(spec, url, stream=True) as response:
            try:
                for chunk in response.iter_content(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            except requests.RequestException as exc:
                raise DownloadFailed(
                    f"download of {spec.name} from {url} broke off: {exc}. {spec.by_hand_hint()}"
                ) from None
        out.flush()
        os.fsync(out.fileno())
        return digest.hexdigest()


@dataclass(frozen=True)
class PinnedFile:
    """A manifest fetched from a fixed URL whose sha256 this project recorded."""

    label: str  # e.g. "Gateway API v1.6.0 CRD gateways"
    url: str
    sha256: str


def fetch_pinned(item: PinnedFile, cache: ToolCache) -> bytes:
    """The verified content of ``item``, from the cache or downloaded once into it."""
    target = cache.root / "files" / item.sha256 / Path(item.url).name
    hint = (
        f"To supply it by hand, download {item.url}, check that its sha256 is "
        f"{item.sha256} and save it as {target}."
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / ".lock"):
        if target.is_file():
            data = target.read_bytes()
            if hashlib.sha256(data).hexdigest() == item.sha256:
                return data
        try:
            response = cache.session.get(item.url, timeout=cache.timeout)
        except requests.RequestException as exc:
            raise DownloadFailed(
                f"cannot download {item.label} from {item.url}: {exc}. {hint}"
            ) from None
        if response.status_code != 200:
            raise DownloadFailed(
                f"cannot download {item.label}: {item.url} answered HTTP "
                f"{response.status_code}. {hint}"
            )
        data = response.content
        actual = hashlib.sha256(data).hexdigest()
        if actual != item.sha256:
            raise ChecksumMismatch(
                what=item.label,
                version="",
                url=item.url,
                expected=item.sha256,
                actual=actual,
                source="pinned in securemetrics_e2e.cluster",
                hint=hint,
            )
        _atomic_bytes(target, data)
        return data


def resolve_tool(
    spec: ToolSpec,
    cache: ToolCache,
    *,
    override: Path | None = None,
    use_path: bool = True,
) -> ResolvedTool:
    """The binary to run for ``spec``: the override, a matching one on PATH, or the cache."""
    if override is not None:
        return ResolvedTool(spec, check_override(spec, override), "flag")
    if use_path:
        on_path = _usable_on_path(spec)
        if on_path is not None:
            return ResolvedTool(spec, on_path, "PATH")
    return cache.ensure(spec)


def describe_resolution(
    spec: ToolSpec, cache: ToolCache, *, override: Path | None = None, use_path: bool = True
) -> str:
    """What :func:`resolve_tool` would do, without downloading anything."""
    if override is not None:
        return f"{spec.name}: {override} (given by {FLAGS[spec.name]})"
    if use_path:
        on_path = _usable_on_path(spec)
        if on_path is not None:
            return f"{spec.name}: {on_path} (found on PATH)"
    cached = cache.path_for(spec)
    verify = f"sha256 from {spec.checksum_url}"
    if spec.pinned_sha256:
        verify += f", must equal pinned {spec.pinned_sha256}"
    where = "cached at" if cache.cached(spec) is not None else "download to"
    return f"{spec.name} {spec.version}: {spec.url} ({verify}); {where} {cached}"


def check_override(spec: ToolSpec, path: Path) -> Path:
    flag = FLAGS[spec.name]
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file; give the path of a {spec.name} binary")
    if not path.is_file() or not os.access(path, os.X_OK):
        raise UsageError(
            f"{flag} {path}: not an executable file; chmod +x it or give another {spec.name}"
        )
    return path


def _usable_on_path(spec: ToolSpec) -> Path | None:
    found = shutil.which(spec.name)
    if found is None:
        return None
    if spec.name != "istioctl":
        return Path(found)
    # istioctl installs its own version of Istio: only an exact match will do.
    return Path(found) if istioctl_client_version(Path(found)) == spec.version else None


def istioctl_client_version(path: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(path), "version", "--remote=false"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?)", out.stdout)
    return match.group(1) if match else None


# -- helpers --------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_text(path: Path, text: str) -> None:
    _atomic_bytes(path, text.encode())


def _atomic_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _extract_member(spec: ToolSpec, archive: Path, directory: Path) -> Path:
    """Copy the one regular file named ``spec.archive_member`` out of a .tar.gz."""
    wanted = spec.archive_member
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.removeprefix("./") == wanted:
                    source = tar.extractfile(member)
                    if source is None:  # pragma: no cover - isfile() members always open
                        break
                    fd, out_name = tempfile.mkstemp(prefix=f".{spec.name}-bin-", dir=directory)
                    try:
                        with os.fdopen(fd, "wb") as out:
                            shutil.copyfileobj(source, out, _CHUNK)
                    except BaseException:
                        Path(out_name).unlink(missing_ok=True)
                        raise
                    return Path(out_name)
    except (tarfile.TarError, OSError) as exc:
        raise DownloadFailed(
            f"{spec.url} is not a readable .tar.gz ({exc}). {spec.by_hand_hint()}"
        ) from None
    raise DownloadFailed(f"{spec.url} holds no file named {wanted!r}. {spec.by_hand_hint()}")
