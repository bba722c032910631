"""Named timeouts, in one place, overridable from the command line.

As Gateway API's conformance ``TimeoutConfig`` does, every wait a user may want to stretch
(a slow cluster) or shorten (a fast loop) has a name, what it bounds, and a default. Each
backend starts from its own scale (a cluster's Prometheus scrapes every 15 s, the local one
every second; :data:`LOCAL` and :data:`CLUSTER`), and ``--timeout name=seconds`` on
``securemetrics-e2e run`` and on the pytest path overrides it before anything is deployed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from securemetrics_e2e.errors import UsageError


def _named(default: float, bounds: str) -> float:
    return field(default=default, metadata={"bounds": bounds})


@dataclass(frozen=True)
class Timeouts:
    """Every named wait, in seconds; a field ``target_up`` is the name ``target-up``."""

    target_up: float = _named(
        60.0, "Prometheus discovering a workload and scraping it UP (SMC009, SMC010, SMC012)"
    )
    rollout: float = _named(
        300.0,
        "a scenario's pods ready before its checks: each proxy answering /ready (local), "
        "each Deployment rolled out (cluster; also --rollout-timeout)",
    )
    scraper_ready: float = _named(
        60.0,
        "the scraper's Prometheus answering /-/ready once started (local; a cluster's "
        "scraper is a Deployment, bounded by rollout)",
    )
    scrape_request: float = _named(
        5.0, "one mTLS scrape by the probe (slower is the outcome 'timeout')"
    )
    plaintext_request: float = _named(
        3.0, "one plaintext attempt by the probe (slower is the outcome 'timeout')"
    )

    def effective(self) -> dict[str, float]:
        """Every named timeout and its value (for ``list`` and the report)."""
        return {_name(f): float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def with_overrides(self, overrides: dict[str, float]) -> Timeouts:
        return dataclasses.replace(self, **{_BY_NAME[n].name: s for n, s in overrides.items()})


def _name(f: dataclasses.Field[float]) -> str:
    return f.name.replace("_", "-")


@dataclass(frozen=True)
class NamedTimeout:
    name: str
    #: what the timeout bounds
    bounds: str


_BY_NAME = {_name(f): f for f in dataclasses.fields(Timeouts)}
TIMEOUTS: tuple[NamedTimeout, ...] = tuple(
    NamedTimeout(name, str(f.metadata["bounds"])) for name, f in _BY_NAME.items()
)
#: the local backend's scale: Prometheus scrapes every second, processes start in a second
LOCAL = Timeouts(
    target_up=15.0, rollout=15.0, scraper_ready=20.0, scrape_request=3.0, plaintext_request=2.0
)
#: a cluster's scale: Prometheus discovers, then scrapes every 15 s; curl in the scraper pod
CLUSTER = Timeouts(target_up=120.0)


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


class HasTimeouts(Protocol):
    """A backend, as far as its timeouts go (this module sits below the backend seam)."""

    timeouts: Timeouts


def apply(backend: HasTimeouts, overrides: dict[str, float]) -> None:
    """Set the overridden timeouts on ``backend``."""
    backend.timeouts = backend.timeouts.with_overrides(overrides)


def effective(backend: HasTimeouts) -> dict[str, float]:
    """Every named timeout as ``backend`` will use it (for the report)."""
    return backend.timeouts.effective()
