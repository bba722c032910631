"""Repository conftest: the securemetrics-e2e plugin is loaded through its pytest11 entry point.

Under pytest-xdist (``nox -s tests`` runs with it) this file decides which tests share a
worker: a test file's tests stay together (their module fixtures, e.g. a mesh, are built
once), and every conformance scenario (``scenarios/``) runs on one worker, because the
plugin deploys all selected run units at once as one session-scoped fleet with one
Prometheus: split across workers, each would deploy the whole fleet again.
"""

from __future__ import annotations

from typing import Any

import pytest

#: files holding the real-process tests that take longest, started first so that no
#: worker picks one up at the end while the others idle (longest processing time first)
_LONGEST_FIRST = ("scenarios",)


def xdist_scope(nodeid: str) -> str:
    """The unit of work a worker takes whole: ``scenarios`` or one test file."""
    path = nodeid.split("::", 1)[0]
    return "scenarios" if path.startswith("scenarios/") else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return FileScheduling(config, log)
