"""What a conformance run produced: one outcome per check, grouped by scenario.

The pytest plugin fills a :class:`RunResult` as tests finish; reports, JUnit, the
verdict line and the CLI's exit status are all derived from it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.StrEnum):
    PASS = "PASS"  # noqa: S105 - a verdict, not a password
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckOutcome:
    """The result of one check of one scenario variant."""

    scenario: str  # e.g. "native-sidecar"
    variant: str  # e.g. "PERMISSIVE"
    check: str  # stable check id, e.g. "listeners-tls-only"
    status: Status
    message: str = ""  # failure or skip reason
    code: str = ""  # finding code for failures, e.g. "SMC003"
    profile: str = "core"
    duration_s: float = 0.0
    diagnostics: str = ""  # path of captured diagnostics, if any
    nodeid: str = ""  # the pytest node id, for JUnit and re-running one check


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
        return f"{self.job}: {measured}, longest gap {self.longest_gap_s:.1f}s"


@dataclass(frozen=True)
class ContinuityRecord:
    """One job's continuity in a scenario variant, and whether it met the goal."""

    scenario: str
    variant: str
    measured: JobContinuity
    passed: bool  # whole window scraped (or covered), no gap over two intervals


@dataclass
class RunResult:
    """Everything one run checked, in the order it ran."""

    outcomes: list[CheckOutcome] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)
    continuity: list[ContinuityRecord] = field(default_factory=list)
    #: problems that stopped the run from judging the mesh (environment, usage), not findings
    errors: list[str] = field(default_factory=list)

    def add(self, outcome: CheckOutcome) -> None:
        self.outcomes.append(outcome)

    def scenario_status(self, scenario: str, variant: str) -> Status:
        """FAIL if any check failed, SKIP if all skipped, PASS otherwise."""
        statuses = {
            o.status for o in self.outcomes if o.scenario == scenario and o.variant == variant
        }
        if Status.FAIL in statuses:
            return Status.FAIL
        if statuses <= {Status.SKIP}:
            return Status.SKIP
        return Status.PASS

    def scenarios(self) -> list[tuple[str, str]]:
        """(scenario, variant) pairs in first-seen order."""
        seen: dict[tuple[str, str], None] = {}
        for o in self.outcomes:
            seen.setdefault((o.scenario, o.variant), None)
        return list(seen)

    @property
    def conformant(self) -> bool:
        """No check failed and at least one passed: a run that checked nothing proves nothing.

        A run stopped by an environment or usage error is not conformant either.
        """
        statuses = {o.status for o in self.outcomes}
        return not self.errors and Status.FAIL not in statuses and Status.PASS in statuses

    def counts(self) -> dict[Status, int]:
        counts = dict.fromkeys(Status, 0)
        for o in self.outcomes:
            counts[o.status] += 1
        return counts
