"""Output files (report, JUnit, matrix): checked before a run starts, written without surprises.

A run takes minutes; finding out at its end that the report cannot be written loses it.
:func:`check_writable` proves, before anything starts, that a file can be created where the
user asked, by creating (and removing) a probe file there: permission bits say nothing
for root or for pseudo file systems such as /proc. :class:`OutputFailed` is a write that
failed anyway after the run: the CLI reports it as an error of its own, never as a
verdict about the mesh.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Final

from securemetrics_e2e.errors import SecureMetricsError, UsageError

#: report file suffixes and the format each chooses (the CLI, the plugin and the matrix)
JSON_SUFFIXES: Final = frozenset({".json"})
YAML_SUFFIXES: Final = frozenset({".yaml", ".yml"})


def report_format(path: Path) -> str:
    """The format ``path``'s suffix chooses: json or yaml (UsageError for any other)."""
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in YAML_SUFFIXES:
        return "yaml"
    raise UsageError(
        f"report path {str(path)!r} must end in .json, .yaml or .yml (it chooses the format)"
    )


class OutputFailed(SecureMetricsError):
    """An output file could not be written after the run (the verdict stands)."""


def _existing_ancestor(path: Path) -> Path:
    for candidate in path.parents:
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_writable(path: Path, option: str) -> None:
    """UsageError naming ``option`` unless a file can be written at ``path``."""
    shown = f"{option} {str(path)!r}"
    if path.is_dir():
        raise UsageError(f"{shown} is a directory; give a file path")
    parent = path.parent if path.parent.exists() else _existing_ancestor(path)
    if not parent.is_dir():
        raise UsageError(f"{shown}: {parent} is not a directory; choose another path")
    try:
        # the run creates missing directories below ``parent``; prove it can create there
        fd, probe = tempfile.mkstemp(prefix=".securemetrics-probe-", dir=parent)
    except OSError as exc:
        raise UsageError(
            f"{shown} cannot be written ({exc.strerror or exc} in {parent}); choose a writable path"
        ) from None
    os.close(fd)
    os.unlink(probe)
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{shown} exists and is not writable; choose another path")


def write_atomically(path: Path, data: bytes, what: str) -> None:
    """Write ``data`` to ``path`` whole or not at all; OutputFailed naming ``what`` on failure.

    A reader (CI uploading artifacts, a matrix merge) never sees half a file.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputFailed(f"could not write {what} {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
