"""Tool downloads against a real HTTP server on 127.0.0.1 (never the internet).

The server is Python's http.server in a thread, serving stand-in release assets and
their checksum files at the paths the official release hosts use; the base URLs of
the tool specs point at it.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from securemetrics_e2e.cluster.errors import ChecksumMismatch, DownloadFailed
from securemetrics_e2e.cluster.tools import (
    PINNED_SHA256,
    PinnedFile,
    Platform,
    ToolCache,
    describe_resolution,
    fetch_pinned,
    istioctl_spec,
    kind_spec,
    kubectl_spec,
    resolve_tool,
)
from securemetrics_e2e.errors import UsageError
from securemetrics_e2e.waiting import NotYet, wait_for

LINUX = Platform("linux", "amd64")
VERSION = "v9.9.9-test"  # no digest is pinned for it, so only the published file counts


@dataclass
class FileServer:
    """Serves ``files`` (path -> bytes); counts GETs per path; can hold one path back."""

    files: dict[str, bytes] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    base_url: str = ""

    def add(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def add_with_checksum(self, path: str, data: bytes, suffix: str, line: str = "") -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.add(path, data)
        self.add(path + suffix, (line or f"{digest}  {path.rsplit('/', 1)[-1]}\n").encode())
        return digest


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits[self.path] += 1
            gate = state.hold.get(self.path)
            if gate is not None:
                gate.wait(timeout=30)
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        for gate in state.hold.values():
            gate.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _leftovers(root: Path) -> list[str]:
    """Files in the cache other than lock files: temp files must never remain."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != ".lock"
    )


# -- specs: the official URLs ----------------------------------------------------------


def test_official_urls_and_pins() -> None:
    kind = kind_spec(plat=LINUX)
    assert kind.url == (
        "https://github.com/kubernetes-sigs/kind/releases/download/v0.33.0/kind-linux-amd64"
    )
    assert kind.checksum_url == kind.url + ".sha256sum"
    assert kind.pinned_sha256 == PINNED_SHA256[("kind", "v0.33.0", "linux-amd64")]
    kubectl = kubectl_spec(plat=Platform("linux", "arm64"))
    assert kubectl.url == "https://dl.k8s.io/release/v1.35.8/bin/linux/arm64/kubectl"
    assert kubectl.checksum_url == kubectl.url + ".sha256"
    assert kubectl.pinned_sha256 is not None
    istioctl = istioctl_spec("1.31.1", plat=Platform("darwin", "arm64"))
    assert istioctl.url == (
        "https://github.com/istio/istio/releases/download/1.31.1/istioctl-1.31.1-osx-arm64.tar.gz"
    )
    assert istioctl.checksum_url == istioctl.url + ".sha256"
    assert istioctl.archive_member == "istioctl"
    assert istioctl.pinned_sha256 is None  # verified against the published file only


def test_base_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECUREMETRICS_E2E_ISTIO_BASE_URL", "http://127.0.0.1:1/mirror/")
    spec = istioctl_spec("1.30.5", plat=LINUX)
    assert spec.url == "http://127.0.0.1:1/mirror/1.30.5/istioctl-1.30.5-linux-amd64.tar.gz"


# -- download, verify, cache ------------------------------------------------------------


def test_download_verifies_and_caches(server: FileServer, tmp_path: Path) -> None:
    binary = b"#!/bin/sh\necho stand-in kind\n"
    path = f"/{VERSION}/kind-linux-amd64"
    server.add_with_checksum(path, binary, ".sha256sum")
    cache = ToolCache(tmp_path)
    spec = kind_spec(VERSION, LINUX, base_url=server.base_url)

    first = resolve_tool(spec, cache, use_path=False)
    assert first.source == "download"
    assert first.path == tmp_path / "tools/kind" / VERSION / "linux-amd64/kind"
    assert first.path.read_bytes() == binary
    assert first.path.stat().st_mode & stat.S_IXUSR
    again = resolve_tool(spec, cache, use_path=False)
    assert again.source == "cache"
    assert server.hits[path] == 1
    assert server.hits[path + ".sha256sum"] == 1
    assert _leftovers(tmp_path) == [
        f"tools/kind/{VERSION}/linux-amd64/kind",
        f"tools/kind/{VERSION}/linux-amd64/kind.sha256",
    ]


def test_corrupted_cache_is_downloaded_again(server: FileServer, tmp_path: Path) -> None:
    path = f"/{VERSION}/bin/linux/amd64/kubectl"
    server.add_with_checksum(path, b"kubectl stand-in", ".sha256", line="")
    cache = ToolCache(tmp_path)
    spec = kubectl_spec(VERSION, LINUX, base_url=server.base_url)
    got = cache.ensure(spec)
    got.path.write_bytes(b"tampered")
    assert cache.cached(spec) is None
    assert cache.ensure(spec).source == "download"
    assert got.path.read_bytes() == b"kubectl stand-in"
    assert server.hits[path] == 2


