"""The pure settlement decisions: every decline, the checks' order, resolution outcomes."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from webpurse.protocol.commands import InitializeForLoadResponse, InitializeForPurchaseResponse
from webpurse.protocol.records import ApplicationType, IssuerData
from webpurse.settlement.decisions import (
    CardRecord,
    DeclineCode,
    LoadInputs,
    Observation,
    OpenTransaction,
    Outcome,
    PurchaseInputs,
    decide_load,
    decide_purchase,
    decide_resolution,
)

NOW = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
TERMINAL = bytes.fromhex("AABBCCDDEEFF")
ISSUER = IssuerData(
    issuer_id=b"WEBPURSE",
    application_type=ApplicationType.EP,
    application_version=1,
    serial=bytes(9) + b"\x01",
    start_date=dt.date(2026, 1, 1),
    expiry_date=dt.date(2031, 1, 1),
)
CARD = CardRecord(
    card_number=ISSUER.card_number,
    status="active",
    issuer_id=b"WEBPURSE",
    key_version=1,
    start_date=dt.date(2026, 1, 1),
    expiry_date=dt.date(2031, 1, 1),
    max_balance=100_000,
    shadow_balance=1_000,
    online_counter=1,
    offline_counter=3,
)
INIT = InitializeForPurchaseResponse(1_000, 3, 0, 1, 0, b"\x01\x02\x03\x04")
PURCHASE = PurchaseInputs(ISSUER, INIT, TERMINAL, TERMINAL, 400)


def _open(kind: str, status: str, counter: int = 3) -> OpenTransaction:
    return OpenTransaction("pay_1", kind, status, counter, 100, 1_000, b"\x09" * 4, True)


def test_an_honest_card_is_approved() -> None:
    assert decide_purchase(CARD, PURCHASE, NOW).approved


@pytest.mark.parametrize(
    ("card", "inputs", "code", "observation"),
    [
        (None, PURCHASE, DeclineCode.UNKNOWN_CARD, None),
        (
            dataclasses.replace(CARD, issuer_id=b"OTHERONE"),
            PURCHASE,
            DeclineCode.UNKNOWN_CARD,
            None,
        ),
        (dataclasses.replace(CARD, status="blocked"), PURCHASE, DeclineCode.CARD_BLOCKED, None),
        (dataclasses.replace(CARD, status="lost"), PURCHASE, DeclineCode.CARD_LOST, None),
        (dataclasses.replace(CARD, status="expired"), PURCHASE, DeclineCode.CARD_EXPIRED, None),
        (
            dataclasses.replace(CARD, expiry_date=dt.date(2026, 11, 26)),
            PURCHASE,
            DeclineCode.CARD_EXPIRED,
            None,
        ),
        (
            dataclasses.replace(CARD, start_date=dt.date(2027, 1, 1)),
            PURCHASE,
            DeclineCode.INVALID_STATE,
            None,
        ),
        (
            CARD,
            dataclasses.replace(PURCHASE, terminal_id=bytes(6)),
            DeclineCode.TERMINAL_MISMATCH,
            None,
        ),
        (
            CARD,
            dataclasses.replace(PURCHASE, initialize_amount=401),
            DeclineCode.AMOUNT_MISMATCH,
            None,
        ),
        (
            CARD,
            dataclasses.replace(PURCHASE, initialize=dataclasses.replace(INIT, key_version=2)),
            DeclineCode.INVALID_STATE,
            None,
        ),
        (
            CARD,
            dataclasses.replace(PURCHASE, initialize=dataclasses.replace(INIT, offline_counter=2)),
            DeclineCode.COUNTER_MISMATCH,
            Observation.COUNTER_BEHIND,
        ),
        (
            CARD,
            dataclasses.replace(PURCHASE, initialize=dataclasses.replace(INIT, offline_counter=4)),
            DeclineCode.COUNTER_MISMATCH,
            Observation.COUNTER_AHEAD,
        ),
        (
            CARD,
            dataclasses.replace(PURCHASE, initialize=dataclasses.replace(INIT, balance=1_001)),
            DeclineCode.BALANCE_MISMATCH,
            Observation.BALANCE_ABOVE,
        ),
        (
            CARD,
            dataclasses.replace(PURCHASE, initialize=dataclasses.replace(INIT, balance=999)),
            DeclineCode.BALANCE_MISMATCH,
            Observation.BALANCE_BELOW,
        ),
        (CARD, dataclasses.replace(PURCHASE, amount=1_001), DeclineCode.INSUFFICIENT_FUNDS, None),
        (
            dataclasses.replace(CARD, open_transaction=_open("payment", "authorised")),
            PURCHASE,
            DeclineCode.RECOVERY_REQUIRED,
            None,
        ),
        (
            dataclasses.replace(CARD, open_transaction=_open("load", "uncertain", 1)),
            PURCHASE,
            DeclineCode.RECOVERY_REQUIRED,
            None,
        ),
    ],
)
def test_purchase_declines(
    card: CardRecord | None,
    inputs: PurchaseInputs,
    code: DeclineCode,
    observation: Observation | None,
) -> None:
    decision = decide_purchase(card, inputs, NOW)
    assert not decision.approved
    assert (decision.decline_code, decision.observation) == (code, observation)
    # The detail says what failed, never settlement's shadow numbers (nor their direction).
    assert str(CARD.offline_counter) not in decision.detail
    assert str(CARD.shadow_balance) not in decision.detail
    assert "behind" not in decision.detail and "above" not in decision.detail


def test_an_unchanged_counter_only_links_an_uncertain_purchase_never_releases_it() -> None:
    # INITIALIZE FOR PURCHASE carries no MAC: "the counter did not move" may be fabricated,
    # so the new payment proceeds linked to the uncertain one, which stays uncertain.
    card = dataclasses.replace(CARD, open_transaction=_open("payment", "uncertain"), available=900)
    decision = decide_purchase(card, PURCHASE, NOW)
    assert decision.approved and decision.supersedes == card.open_transaction
    assert not hasattr(decision, "release")


def test_a_linked_purchase_the_held_value_cannot_cover_must_recover_first() -> None:
    card = dataclasses.replace(CARD, open_transaction=_open("payment", "uncertain"), available=300)
    decision = decide_purchase(card, PURCHASE, NOW)  # 400 > 1000 − 100 held − 600 more
    assert decision.decline_code is DeclineCode.RECOVERY_REQUIRED
    assert decision.recover is not None and decision.recover.payment_id == "pay_1"


def test_another_merchants_open_payment_names_the_callers_own_one_it_superseded() -> None:
    theirs = dataclasses.replace(
        _open("payment", "authorised"), id="pay_2", same_merchant=False, own_id="pay_1"
    )
    decision = decide_purchase(dataclasses.replace(CARD, open_transaction=theirs), PURCHASE, NOW)
    assert decision.recover is not None
    assert decision.recover.to_json() == {
        "transaction_type": "06",
        "counter": 3,
        "payment_id": "pay_1",
    }
    stranger = dataclasses.replace(theirs, own_id=None)
    decision = decide_purchase(dataclasses.replace(CARD, open_transaction=stranger), PURCHASE, NOW)
    assert decision.recover is not None and decision.recover.payment_id is None


def test_an_unchanged_online_counter_only_links_an_uncertain_load() -> None:
    card = dataclasses.replace(CARD, open_transaction=_open("load", "uncertain", 1))
    decision = decide_load(card, LOAD, NOW)
    assert decision.approved and decision.supersedes == card.open_transaction


def test_a_replayed_initialize_does_not_release_anything() -> None:
    open_txn = dataclasses.replace(_open("payment", "uncertain"), random=INIT.random)
    card = dataclasses.replace(CARD, open_transaction=open_txn)
    decision = decide_purchase(card, PURCHASE, NOW)
    assert decision.decline_code is DeclineCode.RECOVERY_REQUIRED
    assert decision.recover is not None and decision.recover.to_json() == {
        "transaction_type": "06",
        "counter": 3,
        "payment_id": "pay_1",
    }


LOAD_INIT = InitializeForLoadResponse(1_000, 1, 1, 0, b"\x05" * 4, b"\x00" * 4)
LOAD = LoadInputs(ISSUER, LOAD_INIT, TERMINAL, TERMINAL, 500, mac1_valid=True)


def test_load_decisions() -> None:
    assert decide_load(CARD, LOAD, NOW).approved
    assert decide_load(CARD, dataclasses.replace(LOAD, mac1_valid=False), NOW).decline_code is (
        DeclineCode.MAC_INVALID
    )
    full = dataclasses.replace(CARD, max_balance=1_400)
    assert decide_load(full, LOAD, NOW).decline_code is DeclineCode.BALANCE_LIMIT_EXCEEDED
    bound = dataclasses.replace(LOAD, bound_card_number="FF" * 10)
    assert decide_load(CARD, bound, NOW).decline_code is DeclineCode.INVALID_STATE


@pytest.mark.parametrize(
    ("counter", "balance", "random", "given", "valid", "outcome"),
    [
        (3, 1_000, b"\x07" * 4, False, False, Outcome.CANCELED),
        (3, 1_000, b"\x09" * 4, False, False, Outcome.MISMATCH),  # the old answer replayed
        (3, 900, b"\x07" * 4, False, False, Outcome.MISMATCH),
        (4, 900, b"\x07" * 4, False, False, Outcome.PROOF_REQUIRED),
        (4, 900, b"\x07" * 4, True, False, Outcome.PROOF_INVALID),
        (4, 900, b"\x07" * 4, True, True, Outcome.SUCCEEDED),
        (4, 1_000, b"\x07" * 4, True, True, Outcome.MISMATCH),
        (5, 800, b"\x07" * 4, True, True, Outcome.MISMATCH),
    ],
)
def test_resolution(
    counter: int, balance: int, random: bytes, given: bool, valid: bool, outcome: Outcome
) -> None:
    resolution = decide_resolution(
        _open("payment", "uncertain"),
        counter=counter,
        balance=balance,
        random=random,
        proof_given=given,
        proof_valid=valid,
    )
    assert resolution.outcome is outcome


@pytest.mark.parametrize(
    ("counter", "balance", "random", "given", "valid", "outcome"),
    [
        # "The counter did not move" is never proof for a load: the answer may be replayed.
        (3, 1_000, b"\x07" * 4, False, False, Outcome.UNPROVEN),
        (3, 1_000, b"\x09" * 4, False, False, Outcome.MISMATCH),  # the old answer replayed
        (3, 1_100, b"\x07" * 4, False, False, Outcome.MISMATCH),
        (4, 1_100, b"\x07" * 4, False, False, Outcome.PROOF_REQUIRED),
        (4, 1_100, b"\x07" * 4, True, False, Outcome.PROOF_INVALID),
        (4, 1_100, b"\x07" * 4, True, True, Outcome.SUCCEEDED),
    ],
)
def test_load_resolution(
    counter: int, balance: int, random: bytes, given: bool, valid: bool, outcome: Outcome
) -> None:
    resolution = decide_resolution(
        _open("load", "uncertain"),
        counter=counter,
        balance=balance,
        random=random,
        proof_given=given,
        proof_valid=valid,
    )
    assert resolution.outcome is outcome
