"""Continuity windows in the background: opened when the fleet is deployed, judged later.

A continuity check (rotation, upgrade) watches Prometheus scrape across a change for
several scrape intervals; run in its turn, after every other unit was probed, it added
its whole length to the run. :class:`Windows` runs each one in a thread of its own from
the moment its run unit is deployed, so the windows overlap each other and the other
units' checks; the check's item then waits for the result (bounded) and judges it as
before. The pytest plugin's fleet and :func:`~securemetrics_e2e.runner.run_checks` both
use it through the runner.

A window that is never awaited (its item deselected, the run interrupted) is stopped
when its unit or the run ends: its waits raise :class:`~.waiting.Cancelled`, its
``finally`` blocks put back what it changed, and the thread is joined before anything
is torn down, so nothing outlives the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from securemetrics_e2e.errors import SecureMetricsError
from securemetrics_e2e.waiting import Cancelled, cancelled_by

T = TypeVar("T")

#: how long an item waits for its window beyond anything the window itself waits for:
#: every wait inside a window is bounded; this bound only catches one stuck outside them
AWAIT_S = 300.0
#: how long a stopped window gets to put back what it changed (renewed certificates,
#: retired pods) before its thread is given up on
STOP_S = 30.0


class WindowError(SecureMetricsError):
    """A window did not end in time, or was stopped before its result was read."""


@dataclass
class _Window(Generic[T]):
    name: str
    thread: threading.Thread
    cancel: threading.Event
    started: float  # time.monotonic()
    ended: float | None = None
    value: T | None = None
    error: BaseException | None = None


@dataclass
class Windows(Generic[T]):
    """Background runs of continuity windows, each under a key (e.g. check and unit)."""

    _runs: dict[Hashable, _Window[T]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, key: Hashable, name: str, run: Callable[[], T]) -> None:
        """Start ``run`` in a thread of its own now; its result is read with :meth:`result`."""
        cancel = threading.Event()
        with self._lock:
            if key in self._runs:
                raise WindowError(f"window {name} is already running")

            def body() -> None:
                try:
                    with cancelled_by(cancel):
                        window.value = run()
                except BaseException as exc:  # handed to whoever reads the result
                    window.error = exc
                finally:
                    window.ended = time.monotonic()

            thread = threading.Thread(target=body, name=f"window-{name}", daemon=True)
            window = _Window[T](name, thread, cancel, time.monotonic())
            self._runs[key] = window
        thread.start()

    def started(self, key: Hashable) -> bool:
        return key in self._runs

    def interval(self, key: Hashable) -> tuple[float, float | None]:
        """When the window started and ended (``time.monotonic``; None: still running)."""
        window = self._runs[key]
        return window.started, window.ended

    def result(self, key: Hashable, timeout: float = AWAIT_S) -> T:
        """Wait (at most ``timeout``) for the window under ``key`` and return what it
        returned, or raise what it raised. A window still running then is stopped."""
        window = self._runs[key]
        window.thread.join(timeout)
        if window.thread.is_alive():
            self._stop([window])
            raise WindowError(f"window {window.name} did not end within {timeout:g}s")
        if isinstance(window.error, Cancelled):
            raise WindowError(f"window {window.name} was stopped: {window.error}")
        if window.error is not None:
            raise window.error
        return window.value  # type: ignore[return-value]  # T, set when error is None

    def stop(self, keys: Iterable[Hashable] | None = None) -> None:
        """Stop the windows under ``keys`` (default: all) and join their threads."""
        with self._lock:
            chosen = list(self._runs) if keys is None else [k for k in keys if k in self._runs]
            windows = [self._runs[k] for k in chosen]
        self._stop(windows)

    @staticmethod
    def _stop(windows: list[_Window[T]]) -> None:
        for window in windows:
            window.cancel.set()
        stuck = []
        for window in windows:
            window.thread.join(STOP_S)
            if window.thread.is_alive():
                stuck.append(window.name)
        if stuck:
            raise WindowError(f"windows {', '.join(stuck)} did not stop within {STOP_S:g}s")
