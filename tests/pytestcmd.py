"""pytest as the tests start it in a subprocess, the way a user types `pytest`.

Two of the development dependencies register pytest plugins that no run here uses:
cloudcoil (installed for its Kubernetes models, tests/test_manifests.py) and anyio. The
repository's pytest configuration blocks both, but a subprocess started in a scratch
directory does not read it, and each of them costs a pytest process about 0.75 s of CPU
(cloudcoil imports a Kubernetes client and pydantic), a third of a `--plan` run. Every
other plugin still loads through its entry point, ours included, as on a user's machine.
"""

from __future__ import annotations

import sys

#: the plugins the repository's configuration blocks too (pyproject.toml, addopts)
UNUSED_PLUGINS = ("cloudcoil", "anyio")


def pytest_command(*args: str) -> list[str]:
    """``python -m pytest`` without the cache provider and the unused plugins, then ``args``."""
    blocked = [arg for name in UNUSED_PLUGINS for arg in ("-p", f"no:{name}")]
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *blocked, *args]