def test_checksum_mismatch_names_url_digests_and_fix(server: FileServer, tmp_path: Path) -> None:
    path = f"/{VERSION}/kind-linux-amd64"
    served = b"what the mirror sent"
    server.add(path, served)
    wrong = "0" * 64
    server.add(path + ".sha256sum", f"{wrong}  kind-linux-amd64\n".encode())
    spec = kind_spec(VERSION, LINUX, base_url=server.base_url)
    with pytest.raises(ChecksumMismatch) as caught:
        resolve_tool(spec, ToolCache(tmp_path), use_path=False)
    message = str(caught.value)
    assert spec.url in message
    assert wrong in message
    assert hashlib.sha256(served).hexdigest() in message
    assert "--kind-bin" in message
    assert spec.checksum_url in message
    assert _leftovers(tmp_path) == []


def test_pinned_digest_overrides_a_replaced_checksum_file(
    server: FileServer, tmp_path: Path
) -> None:
    path = f"/{VERSION}/kind-linux-amd64"
    server.add_with_checksum(path, b"replaced upstream", ".sha256sum")
    spec = kind_spec(VERSION, LINUX, base_url=server.base_url)
    pinned = "ab" * 32
    spec = type(spec)(**{**spec.__dict__, "pinned_sha256": pinned})
    with pytest.raises(ChecksumMismatch, match="pinned") as caught:
        ToolCache(tmp_path).ensure(spec)
    assert pinned in str(caught.value)
    assert server.hits[path] == 0  # nothing downloaded once the checksum file disagrees
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("missing", "HTTP 404"),
        ("no-digest", "holds no sha256 digest"),
    ],
)
def test_download_failures(server: FileServer, tmp_path: Path, setup: str, needle: str) -> None:
    path = f"/{VERSION}/kind-linux-amd64"
    if setup == "no-digest":
        server.add(path, b"bin")
        server.add(path + ".sha256sum", b"<html>not a checksum</html>")
    spec = kind_spec(VERSION, LINUX, base_url=server.base_url)
    with pytest.raises(DownloadFailed, match=needle) as caught:
        ToolCache(tmp_path).ensure(spec)
    assert spec.checksum_url in str(caught.value)
    assert "--kind-bin" in str(caught.value)
    assert _leftovers(tmp_path) == []


def test_unreachable_host_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    spec = kubectl_spec(VERSION, LINUX, base_url=f"http://127.0.0.1:{closed}")
    with pytest.raises(DownloadFailed, match="cannot download kubectl") as caught:
        ToolCache(tmp_path).ensure(spec)  # a closed port refuses at once: no retry loop
    assert "--kind-kubectl-bin" in str(caught.value)


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_istioctl_tarball_is_verified_then_unpacked(server: FileServer, tmp_path: Path) -> None:
    binary = b"istioctl stand-in binary"
    path = "/1.31.1/istioctl-1.31.1-linux-amd64.tar.gz"
    server.add_with_checksum(path, _tarball({"istioctl": binary}), ".sha256")
    spec = istioctl_spec("1.31.1", LINUX, base_url=server.base_url)
    got = ToolCache(tmp_path).ensure(spec)
    assert got.path.read_bytes() == binary
    assert os.access(got.path, os.X_OK)
    assert _leftovers(tmp_path) == [
        "tools/istioctl/1.31.1/linux-amd64/istioctl",
        "tools/istioctl/1.31.1/linux-amd64/istioctl.sha256",
    ]


def test_istioctl_tarball_without_the_binary(server: FileServer, tmp_path: Path) -> None:
    path = "/1.31.1/istioctl-1.31.1-linux-amd64.tar.gz"
    server.add_with_checksum(path, _tarball({"README": b"x"}), ".sha256")
    spec = istioctl_spec("1.31.1", LINUX, base_url=server.base_url)
    with pytest.raises(DownloadFailed, match="no file named 'istioctl'"):
        ToolCache(tmp_path).ensure(spec)
    assert _leftovers(tmp_path) == []


