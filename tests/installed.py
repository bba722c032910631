"""The package's installed dependencies, lent to a fresh virtual environment.

A fresh virtualenv that installs this checkout would otherwise resolve and unpack some
fifty distributions (about 50 s of CPU here, most of a test's cost): the ones this
interpreter already has are made importable in it instead, through symlinks and a .pth
file. Only the closure of securemetrics-e2e's declared requirements is lent, never the
whole site-packages of the test environment: a module the package imports without
declaring its distribution still fails to import in the fresh environment.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PACKAGE = "securemetrics-e2e"


def dependency_closure(name: str = PACKAGE) -> list[md.Distribution]:
    """The installed distributions ``name`` requires, directly or not (extras left out)."""
    found: dict[str, md.Distribution] = {}
    todo = [name]
    while todo:
        key = canonicalize_name(todo.pop())
        if key in found:
            continue
        dist = md.distribution(key)
        found[key] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    del found[canonicalize_name(name)]
    return list(found.values())


def lend_dependencies(python: Path, into: Path, name: str = PACKAGE) -> list[str]:
    """Make ``name``'s dependencies importable by the virtualenv of ``python``: symlinks to
    their top-level files and directories (their .dist-info included, so pip sees them
    installed) in ``into``, named by a .pth file in that virtualenv's site-packages.
    Returns the distributions' names."""
    into.mkdir(parents=True, exist_ok=True)
    dists = dependency_closure(name)
    for dist in dists:
        base = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            link = into / top
            if not link.exists():
                link.symlink_to(base / top)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "_lent_dependencies.pth").write_text(f"{into}\n")
    return sorted(d.metadata["Name"] for d in dists)
