"""Continuity windows run in the background beside the other checks, and stop cleanly.

The mechanics (:mod:`securemetrics_e2e.windows`) on plain functions, then the fleet of
the pytest plugin on the local mesh: the rotation and upgrade windows open when the
fleet is deployed and overlap each other and the other units' checks, judged as before;
a window nobody reads is stopped and joined when the fleet closes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from securemetrics_e2e.catalog import MtlsMode, RunUnit, scenario
from securemetrics_e2e.checks import CHECKS, Check
from securemetrics_e2e.continuity import Continuity
from securemetrics_e2e.local.backend import LocalBackend
from securemetrics_e2e.plugin import Fleet
from securemetrics_e2e.results import Status
from securemetrics_e2e.runner import Attempt, attempt
from securemetrics_e2e.versions import DEFAULT_VERSION
from securemetrics_e2e.waiting import NotYet, wait_for
from securemetrics_e2e.windows import WindowError, Windows
from tests.localmesh import requires_local_mesh

#: real runs (meshes, Prometheus, the CLI): the full tier's, not the quick one's
pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- mechanics


def _never() -> None:
    raise NotYet("a signal that never comes")


def test_a_window_hands_back_what_it_returned_or_raised() -> None:
    windows: Windows[int] = Windows()
    windows.start("ok", "ok", lambda: 42)
    windows.start("bad", "bad", lambda: int("x"))
    assert windows.result("ok") == 42
    with pytest.raises(ValueError, match="invalid literal"):
        windows.result("bad")
    started, ended = windows.interval("ok")
    assert ended is not None
    assert ended >= started
    assert not windows.started("other")


def test_a_stopped_window_ends_its_wait_and_runs_its_cleanup() -> None:
    cleaned = threading.Event()

    def window() -> None:
        try:
            wait_for("a signal that never comes", _never, timeout=3600)
        finally:
            cleaned.set()

    windows: Windows[None] = Windows()
    windows.start("w", "w", window)
    windows.stop()  # joins, or raises WindowError: the wait would last an hour
    assert cleaned.is_set()
    with pytest.raises(WindowError, match="was stopped"):
        windows.result("w")


def test_a_window_that_outlasts_its_reader_is_stopped() -> None:
    windows: Windows[None] = Windows()
    windows.start("w", "w", lambda: wait_for("never", _never, timeout=3600))
    with pytest.raises(WindowError, match="did not end within"):
        windows.result("w", timeout=0.01)
    assert windows.interval("w")[1] is not None  # stopped and joined by then


def test_waits_outside_a_window_are_not_cancelled_by_it() -> None:
    windows: Windows[None] = Windows()
    windows.start("w", "w", lambda: wait_for("never", _never, timeout=3600))
    windows.stop()
    assert wait_for("a signal that is there", lambda: 1, timeout=1) == 1


def test_a_window_cannot_be_opened_twice() -> None:
    windows: Windows[int] = Windows()
    windows.start("w", "w", lambda: 1)
    with pytest.raises(WindowError, match="already running"):
        windows.start("w", "w", lambda: 2)
    windows.stop()


# --------------------------------------------------------------------------- the fleet

ROTATION = RunUnit(scenario("rotation"), MtlsMode.PERMISSIVE, scenario("rotation").variants[0])
UPGRADE = RunUnit(scenario("upgrade"), MtlsMode.PERMISSIVE, scenario("upgrade").variants[0])
NATIVE = RunUnit(
    scenario("native-sidecar"), MtlsMode.PERMISSIVE, scenario("native-sidecar").variants[0]
)
VERSION = str(DEFAULT_VERSION)
WINDOWED = {(ROTATION, "rotation-continuity"), (UPGRADE, "upgrade-continuity")}


def _check(check_id: str) -> Check:
    return next(c for c in CHECKS if c.id == check_id)


class Overlap:
    def __init__(self) -> None:
        self.snapshot: list[Attempt] = []
        self.during_rotation = 0  # snapshot checks that ended while rotation still ran
        self.rotation: Attempt | None = None
        self.upgrade: Attempt | None = None
        self.successor_scrapes_in_rotation = 0
        self.backend = LocalBackend()


@pytest.fixture(scope="module")
def overlap() -> Iterator[Overlap]:
    seen = Overlap()
    backend = seen.backend
    fleet = Fleet(backend, [NATIVE, ROTATION, UPGRADE], VERSION, windowed=WINDOWED)
    try:
        native = fleet.get(NATIVE)  # deploys all three; the windows open now
        rotation_key = ("rotation-continuity", fleet.get(ROTATION).namespace)
        for chk in CHECKS:
            if chk.applies_to(native.scenario):
                seen.snapshot.append(attempt(chk, backend, native, fleet.windows))
                running = fleet.windows.started(rotation_key)
                if running and fleet.windows.interval(rotation_key)[1] is None:
                    seen.during_rotation += 1
        upgrade = fleet.get(UPGRADE)
        seen.rotation = attempt(_check("rotation-continuity"), backend, fleet.get(ROTATION),
                                fleet.windows)  # fmt: skip
        seen.upgrade = attempt(_check("upgrade-continuity"), backend, upgrade, fleet.windows)
        # the successor pod, as Prometheus recorded it: scrapes of a pod the upgrade
        # started, inside the rotation window
        rotated = seen.rotation.measured
        assert isinstance(rotated, Continuity), seen.rotation  # the outcome says why not
        old = {w.pod_name for w in upgrade.workloads}
        span = int((datetime.now(UTC) - rotated.start).total_seconds()) + 5
        for series in backend.prometheus().query(f'up{{namespace="{upgrade.namespace}"}}[{span}s]'):
            if series["metric"].get("pod") in old:
                continue
            seen.successor_scrapes_in_rotation += sum(
                rotated.start.timestamp() <= float(ts) <= rotated.end.timestamp()
                for ts, _ in series["values"]
            )
        yield seen
    finally:
        try:
            fleet.close()
        finally:
            backend.close()


@requires_local_mesh
def test_windows_pass_as_when_they_ran_in_their_turn(overlap: Overlap) -> None:
    for seen in (overlap.rotation, overlap.upgrade):
        assert seen is not None
        assert seen.status is Status.PASS, seen
        assert isinstance(seen.measured, Continuity)
        assert seen.measured.ok
    assert all(a.status is not Status.FAIL for a in overlap.snapshot), overlap.snapshot


@requires_local_mesh
def test_the_other_units_are_probed_while_the_rotation_window_runs(overlap: Overlap) -> None:
    # windows run one after another again (or after the probes): this count is 0
    assert overlap.during_rotation >= 1


@requires_local_mesh
def test_the_upgrade_successor_is_scraped_inside_the_rotation_window(overlap: Overlap) -> None:
    # the upgrade does not wait for the rotation window: Prometheus scraped the pod that
    # replaced the upgraded one while the rotation was still being measured
    assert overlap.successor_scrapes_in_rotation >= 1


@requires_local_mesh
def test_a_window_nobody_reads_is_stopped_before_its_unit_goes() -> None:
    backend = LocalBackend()
    fleet = Fleet(backend, [ROTATION], VERSION, windowed={(ROTATION, "rotation-continuity")})
    try:
        dep = fleet.get(ROTATION)
        key = ("rotation-continuity", dep.namespace)
        assert fleet.windows.started(key)
        fleet.close()  # the run ends before the item came (deselected, interrupted)
        assert fleet.windows.interval(key)[1] is not None  # joined
        with pytest.raises(WindowError, match="was stopped"):
            fleet.windows.result(key)
        # the shared scraper got its long-lived certificate back in the window's cleanup
        left = backend.scraper_identity().not_after - datetime.now(UTC)
        assert left.total_seconds() > 3600
    finally:
        backend.close()
