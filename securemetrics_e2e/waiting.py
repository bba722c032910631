"""Named waiting strategies: poll a readiness signal until a bounded timeout.

Nothing in this project sleeps for a fixed time. Every wait names what it waits for,
so that a timeout says exactly which signal never arrived and what was seen last.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import tenacity

from securemetrics_e2e import signals
from securemetrics_e2e.errors import SecureMetricsError

T = TypeVar("T")


class WaitTimeout(SecureMetricsError):
    """A readiness signal did not arrive in time."""

    def __init__(self, what: str, timeout: float, last: str) -> None:
        super().__init__(f"timed out after {timeout:g}s waiting for {what}; last seen: {last}")
        self.what = what
        self.timeout = timeout
        self.last = last


#: what each thread waits for right now (progress heartbeats say it on the terminal)
_WAITING: dict[int, str] = {}


def waiting_on() -> str | None:
    """What the most recently started, still running wait is waiting for, if any."""
    waits = list(_WAITING.values())  # one step under the GIL: other threads add and remove
    return waits[-1] if waits else None


class Cancelled(BaseException):
    """A wait ended because its thread was told to stop (a background window whose run
    is ending). A BaseException, as KeyboardInterrupt is: handlers of failures
    (``except Exception``) let it through, ``finally`` blocks still clean up."""


#: per thread: the event that cancels its waits (set by :func:`cancelled_by`)
_CANCEL = threading.local()


@contextlib.contextmanager
def cancelled_by(event: threading.Event) -> Iterator[None]:
    """Within this block, waits in this thread raise :class:`Cancelled` once ``event``
    is set, waking at once from the pause between two polls."""
    outer = getattr(_CANCEL, "event", None)
    _CANCEL.event = event
    try:
        yield
    finally:
        _CANCEL.event = outer


class NotYet(Exception):
    """Raised by a probe function to say 'not ready yet', with what it saw."""


def wait_for(
    what: str,
    probe: Callable[[], T],
    *,
    timeout: float,
    interval: float = 0.05,
    max_interval: float = 0.5,
) -> T:
    """Call ``probe`` until it returns without raising, for at most ``timeout`` seconds.

    ``probe`` signals "not yet" by raising :class:`NotYet` (or any ``OSError``, which is
    what a connection to a port that is not listening yet raises). Its message becomes
    the "last seen" part of the :class:`WaitTimeout`.
    """
    last = ["nothing yet"]

    def remember(state: tenacity.RetryCallState) -> None:
        if state.outcome is not None and state.outcome.failed:
            exc = state.outcome.exception()
            last[0] = f"{type(exc).__name__}: {exc}"

    cancel: threading.Event | None = getattr(_CANCEL, "event", None)
    stop: tenacity.stop.stop_base = tenacity.stop_after_delay(timeout)
    pause: dict[str, Callable[[float], object]] = {}
    if cancel is not None:
        if cancel.is_set():
            raise Cancelled(f"stopped before waiting for {what}")
        stop = stop | tenacity.stop_when_event_set(cancel)
        pause["sleep"] = cancel.wait  # a stop wakes the pause, not only the next poll
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type((NotYet, OSError)),
        stop=stop,
        wait=tenacity.wait_exponential(multiplier=interval, max=max_interval),
        after=remember,
        reraise=False,
        **pause,  # type: ignore[arg-type]
    )
    thread = threading.get_ident()
    outer = _WAITING.pop(thread, None)
    _WAITING[thread] = what

    def poll() -> T:
        signals.checkpoint()  # a stop signal a finalizer swallowed ends the wait too
        return probe()

    try:
        return retrying(poll)
    except tenacity.RetryError:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"stopped while waiting for {what}; last seen: {last[0]}") from None
        raise WaitTimeout(what, timeout, last[0]) from None
    finally:
        del _WAITING[thread]
        if outer is not None:
            _WAITING[thread] = outer
