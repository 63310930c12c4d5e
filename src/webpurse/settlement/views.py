"""How the API shows a payment, a load and a refund (docs/settlement-api.md): plain dicts.

Their own module, below the services: ``funding`` and ``loads`` show a load, ``loads`` and
``refunds`` show a refund, without importing one another; the webhook outbox and the
idempotency keys show a payment as it was at one step of its purchase
(:func:`payment_as_of`), without importing the payment service.
"""

from __future__ import annotations

import datetime as dt
import functools
from types import MappingProxyType
from typing import Any

from webpurse.protocol.commands import CreditForLoad, DebitForPurchase
from webpurse.protocol.records import decode_bcd_date, decode_bcd_time
from webpurse.settlement.models import Load, Payment, Refund
from webpurse.settlement.transactions import Status


def _debit(seq: int, date: str, time: str, mac1: str) -> DebitForPurchase:
    return DebitForPurchase(
        seq,
        decode_bcd_date(bytes.fromhex(date)),
        decode_bcd_time(bytes.fromhex(time)),
        bytes.fromhex(mac1),
    )


# DEBIT FOR PURCHASE around its data (CLA INS P1 P2 Lc, and Le), taken from the protocol.
_DEBIT_APDU = _debit(0, "20000101", "000000", "00000000").to_apdu().to_bytes().hex().upper()
_DEBIT_HEAD, _DEBIT_TAIL = _DEBIT_APDU[:10], _DEBIT_APDU[-2:]


@functools.lru_cache(maxsize=1024)
def _digits(date: str, time: str) -> str | None:
    """``date + time`` if they are BCD digits (8 and 6) of a real date and time of day, else
    None (kept: a batch's authorisations share one date and time)."""
    digits = date + time
    if len(date) != 8 or len(time) != 6 or not (digits.isascii() and digits.isdigit()):
        return None
    try:
        dt.date(int(date[:4]), int(date[4:6]), int(date[6:]))
        dt.time(int(time[:2]), int(time[2:4]), int(time[4:]))
    except ValueError:
        return None
    return digits


def debit_apdu(seq: int, date: str, time: str, mac1: str) -> str:
    """The DEBIT FOR PURCHASE of an authorisation as hex, as the protocol encodes it.

    The row's date and time are BCD already (:func:`changes.authorised` writes them from a
    date and a time), so they go into the command as they are instead of decoded and
    encoded again for every answer; anything else (not a date and a time in digits) goes
    the protocol's way, which refuses it as it always did."""
    digits = _digits(date, time)
    if digits is not None and 0 <= seq < 1 << 32 and len(mac1) == 8:
        return f"{_DEBIT_HEAD}{seq:08X}{digits}{bytes.fromhex(mac1).hex().upper()}{_DEBIT_TAIL}"
    return _debit(seq, date, time, mac1).to_apdu().to_bytes().hex().upper()


