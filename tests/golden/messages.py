"""What each negative control's failing checks say: the finding messages a vendor reads.

A message is behaviour (the report prints it, a vendor acts on it), so a change of wording
is a change of behaviour, made on purpose with the golden. :func:`normalise` is the one
home of what a run changes in a message and nothing else: addresses (pod IPs, the
scraper's ephemeral port), the local pods' counter suffix, the metric counts of a served
page, the health of a target seen before its first scrape, Prometheus' own scrape error
text (whose wording, reset or EOF, depends on when the peer closed), what virtualInbound's
access log holds so far for a port it receives, and the numbers of a timed upgrade window. The test
(tests/test_negative_controls.py) and the mutation driver (tests/mutation/driver.py)
compare messages through it. ``python -m tests.golden.messages`` deploys the controls and
rewrites ``control-messages.json`` (a wording change: review the diff).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "control-messages.json"

#: (pattern, replacement), applied in order
_RUN_SPECIFIC = (
    # Prometheus' scrape error up to the next finding ("; ") or the hint (" — hint:")
    (re.compile(r"last error: .*?(?=; \S+: | \u2014 hint: |$)"), "last error: <prometheus>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}:\d+->"), "<ip>:<port>->"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b"), "<ip>"),
    (re.compile(r"\[[0-9a-f:]*:[0-9a-f:]*\]"), "[<ip>]"),
    (re.compile(r"\b(pod [a-z0-9-]+?)-\d+\b"), r"\1-<n>"),
    (re.compile(r"\b\d+ metric families \(\d+ samples\)"), "<n> metric families (<n> samples)"),
    (re.compile(r" \((?:up|down|unknown)\)"), " (<health>)"),
    # what virtualInbound's access log holds for a port it receives: the connections closed
    # and flushed so far (the probe's, Prometheus' keep-alive ones); a port the pod's rules
    # do not redirect is said so at once, and stays (local/virtualinbound.InboundLog)
    (
        re.compile(
            r"\[inbound path: "
            r"(?!no connection to port \d+ went through virtualInbound \(not captured\)\])"
            r"[^\]]*\]"
        ),
        "[inbound path: <access log>]",
    ),
    # a timed window's numbers and which of its limits they break (continuity.py's wording,
    # pinned by tests/test_upgrade_window.py): the frame around them stays
    (re.compile(r"(was not continuous: ).*?(?= \(continuity )"), r"\1<window>"),
    (
        re.compile(r"(\(continuity (?:PASS|FAIL) \S+ over )[\d.]+s: .*?\)(?= \u2014 hint: |$)"),
        r"\1<n>s: <window>)",
    ),
)


def normalise(message: str) -> str:
    """``message`` with what differs from run to run replaced by placeholders."""
    for pattern, replacement in _RUN_SPECIFIC:
        message = pattern.sub(replacement, message)
    return message


def load() -> dict[str, dict[str, str]]:
    """fault -> check id -> normalised message of every check the control fails."""
    golden: dict[str, dict[str, str]] = json.loads(GOLDEN.read_text("utf-8"))
    return golden


def _write() -> None:
    from tests.test_negative_controls import deployed_control_results

    results = deployed_control_results()
    doc = {
        str(fault): {o.check: normalise(o.message) for o in outs if o.status.value == "FAIL"}
        for fault, outs in sorted(results.items(), key=lambda kv: str(kv[0]))
    }
    GOLDEN.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", "utf-8")
    sys.stdout.write(f"{GOLDEN}: {sum(map(len, doc.values()))} messages\n")


if __name__ == "__main__":
    _write()
