"""Named timeouts, in one place, overridable from the command line.

As Gateway API's conformance ``TimeoutConfig`` does, every wait a check makes has a name,
a default that each backend may set to its own scale (a cluster's Prometheus scrapes every
15 s, the local one every second), and an override: ``--timeout name=seconds`` on
``securemetrics-e2e run`` and on the pytest path. An override is applied to the backend
before anything is deployed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from securemetrics_e2e.errors import UsageError

if TYPE_CHECKING:
    from securemetrics_e2e.backend import Backend


@dataclass(frozen=True)
class NamedTimeout:
    name: str
    #: what the timeout bounds
    bounds: str
    #: the backend attribute holding it (each backend sets its own default)
    attribute: str


TIMEOUTS: tuple[NamedTimeout, ...] = (
    NamedTimeout(
        "target-up",
        "Prometheus discovering a workload and scraping it UP (SMC009, SMC010, SMC012)",
        "target_timeout",
    ),
)
_BY_NAME = {t.name: t for t in TIMEOUTS}


def parse(values: Iterable[str], option: str = "--timeout") -> dict[str, float]:
    """``name=seconds`` pairs (repeatable, or comma-separated); UsageError naming a bad one."""
    parsed: dict[str, float] = {}
    known = ", ".join(t.name for t in TIMEOUTS)
    for value in values:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            name, sep, seconds = pair.partition("=")
            if not sep or name not in _BY_NAME:
                raise UsageError(
                    f"{option} {pair!r}: expected name=seconds with a name among: {known}"
                )
            try:
                parsed[name] = float(seconds)
            except ValueError:
                parsed[name] = -1.0
            if not parsed[name] > 0:
                raise UsageError(f"{option} {pair!r}: seconds must be a number above 0")
    return parsed


def apply(backend: Backend, overrides: dict[str, float]) -> None:
    """Set the overridden timeouts on ``backend``."""
    for name, seconds in overrides.items():
        setattr(backend, _BY_NAME[name].attribute, seconds)


def effective(backend: Backend) -> dict[str, float]:
    """Every named timeout as ``backend`` will use it (for the report)."""
    return {t.name: float(getattr(backend, t.attribute)) for t in TIMEOUTS}
