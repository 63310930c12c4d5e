"""Pure change builders: what each lifecycle step writes, as values.

Each function returns the column values of a step (or the ledger transfer it posts) and
touches no database: the single path (:mod:`.payments`, :mod:`.loads`) sets them on its ORM
rows, the batch fast path (:mod:`.batch`) writes them set-based, so the two cannot drift.
A status change in them goes through the lifecycle table
(:func:`~webpurse.settlement.transactions.transition`).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import deque
from collections.abc import Sequence
from typing import Any

from webpurse.settlement import ledger
from webpurse.settlement.ledger import TransferSpec
from webpurse.settlement.transactions import Kind, Status, transition

Changes = dict[str, Any]


def apply(row: Any, changes: Changes) -> None:
    """Set ``changes`` on an ORM row."""
    for column, value in changes.items():
        setattr(row, column, value)


def _bcd_date(date: dt.date) -> str:
    """A date's digits as the row keeps them (a plain date's kept: a batch shares one)."""
    return _plain_digits(date, "%Y%m%d") if type(date) is dt.date else date.strftime("%Y%m%d")


def _bcd_time(time: dt.time) -> str:
    """A time's digits as the row keeps them (a naive time's kept: a batch shares one;
    equal aware times in other zones show other digits, so those are not)."""
    return _plain_digits(time, "%H%M%S") if time.tzinfo is None else time.strftime("%H%M%S")


@functools.lru_cache(maxsize=256)
def _plain_digits(value: dt.date | dt.time, form: str) -> str:
    return value.strftime(form)


def authorised(
    kind: Kind,
    status: str,
    *,
    card_id: str,
    card_number: str,
    key_version: int,
    balance: int,
    counter: int,
    random: bytes,
    date: dt.date,
    time: dt.time,
    now: dt.datetime,
    supersedes: str | None,
) -> Changes:
    """The card's INITIALIZE values and the transaction's date and time, bound to it."""
    return {
        "status": transition(kind, status, Status.AUTHORISED),
        "card_id": card_id,
        "card_number": card_number,
        "balance_before": balance,
        "counter": counter,
        "supersedes": supersedes,
        "key_version": key_version,
        "card_random": random.hex().upper(),
        "txn_date": _bcd_date(date),
        "txn_time": _bcd_time(time),
        "authorised_at": now,
        "updated_at": now,
    }


def succeeded(
    kind: Kind, status: str, *, tac: bytes, now: dt.datetime, mac2: bytes | None = None
) -> Changes:
    """The card proved the debit (MAC2 and TAC) or the credit (TAC)."""
    changes: Changes = {"status": transition(kind, status, Status.SUCCEEDED)}
    if mac2 is not None:
        changes["mac2"] = mac2.hex().upper()
    changes["tac"] = tac.hex().upper()
    if kind is Kind.PAYMENT:
        changes["succeeded_at"] = now  # the capture's time (views.payment_as_of)
    changes["updated_at"] = now
    return changes


def card_settled(
    kind: Kind, *, balance_before: int, amount: int, counter: int, now: dt.datetime
) -> Changes:
    """The shadow purse after the card's proven debit or credit: balance and counter on."""
    if kind is Kind.PAYMENT:
        return {
            "shadow_balance": balance_before - amount,
            "offline_counter": counter + 1,
            "updated_at": now,
        }
    return {
        "shadow_balance": balance_before + amount,
        "online_counter": counter + 1,
        "updated_at": now,
    }


def card_event(
    kind: Kind, object_id: str, amount: int, counter: int, tac: str
) -> tuple[str, dict[str, Any]]:
    """The card's history entry for a proven transaction: its kind and detail."""
    event = "purchase" if kind is Kind.PAYMENT else "load"
    return event, {kind.value: object_id, "amount": amount, "counter": counter, "tac": tac}


def _caused_by(detail: dict[str, Any], payment_id: str) -> bool:
    """Whether a recorded event followed from ``payment_id``'s capture in its own request
    (the release of what its counter disproved, the heal that settled it)."""
    reason = detail.get("reason")
    return detail.get("settled") == payment_id or (
        isinstance(reason, str) and reason.endswith(f" used by {payment_id}")
    )


def card_history(
    recorded: Sequence[Any], purchases: Sequence[Any]
) -> list[tuple[str, dict[str, Any], dt.datetime]]:
    """A card's history, oldest first: (kind, detail, time) of each entry.

    ``recorded``: its card events (``kind``, ``detail``, ``created_at``) in the order they
    were recorded; ``purchases``: its captured payments (``id``, ``amount``, ``counter``,
    ``tac``, ``succeeded_at``) by counter, each shown as the ``purchase`` event it was
    recorded as before migration 0013b. A purchase goes before the first recorded event
    after it, or at the same instant one its capture caused (recorded after it in the same
    request); at the same instant otherwise, after the recorded ones.
    """
    pending = deque(purchases)
    history: list[tuple[str, dict[str, Any], dt.datetime]] = []

    def purchase() -> None:
        p = pending.popleft()
        history.append(
            (*card_event(Kind.PAYMENT, p.id, p.amount, p.counter, p.tac), p.succeeded_at)
        )

    for event in recorded:
        while pending and (
            pending[0].succeeded_at < event.created_at
            or (
                pending[0].succeeded_at == event.created_at
                and _caused_by(event.detail, pending[0].id)
            )
        ):
            purchase()
        history.append((event.kind, event.detail, event.created_at))
    while pending:
        purchase()
    return history


def _transfer(
    object_id: str, step: str, debit: str, credit: str, amount: int, kind: str
) -> TransferSpec:
    return TransferSpec(f"{object_id}:{step}", debit, credit, amount, kind, object_id)


def purchase_hold_refusal(
    card_id: str,
    available: int,
    amount: int,
    *,
    currency: str = "CNY",
    account_currency: str = "CNY",
) -> str | None:
    """Authorise posts nothing: the hold is the payment's status (authorised or uncertain).

    The card's available value — its account's balance less its open holds
    (:func:`ledger.available`) — must still cover the amount, as the hold transfer of old
    required (same refusal text, so the same 409 ``ledger_refused``). None: approved.
    """
    if account_currency != currency:
        return "both accounts must be in the transfer's currency"
    if available < amount:
        return f"{ledger.card_account(card_id)} holds {available} fen, cannot transfer {amount} fen"
    return None


def purchase_capture(payment_id: str, card_id: str, merchant_id: str, amount: int) -> TransferSpec:
    """Capture: the purchase's one transfer, from the card's account to the merchant.

    Nothing moved at authorise, nothing moves at a release: until captured the amount is
    held by the payment's status, and ``held:purchases`` is derived (:func:`ledger.balance`).
    """
    card = ledger.card_account(card_id)
    merchant = ledger.merchant_account(merchant_id)
    return _transfer(payment_id, "capture", card, merchant, amount, "purchase_capture")


def load_credit(load_id: str, card_id: str, amount: int) -> TransferSpec:
    """Complete: the held funds are on the card."""
    card = ledger.card_account(card_id)
    return _transfer(load_id, "credit", ledger.HELD_LOADS, card, amount, "load_credit")
