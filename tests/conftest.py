"""Fixtures shared by test files (xdist keeps the files sharing one on one worker:
see the repository's conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import cliruns
from tests.walkthrough import Walk, walk


@pytest.fixture(scope="session")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Walk:
    """docs/vendor-walkthrough.md's commands, run once (tests/walkthrough.py): its test
    and the golden comparison of its local run's report read the same walk."""
    return walk(tmp_path_factory.mktemp("walkthrough"))


@pytest.fixture(scope="session")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, cliruns.Run]]:
    """A clean and a faulted local run of the command (tests/cliruns.py), read by
    tests/test_cli.py and tests/test_provenance.py."""
    yield from cliruns.cli_runs(
        tmp_path_factory.mktemp("good"),
        tmp_path_factory.mktemp("bad"),
        tmp_path_factory.mktemp("plugins"),
    )
