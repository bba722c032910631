"""What a conformance run produced: one outcome per check, grouped by run unit.

The pytest plugin fills a :class:`RunResult` as tests finish; reports, JUnit, the
verdict line and the CLI's exit status are all derived from it. A check's PASS / FAIL
has already gone through the known-gap table (:mod:`securemetrics_e2e.knowngaps`), which
turns it into KNOWN-GAP or FIXED where an upstream gap is known.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from securemetrics_e2e.catalog import VariantId, unit_id


class Status(enum.StrEnum):
    PASS = "PASS"  # noqa: S105 - a verdict, not a password
    FAIL = "FAIL"
    SKIP = "SKIP"
    #: failed exactly as a known upstream gap predicts (not this distribution's fault)
    KNOWN_GAP = "KNOWN-GAP"
    #: passed where a known upstream gap predicts a failure: the distribution closes it
    FIXED = "FIXED"


#: statuses a conformant run may hold
ACCEPTED = frozenset({Status.PASS, Status.KNOWN_GAP, Status.FIXED, Status.SKIP})

AS_DOCUMENTED: str = VariantId.AS_DOCUMENTED.value


def overall(statuses: Iterable[Status]) -> Status:
    """The status of a group of checks (a run unit, a phase of one): FAIL if any check
    failed; else KNOWN-GAP if a known gap showed, FIXED if a gap was closed; SKIP if all
    skipped (or none ran); PASS otherwise."""
    seen = set(statuses)
    for status in (Status.FAIL, Status.KNOWN_GAP, Status.FIXED, Status.PASS):
        if status in seen:
            return status
    return Status.SKIP


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one check of one run unit (scenario x mTLS mode x variant)."""

    scenario: str  # e.g. "native-sidecar"
    mode: str  # e.g. "PERMISSIVE"
    check: str  # stable check id, e.g. "listeners-tls-only"
    status: Status
    message: str = ""  # failure or skip reason
    code: str = ""  # finding code for failures, e.g. "SMC003"
    profile: str = "core"
    duration_s: float = 0.0
    diagnostics: str = ""  # path of captured diagnostics, if any
    nodeid: str = ""  # the pytest node id, for JUnit and re-running one check
    variant: str = AS_DOCUMENTED  # the configuration variant, e.g. "exclude-capture"
    gap: str = ""  # the known gap behind a KNOWN-GAP or FIXED status
    #: the known gaps this unit is a fix of: it must pass for a conformant verdict
    fix_of: tuple[str, ...] = ()

    @property
    def unit(self) -> tuple[str, str, str]:
        return (self.scenario, self.mode, self.variant)

    @property
    def unit_id(self) -> str:
        return unit_id(*self.unit)


@dataclass(frozen=True)
class JobContinuity:
    """How one scrape job scraped one workload over a continuity scenario's window."""

    job: str
    scrapes: int
    successes: int
    longest_gap_s: float  # longest time inside the window without a successful scrape
    last_error: str = ""  # Prometheus' lastError of the target at the end of the window
    #: namespace scope only: the fraction of the window covered by a successful scrape of
    #: any of the workload's pods (a pod being replaced may fail while its successor serves)
    covered: float | None = None
    pods: int = 1
    #: failed scrapes left out of the judgement (continuity.judged_points): they ran to
    #: the scrape timeout (a starved scraper) or the suite cut their connection; reported
    unjudged: int = 0

    @property
    def scope(self) -> str:
        """ "pod": one pod's scrapes; "namespace": any pod of the workload (pods replaced)."""
        return "pod" if self.covered is None else "namespace"

    @property
    def fraction(self) -> float:
        if self.covered is not None:
            return self.covered
        return self.successes / self.scrapes if self.scrapes else 0.0

    def summary(self) -> str:
        if self.covered is not None:
            measured = (
                f"{self.covered:.1%} of the window covered ({self.successes}/{self.scrapes} "
                f"scrapes of {self.pods} pod(s) succeeded)"
            )
        else:
            measured = f"{self.fraction:.1%} up ({self.successes}/{self.scrapes} scrapes)"
        unjudged = (
            f", {self.unjudged} failed scrape(s) not judged (timed out, or cut by the suite)"
            if self.unjudged
            else ""
        )
        return f"{self.job}: {measured}, longest gap {self.longest_gap_s:.1f}s{unjudged}"


@dataclass(frozen=True)
class ContinuityRecord:
    """One job's continuity in a run unit, and whether it met the goal."""

    scenario: str
    mode: str
    measured: JobContinuity
    passed: bool  # whole window scraped (or covered), no gap over two intervals
    variant: str = AS_DOCUMENTED

    @property
    def unit_id(self) -> str:
        return unit_id(self.scenario, self.mode, self.variant)


@dataclass
class RunResult:
    """Everything one run checked, in the order it ran."""

    outcomes: list[CheckOutcome] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)
    continuity: list[ContinuityRecord] = field(default_factory=list)
    #: problems that stopped the run from judging the mesh (environment, usage), not findings
    errors: list[str] = field(default_factory=list)
    #: the features the backend that ran declares (``Backend.features``); None: no backend
    backend_features: frozenset[str] | None = None

    def add(self, outcome: CheckOutcome) -> None:
        self.outcomes.append(outcome)

    def of_unit(self, unit: tuple[str, str, str]) -> list[CheckOutcome]:
        return [o for o in self.outcomes if o.unit == unit]

    def unit_status(self, unit: tuple[str, str, str]) -> Status:
        """The :func:`overall` status of the unit's checks."""
        return overall(o.status for o in self.of_unit(unit))

    def units(self) -> list[tuple[str, str, str]]:
        """(scenario, mode, variant) run units in first-seen order."""
        seen: dict[tuple[str, str, str], None] = {}
        for o in self.outcomes:
            seen.setdefault(o.unit, None)
        return list(seen)

    def unfixed(self) -> list[CheckOutcome]:
        """Outcomes of a known gap's fix variant that did not pass where it ran."""
        return [o for o in self.outcomes if o.fix_of and o.status not in (Status.PASS, Status.SKIP)]

    @property
    def conformant(self) -> bool:
        """Every check PASS (or FIXED) or a KNOWN-GAP, every fix variant that ran PASS, and
        at least one check passed: a run that checked nothing proves nothing.

        A run stopped by an environment or usage error is not conformant either.
        """
        statuses = {o.status for o in self.outcomes}
        return (
            not self.errors
            and statuses <= ACCEPTED
            and not self.unfixed()
            and bool(statuses & {Status.PASS, Status.FIXED})
        )

    def counts(self) -> dict[Status, int]:
        counts = dict.fromkeys(Status, 0)
        for o in self.outcomes:
            counts[o.status] += 1
        return counts
