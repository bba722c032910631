"""How the mutation driver judges one mutant: the part that needs no mesh.

A *pair* is one check run on one deployed target (a negative control or a clean
conformance unit). Its *baseline* is what it gave with no mutant active, checked against
the expectations of the suite (EXPECTED of the negative controls, the golden report). A
mutant is KILLED when a pair it reaches gives anything else (another status, other
observed tokens, another message, or an exception: a test would fail), confirmed by
running that pair again without the mutant (a pair that then also deviates is flaky, not
a killer); TIMED OUT when its pairs do not finish within a bound (a mutant that waits
forever is detected); and SURVIVED when every pair it reaches gives the baseline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: what one pair gave: its status, observed tokens and normalised message, ("n/a",) when
#: the check does not apply to the target, ("raised", ExceptionType) when it raised
Outcome = tuple[str, ...]

KILLED, SURVIVED, TIMEOUT, NO_TESTS = "killed", "survived", "timeout", "no tests"
#: mutmut's exit codes for those statuses (mutmut/stats.py status_by_exit_code), so
#: `mutmut results` and `mutmut show` read the driver's verdicts
EXIT_CODE = {KILLED: 1, SURVIVED: 0, TIMEOUT: 36, NO_TESTS: 33}


@dataclass(frozen=True)
class Pair:
    name: str
    run: Callable[[], Outcome]
    baseline: Outcome
    #: the mutated functions (mutmut's mangled names) this pair reaches
    hits: frozenset[str]
    seconds: float


@dataclass(frozen=True)
class Verdict:
    mutant: str
    status: str
    #: the pair (or test command) that killed it, or what timed out
    by: str = ""
    seconds: float = 0.0


def outcome_of(run: Callable[[], Outcome]) -> Outcome:
    """``run()``, an exception turned into the outcome ("raised", its type)."""
    try:
        return run()
    except Exception as exc:  # a mutant that makes a check crash fails its test
        return ("raised", type(exc).__name__)


def judge(
    mutant: str,
    pairs: Sequence[Pair],
    activate: Callable[[str], None],
    bound: float,
) -> Verdict:
    """Run ``pairs`` (fastest first) with ``mutant`` active until one deviates from its
    baseline; ``activate("")`` switches every mutant off. Bounded by ``bound`` seconds:
    a mutant still running then is TIMEOUT (its thread is left behind, a daemon)."""
    started = time.monotonic()
    verdict: list[Verdict] = []

    def work() -> None:
        for pair in sorted(pairs, key=lambda p: p.seconds):
            activate(mutant)
            got = outcome_of(pair.run)
            activate("")
            if got == pair.baseline:
                continue
            if outcome_of(pair.run) != pair.baseline:
                continue  # flaky without the mutant too: proves nothing
            verdict.append(
                Verdict(mutant, KILLED, f"{pair.name}: {got}", time.monotonic() - started)
            )
            return
        verdict.append(Verdict(mutant, SURVIVED, seconds=time.monotonic() - started))

    if not pairs:
        return Verdict(mutant, NO_TESTS)
    worker = threading.Thread(target=work, name=f"mutant {mutant}", daemon=True)
    worker.start()
    worker.join(bound)
    activate("")
    if worker.is_alive() or not verdict:
        return Verdict(mutant, TIMEOUT, f"over {bound:.0f} s", time.monotonic() - started)
    return verdict[0]


def bound_for(pairs: Sequence[Pair], factor: float = 3.0, constant: float = 10.0) -> float:
    """Seconds a mutant may take on ``pairs``: ``factor`` times their baseline (each may
    also run once more unmutated to confirm a kill) plus ``constant``."""
    return factor * sum(p.seconds for p in pairs) + constant


def unaccounted(verdicts: Sequence[Verdict], equivalent: set[str]) -> list[Verdict]:
    """Survivors not written down as equivalent: each one fails the run."""
    return [v for v in verdicts if v.status == SURVIVED and v.mutant not in equivalent]