def _lock_waiters(lock: Path) -> int:
    """How many processes are blocked waiting for a lock on ``lock`` (/proc/locks '->')."""
    inode = lock.stat().st_ino
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and line.split()[-3].endswith(f":{inode}"))


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_two_runs_at_once_download_once(server: FileServer, tmp_path: Path) -> None:
    binary = os.urandom(256 * 1024)
    path = f"/{VERSION}/kind-linux-amd64"
    server.add_with_checksum(path, binary, ".sha256sum")
    gate = threading.Event()
    server.hold[path] = gate
    script = (
        "import sys; from pathlib import Path\n"
        "from securemetrics_e2e.cluster.tools import ToolCache, kind_spec, Platform\n"
        f"spec = kind_spec({VERSION!r}, Platform('linux', 'amd64'), base_url={server.base_url!r})\n"
        "got = ToolCache(Path(sys.argv[1])).ensure(spec)\n"
        "print(got.source, got.path)\n"
    )

    def run() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    first = run()
    second: subprocess.Popen[str] | None = None
    try:

        def first_downloading() -> None:
            if server.hits[path] < 1:
                raise NotYet("first run has not requested the binary")

        wait_for("the first run to start its download", first_downloading, timeout=20)
        second = run()
        lock = tmp_path / "tools/kind" / VERSION / "linux-amd64/.lock"

        def second_waiting() -> None:
            if _lock_waiters(lock) < 1:
                raise NotYet("no process blocked on the cache lock")

        wait_for("the second run to block on the cache lock", second_waiting, timeout=20)
        gate.set()
        out1, err1 = first.communicate(timeout=30)
        out2, err2 = second.communicate(timeout=30)
    finally:
        gate.set()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert out1.split()[0] == "download"
    assert out2.split()[0] == "cache"
    assert out1.split()[1] == out2.split()[1]
    assert server.hits[path] == 1
    assert Path(out1.split()[1]).read_bytes() == binary
    assert _leftovers(tmp_path) == [
        f"tools/kind/{VERSION}/linux-amd64/kind",
        f"tools/kind/{VERSION}/linux-amd64/kind.sha256",
    ]


# -- overrides and PATH --------------------------------------------------------------------


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_flag_override(tmp_path: Path) -> None:
    spec = kind_spec(VERSION, LINUX, base_url="http://127.0.0.1:1")
    cache = ToolCache(tmp_path / "cache")
    with pytest.raises(UsageError, match=r"--kind-bin .*no such file"):
        resolve_tool(spec, cache, override=tmp_path / "missing")
    plain = tmp_path / "kind-not-exec"
    plain.write_text("x")
    with pytest.raises(UsageError, match="not an executable"):
        resolve_tool(spec, cache, override=plain)
    good = _executable(tmp_path / "kind", "#!/bin/sh\n")
    got = resolve_tool(spec, cache, override=good)
    assert (got.source, got.path) == ("flag", good)
    assert not (tmp_path / "cache").exists()


def test_path_tools_and_istioctl_version_match(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    kubectl = _executable(bindir / "kubectl", "#!/bin/sh\n")
    # a stand-in istioctl that reports a client version, as `istioctl version` does
    _executable(bindir / "istioctl", "#!/bin/sh\necho 'client version: 1.30.5'\n")
    monkeypatch.setenv("PATH", str(bindir))
    cache = ToolCache(tmp_path / "cache")
    got = resolve_tool(kubectl_spec(VERSION, LINUX, base_url=server.base_url), cache)
    assert (got.source, got.path) == ("PATH", kubectl)
    same = resolve_tool(istioctl_spec("1.30.5", LINUX, base_url=server.base_url), cache)
    assert (same.source, same.path) == ("PATH", bindir / "istioctl")
    # another version on PATH is not used: the pinned release is downloaded instead
    server.add_with_checksum(
        "/1.31.1/istioctl-1.31.1-linux-amd64.tar.gz", _tarball({"istioctl": b"1.31.1"}), ".sha256"
    )
    other = resolve_tool(istioctl_spec("1.31.1", LINUX, base_url=server.base_url), cache)
    assert other.source == "download"
    assert other.path.read_bytes() == b"1.31.1"


def test_describe_resolution_touches_nothing(server: FileServer, tmp_path: Path) -> None:
    spec = kind_spec("v0.33.0", LINUX, base_url=server.base_url)
    text = describe_resolution(spec, ToolCache(tmp_path), use_path=False)
    assert spec.url in text
    assert spec.checksum_url in text
    assert PINNED_SHA256[("kind", "v0.33.0", "linux-amd64")] in text
    assert "download to" in text
    assert sum(server.hits.values()) == 0
    assert not any(tmp_path.iterdir())


# -- pinned manifests ----------------------------------------------------------------------


def test_fetch_pinned(server: FileServer, tmp_path: Path) -> None:
    data = b"apiVersion: v1\nkind: List\n"
    server.add("/crds/a.yaml", data)
    item = PinnedFile(
        "test CRD", f"{server.base_url}/crds/a.yaml", hashlib.sha256(data).hexdigest()
    )
    cache = ToolCache(tmp_path)
    assert fetch_pinned(item, cache) == data
    assert fetch_pinned(item, cache) == data
    assert server.hits["/crds/a.yaml"] == 1
    bad = PinnedFile("test CRD", item.url, "cd" * 32)
    with pytest.raises(ChecksumMismatch) as caught:
        fetch_pinned(bad, cache)
    assert "cd" * 32 in str(caught.value)
    assert hashlib.sha256(data).hexdigest() in str(caught.value)
    assert item.url in str(caught.value)
    assert "save it as" in str(caught.value)
    assert not (tmp_path / "files" / ("cd" * 32) / "a.yaml").exists()
