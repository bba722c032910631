"""Named waiting strategies: poll a readiness signal until a bounded timeout.

Nothing in this project sleeps for a fixed time. Every wait names what it waits for,
so that a timeout says exactly which signal never arrived and what was seen last.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import tenacity

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
    return next(reversed(_WAITING.values()), None)


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

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type((NotYet, OSError)),
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_exponential(multiplier=interval, max=max_interval),
        after=remember,
        reraise=False,
    )
    thread = threading.get_ident()
    outer = _WAITING.pop(thread, None)
    _WAITING[thread] = what
    try:
        return retrying(probe)
    except tenacity.RetryError:
        raise WaitTimeout(what, timeout, last[0]) from None
    finally:
        del _WAITING[thread]
        if outer is not None:
            _WAITING[thread] = outer
