"""Card checks judged as values: only a verified MAC1 says anything about a card (spec §7)."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webpurse.protocol.apdu import CommandApdu
from webpurse.protocol.commands import parse_initialize
from webpurse.settlement.decisions import CardRecord, Flag
from webpurse.settlement.evidence import Verdict, check_apdu, judge_card_check

CARD = CardRecord(
    card_number="00000000000000000001",
    status="active",
    issuer_id=b"WEBPURSE",
    key_version=1,
    start_date=dt.date(2026, 1, 1),
    expiry_date=dt.date(2031, 1, 1),
    max_balance=100_000,
    shadow_balance=1_000,
    online_counter=4,
    offline_counter=3,
)


def test_the_check_is_an_amount_0_initialize_for_load_at_the_nonce_terminal() -> None:
    nonce = bytes.fromhex("0102030405A6")
    init = parse_initialize(CommandApdu.from_bytes(check_apdu(nonce)))
    assert (init.amount, init.terminal_id, init.key_index) == (0, nonce, 1)
    assert check_apdu(nonce).hex().upper().startswith("805000020B01")


@pytest.mark.parametrize(
    ("balance", "counter", "verdict"),
    [
        (1_000, 4, Verdict.CONSISTENT),
        (1_001, 4, Verdict.CLONE),  # no load since: more than it can hold
        (1_000, 3, Verdict.CLONE),  # a counter never goes back
        (900, 4, Verdict.UNSETTLED),  # an uncertain debit happened
        (1_500, 5, Verdict.UNSETTLED),  # an uncertain load happened
    ],
)
def test_a_verified_answer_is_judged_against_the_shadow(
    balance: int, counter: int, verdict: Verdict
) -> None:
    result = judge_card_check(CARD, balance=balance, online_counter=counter, mac1_valid=True)
    assert result.verdict is verdict
    assert (result.flag is Flag.CLONE) == (verdict is Verdict.CLONE)


@given(balance=st.integers(0, 0xFFFFFFFF), counter=st.integers(0, 0xFFFF))
def test_an_answer_that_does_not_verify_never_flags_the_card(balance: int, counter: int) -> None:
    result = judge_card_check(CARD, balance=balance, online_counter=counter, mac1_valid=False)
    assert result.verdict is Verdict.UNVERIFIED and result.flag is None


def test_only_a_clone_verdict_carries_a_flag() -> None:
    blocked = dataclasses.replace(CARD, status="blocked")
    result = judge_card_check(blocked, balance=1_000, online_counter=4, mac1_valid=True)
    assert result.flag is None
