"""A long step says what it waits for every few seconds, and a short one says nothing."""

from __future__ import annotations

import io

from securemetrics_e2e.progress import Progress, heartbeat
from securemetrics_e2e.waiting import NotYet, wait_for, waiting_on


def test_a_long_wait_prints_what_it_waits_for() -> None:
    out = io.StringIO()
    progress = Progress(out, start=0.0)

    def two_beats() -> None:  # the signal waited on is the heartbeat itself
        if out.getvalue().count("waiting for") < 2:
            raise NotYet("fewer than two heartbeats")

    with progress.activated(), heartbeat("rotation[PERMISSIVE]", interval=0.05):
        wait_for("the scraper's renewed certificate", two_beats, timeout=10)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2
    assert all("rotation[PERMISSIVE]" in line for line in lines)
    assert all(line.endswith("waiting for the scraper's renewed certificate") for line in lines)
    assert waiting_on() is None  # the wait is over


def test_a_short_step_or_no_progress_prints_nothing() -> None:
    out = io.StringIO()
    with Progress(out).activated(), heartbeat("native-sidecar[PERMISSIVE]", interval=60):
        pass
    with heartbeat("nobody listening", interval=0.01):
        pass
    assert out.getvalue() == ""
