"""Fixtures shared by test files (xdist keeps the files sharing one on one worker:
see the repository's conftest.py)."""

from __future__ import annotations

import pytest

from tests.walkthrough import Walk, walk


@pytest.fixture(scope="session")
def walkthrough(tmp_path_factory: pytest.TempPathFactory) -> Walk:
    """docs/vendor-walkthrough.md's commands, run once (tests/walkthrough.py): its test
    and the golden comparison of its local run's report read the same walk."""
    return walk(tmp_path_factory.mktemp("walkthrough"))
