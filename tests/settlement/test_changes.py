"""The pure change builders (settlement/changes.py) the single path and the batch share."""

from __future__ import annotations

import datetime as dt

import pytest

from webpurse.settlement import changes, ledger
from webpurse.settlement.transactions import IllegalTransition, Kind, Status

NOW = dt.datetime(2026, 11, 27, 12, 0, 0, tzinfo=dt.UTC)


def _authorised(kind: Kind, status: str) -> changes.Changes:
    return changes.authorised(
        kind,
        status,
        card_id="card_1",
        card_number="0123456789ABCDEF",
        key_version=1,
        balance=1_000,
        counter=7,
        random=bytes.fromhex("0a0b0c0d"),
        date=dt.date(2026, 11, 27),
        time=dt.time(12, 0, 5),
        now=NOW,
        supersedes=None,
    )


@pytest.mark.parametrize("kind", [Kind.PAYMENT, Kind.LOAD])
def test_authorised_binds_the_card_answer(kind: Kind) -> None:
    assert _authorised(kind, "requires_card") == {
        "status": Status.AUTHORISED,
        "card_id": "card_1",
        "card_number": "0123456789ABCDEF",
        "balance_before": 1_000,
        "counter": 7,
        "supersedes": None,
        "key_version": 1,
        "card_random": "0A0B0C0D",
        "txn_date": "20261127",
        "txn_time": "120005",
        "authorised_at": NOW,
        "updated_at": NOW,
    }


@pytest.mark.parametrize("status", ["authorised", "succeeded", "requires_funding", "declined"])
def test_authorised_goes_through_the_table(status: str) -> None:
    with pytest.raises(IllegalTransition):
        _authorised(Kind.PAYMENT, status)


def test_succeeded_carries_the_proof() -> None:
    mac2, tac = bytes.fromhex("01020304"), bytes.fromhex("0a0b0c0d")
    assert changes.succeeded(Kind.PAYMENT, "uncertain", mac2=mac2, tac=tac, now=NOW) == {
        "status": Status.SUCCEEDED,
        "mac2": "01020304",
        "tac": "0A0B0C0D",
        "succeeded_at": NOW,  # a payment keeps the capture's time (views.payment_as_of)
        "updated_at": NOW,
    }
    assert changes.succeeded(Kind.LOAD, "authorised", tac=tac, now=NOW) == {
        "status": Status.SUCCEEDED,
        "tac": "0A0B0C0D",
        "updated_at": NOW,
    }
    with pytest.raises(IllegalTransition):
        changes.succeeded(Kind.LOAD, "canceled", tac=tac, now=NOW)


def test_the_shadow_purse_moves_by_the_kind() -> None:
    debit = changes.card_settled(Kind.PAYMENT, balance_before=1_000, amount=300, counter=7, now=NOW)
    credit = changes.card_settled(Kind.LOAD, balance_before=1_000, amount=300, counter=7, now=NOW)
    assert debit == {"shadow_balance": 700, "offline_counter": 8, "updated_at": NOW}
    assert credit == {"shadow_balance": 1_300, "online_counter": 8, "updated_at": NOW}


def test_the_card_history_entry() -> None:
    assert changes.card_event(Kind.PAYMENT, "pay_1", 300, 7, "0A0B0C0D") == (
        "purchase",
        {"payment": "pay_1", "amount": 300, "counter": 7, "tac": "0A0B0C0D"},
    )
    assert changes.card_event(Kind.LOAD, "load_1", 300, 7, "0A0B0C0D")[0] == "load"


def test_a_hold_needs_the_cards_available_value() -> None:
    assert changes.purchase_hold_refusal("card_1", 300, 300) is None
    assert changes.purchase_hold_refusal("card_1", 299, 300) == (
        "card:card_1 holds 299 fen, cannot transfer 300 fen"
    )
    assert changes.purchase_hold_refusal("card_1", 900, 300, account_currency="USD") == (
        "both accounts must be in the transfer's currency"
    )


def test_the_transfers() -> None:
    card, merchant = ledger.card_account("card_1"), ledger.merchant_account("mer_1")
    # One transfer per purchase, at capture: authorise and release post nothing.
    capture = changes.purchase_capture("pay_1", "card_1", "mer_1", 300)
    assert (capture.id, capture.debit_account, capture.credit_account, capture.kind) == (
        "pay_1:capture",
        card,
        merchant,
        "purchase_capture",
    )
    assert (capture.amount, capture.reference) == (300, "pay_1")
    credit = changes.load_credit("load_1", "card_1", 300)
    assert (credit.id, credit.debit_account, credit.credit_account, credit.amount) == (
        "load_1:credit",
        ledger.HELD_LOADS,
        card,
        300,
    )
