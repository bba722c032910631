"""Every check's failure message ends in a hint: what usually causes it and what to change."""

from __future__ import annotations

import dataclasses

import pytest

from securemetrics_e2e.backend import Credential
from securemetrics_e2e.checkbodies import _CREDENTIAL_TEXT, _PLAINTEXT_TEXT
from securemetrics_e2e.checks import CHECKS, Check
from securemetrics_e2e.probe import PlaintextOutcome


@pytest.mark.parametrize("chk", CHECKS, ids=lambda c: c.id)
def test_each_check_has_a_hint_and_its_failures_end_in_it(chk: Check) -> None:
    assert len(chk.hint) > 40
    failure = chk.fail("httpbin: something went wrong")
    assert failure.message == f"httpbin: something went wrong — hint: {chk.hint}"
    assert failure.code == chk.code


def test_a_failure_reads_code_id_and_message_and_a_check_without_hint_adds_none() -> None:
    # what pytest prints for a failed conformance item (the plugin raises the failure)
    chk = CHECKS[0]
    failure = chk.fail("httpbin: broken", ["b:x", "a:y", "a:y"])
    assert str(failure) == f"[{chk.code} {chk.id}] httpbin: broken — hint: {chk.hint}"
    assert failure.observed == ("a:y", "b:x")
    assert dataclasses.replace(chk, hint="").fail("httpbin: broken").message == "httpbin: broken"


def test_hints_are_distinct() -> None:
    hints = [c.hint for c in CHECKS]
    assert len(set(hints)) == len(hints)


def test_failure_wording_names_things_in_words_not_enum_values() -> None:
    assert set(_CREDENTIAL_TEXT) == set(Credential)
    assert set(_PLAINTEXT_TEXT) == set(PlaintextOutcome)
    assert _CREDENTIAL_TEXT[Credential.NONE] == "no client certificate"
    # "gave served (HTTP 200 ...), expected refused" read as a typo: say what happened
    assert _PLAINTEXT_TEXT[PlaintextOutcome.SERVED].startswith("served")
