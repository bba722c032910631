"""SIGTERM and SIGHUP stop a run as Ctrl-C does: through teardown, leaving nothing behind.

``timeout``, CI cancellation, pytest-timeout and a closed terminal send SIGTERM or SIGHUP;
Python's default for both is to die on the spot, skipping every ``finally`` and so
leaving the mesh running. Here each of SIGINT, SIGTERM and SIGHUP raises
KeyboardInterrupt in the main thread, which pytest turns into an orderly session end
(fixtures torn down, the backend closed). A second signal while that cleanup runs is
noted and ignored: cleanup is bounded (each process gets a few seconds before SIGKILL),
and cutting it short is what leaves resources behind.

A signal is handled between two bytecodes of the main thread, wherever it is, and when
that is inside a finalizer (``__del__``, a weakref callback: a socket the garbage
collector closes) Python prints the KeyboardInterrupt as "ignored" and goes on: the run
would finish as if nothing had happened (seen under load: a SIGTERM during the probes of a
one-unit run, then the whole run to its verdict). So the run also polls: the
:func:`checkpoint` in every wait and before every test raises the stop again while no
KeyboardInterrupt is on its way up and pytest has not :func:`taken <take>` it yet.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_received: list[signal.Signals] = []
#: set once the session has taken the stop (pytest's keyboard-interrupt hook): from then
#: on the run is cleaning up, and a checkpoint must not cut that short
_taken = threading.Event()


def received() -> signal.Signals | None:
    """The first stop signal since :func:`install`, or None."""
    return _received[0] if _received else None


def exit_status(signum: signal.Signals) -> int:
    """The shell's status for a process ended by ``signum`` (128 + n), kept after cleanup."""
    return 128 + int(signum)


def take() -> None:
    """The session has taken the stop (it is tearing down): checkpoints stay quiet."""
    _taken.set()


def checkpoint() -> None:
    """Raise the stop again if a signal came, nothing took it and none is on its way up
    (a finalizer swallowed it). Only the main thread raises: a background window learns
    of the end of its run from the run (waiting.cancelled_by)."""
    if not _received or _taken.is_set():
        return
    if threading.current_thread() is not threading.main_thread():
        return
    if isinstance(sys.exc_info()[1], KeyboardInterrupt):
        return  # an except / finally on the stop's way up: cleanup, let it run
    raise KeyboardInterrupt(f"stopped by {_received[0].name}")


def _handler(signum: int, _frame: FrameType | None) -> None:
    sig = signal.Signals(signum)
    if _received:
        sys.stderr.write(f"securemetrics-e2e: {sig.name} ignored: still cleaning up\n")
        return
    _received.append(sig)
    raise KeyboardInterrupt(f"stopped by {sig.name}")


def install() -> Callable[[], None]:
    """Route the stop signals to an orderly stop; returns a function restoring the old ones.

    Outside the main thread (where Python cannot take signals) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    _received.clear()
    _taken.clear()
    previous = {sig: signal.signal(sig, _handler) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
