"""What a conformance check is: an id, a finding code, a title and a body, and how it fails.

The checks themselves are registered in :mod:`securemetrics_e2e.checks` (one entry each)
and their bodies live in :mod:`securemetrics_e2e.checkbodies`; this module holds only the
shape both share, so neither imports the other's half.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from securemetrics_e2e.backend import Backend, Deployment
from securemetrics_e2e.catalog import Feature, Scenario


class CheckFailed(AssertionError):
    """A conformance check saw the mesh misbehave.

    ``observed`` names what was seen, machine-readable, one ``clause:outcome`` token per
    kind of problem (e.g. ``scrape:closed``, ``target:down``, ``listener:missing``): the
    known-gap table (:mod:`securemetrics_e2e.knowngaps`) compares them with what a gap
    predicts, so a failure that looks different is not taken for the gap.
    """

    def __init__(
        self, check_id: str, code: str, message: str, observed: Collection[str] = ()
    ) -> None:
        super().__init__(f"[{code} {check_id}] {message}")
        self.code = code
        self.message = message
        self.observed = tuple(sorted(set(observed)))


@dataclass
class Findings:
    """What a check body finds wrong across a deployment: each problem, with the
    ``clause:outcome`` token it observed (None: no token to name)."""

    problems: list[str] = field(default_factory=list)
    observed: set[str] = field(default_factory=set)

    def add(self, problem: str, observed: str | None = None) -> None:
        self.problems.append(problem)
        if observed is not None:
            self.observed.add(observed)


@dataclass(frozen=True)
class Check:
    id: str
    code: str
    title: str
    body: Callable[[Check, Backend, Deployment], object]
    applies: Callable[[Scenario], bool] = lambda s: True
    needs: frozenset[Feature] = frozenset()
    #: a continuity check runs on continuity scenarios only, and snapshot checks never do
    continuity: bool = False
    #: what usually causes a failure and what to change, appended to every failure message
    hint: str = ""

    def applies_to(self, scenario: Scenario) -> bool:
        return self.continuity == scenario.continuity and self.applies(scenario)

    def fail(self, message: str, observed: Collection[str] = ()) -> CheckFailed:
        """The failure, its message ending in this check's hint (what to change)."""
        text = f"{message} — hint: {self.hint}" if self.hint else message
        return CheckFailed(self.id, self.code, text, observed)

    @contextlib.contextmanager
    def findings(self) -> Iterator[Findings]:
        """Collect a body's findings; on leaving, fail once with all of them, if any."""
        found = Findings()
        yield found
        if found.problems:
            raise self.fail("; ".join(found.problems), found.observed)

    def run(self, backend: Backend, deployment: Deployment) -> object:
        """Raise :class:`CheckFailed` if ``deployment`` misbehaves; else return what was
        measured (continuity checks), or None."""
        return self.body(self, backend, deployment)