class _Isoformat:
    """``at.isoformat()``, kept for the one time it was last given: by identity, or by
    equality for a plain UTC datetime (``tzinfo`` ``dt.UTC``, as the columns read back:
    an equal time in another zone, or another fold, writes other text, but two equal UTC
    times write the same). A batch's answers share one time object (the batch's ``now``)
    for ``updated_at``, and its creates for ``created_at`` too; the rows an authorise or
    capture batch reads back were mostly created together (equal times, other objects).
    The triple is swapped whole, so a thread never reads a mixed one; holding the object
    keeps its identity from being reused."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[object, str, bool] = (object(), "", False)  # no time is this object

    def __call__(self, at: dt.datetime) -> str:
        last = self._last
        if last[0] is at:
            return last[1]
        utc = type(at) is dt.datetime and at.tzinfo is dt.UTC
        if utc and last[2] and at == last[0]:
            return last[1]
        text = at.isoformat()
        self._last = (at, text, utc)
        return text


# One per member: a row's created_at and the batch's updated_at would evict each other.
_created_text, _updated_text = _Isoformat(), _Isoformat()


def payment_json(payment: Payment) -> dict[str, Any]:
    authorisation = None
    if payment.mac1 is not None and payment.terminal_seq is not None:
        authorisation = {
            "terminal_seq": payment.terminal_seq,
            "date": payment.txn_date,
            "time": payment.txn_time,
            "mac1": payment.mac1,
            "debit_apdu": debit_apdu(
                payment.terminal_seq, payment.txn_date or "", payment.txn_time or "", payment.mac1
            ),
        }
    return {
        "id": payment.id,
        "object": "payment",
        "status": payment.status,
        "amount": payment.amount,
        "currency": payment.currency,
        "description": payment.description,
        "merchant_reference": payment.merchant_reference,
        "metadata": payment.metadata_,
        "terminal_id": payment.terminal_id,
        "key_index": payment.key_index,
        "card_number": payment.card_number,
        "decline_code": payment.decline_code,
        "tac": payment.tac,
        "amount_refunded": payment.refunded_amount,
        "created_at": _created_text(payment.created_at),
        "updated_at": _updated_text(payment.updated_at),
        "authorisation": authorisation,
    }


def load_json(load: Load) -> dict[str, Any]:
    authorisation = None
    if load.mac2 is not None:
        credit = CreditForLoad(
            decode_bcd_date(bytes.fromhex(load.txn_date or "")),
            decode_bcd_time(bytes.fromhex(load.txn_time or "")),
            bytes.fromhex(load.mac2),
        )
        authorisation = {
            "date": load.txn_date,
            "time": load.txn_time,
            "mac2": load.mac2,
            "credit_apdu": credit.to_apdu().to_bytes().hex().upper(),
        }
    return {
        "id": load.id,
        "object": "load",
        "status": load.status,
        "amount": load.amount,
        "currency": load.currency,
        "funding": {"method": load.funding_method, "reference": load.funding_reference or None},
        "expires_at": load.expires_at.isoformat() if load.expires_at else None,
        "refund": load.refund_id,
        "terminal_id": load.terminal_id,
        "key_index": load.key_index,
        "card_number": load.card_number or load.requested_card_number,
        "decline_code": load.decline_code,
        "tac": load.tac,
        "created_at": load.created_at.isoformat(),
        "updated_at": load.updated_at.isoformat(),
        "authorisation": authorisation,
    }


def refund_json(refund: Refund) -> dict[str, Any]:
    return {
        "id": refund.id,
        "object": "refund",
        "status": refund.status,
        "payment": refund.payment_id,
        "amount": refund.amount,
        "currency": refund.currency,
        "load": refund.load_id,
        "created_at": refund.created_at.isoformat(),
        "updated_at": refund.updated_at.isoformat(),
    }


# --- a payment as it answered at one step of its purchase ------------------------------
#
# A purchase answers three times: create (201), authorise and capture (200). Each answer
# is the payment as it was right after that step, and the payment row still holds all of
# it: what a step does not override below is written once, at or before that step, and
# never again (amount, currency, description, reference, metadata, terminal, key index and
# created_at at create; the card number and the authorisation — terminal_seq, date, time,
# MAC1 — at authorise; the TAC at capture). What later steps change (status, decline_code,
# tac, amount_refunded, updated_at) is pinned to its value at the step, with the step's own
# time from the row (created_at, authorised_at, succeeded_at). So the answer is re-rendered
# instead of stored (the idempotency key's replay, the outbox's event body), and
# :func:`renders_as_of` checks, when the answer is first given, that it is exactly what
# the re-rendering will give; an answer it does not cover is stored as it is.

STEPS = ("create", "authorise", "capture")
"""The purchase steps whose successful answer :func:`payment_as_of` renders."""

_STEP_TIME = {"create": "created_at", "authorise": "authorised_at", "capture": "succeeded_at"}


@functools.lru_cache(maxsize=64)
def _pinned_view(step: str, at: dt.datetime) -> MappingProxyType[str, Any]:
    """The members of a payment's JSON a later step changes, as they were after ``step``.

    Read-only and kept: a batch pins hundreds of answers to one time. Equal instants in
    other zones share an entry, and their UTC text is the same. The one exception is two
    wall readings of one zone at a daylight-saving fold (01:30 before and after the clocks
    go back): Python calls them equal although they are an hour apart, so they share an
    entry and the second gets the first's text. Settlement's clock is UTC, which has no
    fold; with another clock, :func:`renders_as_of` sees the text differ from the stored
    column's and the answer is stored as given, never replayed wrongly."""
    later: dict[str, Any] = {"decline_code": None, "amount_refunded": 0}
    if step == "create":
        status = Status.REQUIRES_CARD.value
        later |= {"card_number": None, "tac": None, "authorisation": None}
    elif step == "authorise":
        status = Status.AUTHORISED.value
        later["tac"] = None
    elif step == "capture":
        status = Status.SUCCEEDED.value
    else:
        raise ValueError(f"no as-of rendering for the step {step!r}")
    return MappingProxyType({"status": status, **later, "updated_at": _iso(at)})


@functools.lru_cache(maxsize=1024)
def _iso(at: dt.datetime) -> str:
    """A time as a payment's JSON shows it once read back (the columns are UTC).

    Kept: every answer of a batch (and each row of it read back) carries the same times;
    an equal instant in another zone hits the same entry, whose UTC text is the same (for
    the daylight-saving fold, where Python's equality is not the instant's, see
    :func:`_pinned_view`)."""
    return at.astimezone(dt.UTC).isoformat()


def step_time(payment: Payment, step: str) -> dt.datetime | None:
    """When ``payment`` took ``step`` (None: it has not, or the row does not say)."""
    at: dt.datetime | None = getattr(payment, _STEP_TIME[step])
    return at


def payment_as_of(payment: Payment, step: str) -> dict[str, Any]:
    """``payment``'s JSON as it was right after ``step``, whatever happened to it since.

    Raises ``ValueError`` if the row does not know when it took ``step``.
    """
    at = step_time(payment, step)
    if at is None:
        raise ValueError(f"payment {payment.id} has no time for the step {step!r}")
    answer = payment_json(payment)
    answer.update(_pinned_view(step, at))
    return answer


def renders_as_of(answer: dict[str, Any], payment: Payment, step: str) -> bool:
    """Whether ``answer`` (``payment``'s JSON right after ``step``) is exactly what
    :func:`payment_as_of` will render for it later: only then may it be re-rendered."""
    name = _STEP_TIME.get(step)
    if name is None or answer.get("object") != "payment":
        return False
    at: dt.datetime | None = getattr(payment, name)  # step_time, inline (every answer)
    if at is None or answer.get("id") != payment.id:
        return False
    created = payment.created_at
    # A UTC time reads back as itself (astimezone to its own zone): its text is the one
    # payment_json just wrote for it, kept (no hashing of a fresh datetime, as _iso would).
    text = _created_text(created) if created.tzinfo is dt.UTC else _iso(created)
    if answer.get("created_at") != text:
        return False  # a clock not in UTC: the stored column reads back otherwise
    # Every pinned member is in the answer with that value: one comparison of item views in
    # C (a member missing from the answer fails it, where .get would have read None).
    return answer.items() >= _pinned_view(step, at).items()
