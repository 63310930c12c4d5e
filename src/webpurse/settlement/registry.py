"""The card registry: issuance, status, the shadow purse, clone flags, event history.

A card is issued in one step: the security module personalises it (card keys diversified
from the master keys) and the registry records it with a zero shadow balance and its
stored-value ledger account. The shadow balance and counters follow every settled
transaction. A card's status and flags change only on evidence only the card could give,
fresh for this contact (:mod:`.evidence`, spec §7), or by an operator, audited (who, when,
why); an unauthenticated mismatch is an observation for the operator (:func:`observe`).
"""

from __future__ import annotations

import datetime as dt
import functools
import secrets
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from webpurse.protocol.purse import DEFAULT_MAX_BALANCE, CardState
from webpurse.settlement import ledger
from webpurse.settlement.db import for_update
from webpurse.settlement.decisions import CardRecord, Flag, Observation, OpenTransaction
from webpurse.settlement.models import Card, CardEvent, CardObservation, Load, Payment
from webpurse.settlement.security import SecurityModule
from webpurse.settlement.transactions import OPEN, CardStatus

log = structlog.get_logger(__name__)

STATUSES = tuple(CardStatus)


class RegistryError(Exception):
    """A registry operation that cannot be done (duplicate card, unknown card, bad status)."""


def new_serial() -> bytes:
    return secrets.token_bytes(10)


def issue_card(
    session: Session,
    security: SecurityModule,
    now: dt.datetime,
    *,
    serial: bytes | None = None,
    expiry: dt.date | None = None,
    max_balance: int = DEFAULT_MAX_BALANCE,
) -> tuple[Card, CardState]:
    """Personalise a new card from the master keys and register it, in one step.

    Returns the registry row and the card's state (to write to a card image); the state
    holds card keys, so visible write it to the card and nowhere else.
    """
    serial = serial if serial is not None else new_serial()
    number = serial.hex().upper()
    if session.scalars(select(Card).where(Card.card_number == number)).first() is not None:
        raise RegistryError(f"card {number} is already registered")
    state = security.personalise(serial, start=now.date(), expiry=expiry, max_balance=max_balance)
    card = Card(
        id="crd_" + secrets.token_hex(12),
        card_number=number,
        status=CardStatus.ACTIVE,
        issuer_id=state.issuer.issuer_id.hex().upper(),
        key_version=security.key_version,
        start_date=state.issuer.start_date,
        expiry_date=state.issuer.expiry_date,
        max_balance=state.max_balance,
        shadow_balance=0,
        online_counter=0,
        offline_counter=0,
        open_transaction=None,
        flagged=False,
        created_at=now,
        updated_at=now,
    )
    session.add(card)
    session.flush()
    ledger.ensure_account(session, ledger.card_account(card.id), now)
    record_event(session, card, "issued", now, {"max_balance": card.max_balance})
    return card, state


def find_card(session: Session, card_number: str, *, lock: bool = False) -> Card | None:
    stmt = select(Card).where(Card.card_number == card_number.upper())
    if lock and for_update(session):
        stmt = stmt.with_for_update()
    return session.scalars(stmt.execution_options(populate_existing=lock)).first()


def lock_card(session: Session, card: Card) -> Card:
    """Re-read ``card`` under a row lock (PostgreSQL); SQLite serialises writers anyway."""
    locked = lock_card_id(session, card.id)
    assert locked is not None
    return locked


def lock_card_id(session: Session, card_id: str) -> Card | None:
    """The card with id ``card_id``, read under a row lock (PostgreSQL)."""
    stmt = select(Card).where(Card.id == card_id)
    if for_update(session):
        stmt = stmt.with_for_update()
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def record_event(
    session: Session, card: Card, kind: str, now: dt.datetime, detail: dict[str, Any] | None = None
) -> None:
    session.add(CardEvent(card_id=card.id, kind=kind, detail=detail or {}, created_at=now))
    log.info("card.event", card=card.card_number, kind=kind)


def block_clone(session: Session, card: Card, now: dt.datetime, detail: dict[str, Any]) -> None:
    """Authenticated, fresh evidence of a clone (a card check, :mod:`.evidence`): block."""
    card.flagged = True
    card.updated_at = now
    if card.status == CardStatus.ACTIVE:
        card.status = CardStatus.BLOCKED
        record_event(session, card, "blocked", now, {"reason": Flag.CLONE.value, **detail})
    record_event(session, card, Flag.CLONE.value, now, detail)
    log.warning("card.blocked_clone", card=card.card_number)


def observe(
    session: Session,
    card_number: str,
    kind: Observation,
    now: dt.datetime,
    *,
    merchant_id: str | None,
    reference: str | None,
    detail: dict[str, Any],
) -> None:
    """Record an unauthenticated mismatch or claim for the operator; the card is untouched."""
    session.add(
        CardObservation(
            card_number=card_number.upper()[:20],
            merchant_id=merchant_id,
            kind=kind.value,
            reference=reference,
            detail=detail,
            created_at=now,
        )
    )
    log.info("card.observation", card=card_number, kind=kind.value, merchant=merchant_id)


LOCKED_SW = "9303"


def note_card_refusal(
    session: Session,
    card_number: str,
    status_word: str,
    now: dt.datetime,
    *,
    merchant_id: str | None,
    reference: str,
) -> None:
    """A merchant relays that the card refused INITIALIZE with ``status_word``.

    9303 (the application locked itself, e.g. after 10 wrong MAC1s; spec §5) is recorded as
    an observation for the operator. The status word is not authenticated and the merchant
    could name any card number: it changes nothing on the card.
    """
    if status_word.upper() != LOCKED_SW:
        return
    observe(
        session,
        card_number,
        Observation.CARD_LOCKED_CLAIM,
        now,
        merchant_id=merchant_id,
        reference=reference,
        detail={"status_word": LOCKED_SW},
    )


def set_status(
    session: Session,
    card: Card,
    status: str,
    now: dt.datetime,
    reason: str,
    *,
    by: str | None = None,
) -> None:
    """An operator's status change, audited: who (``by``, the API key id), when, why.

    Reactivating a blocked card needs a reason; it clears the card's flag (the events keep
    the history).
    """
    if status not in STATUSES:
        raise RegistryError(f"status must be one of {', '.join(STATUSES)}")
    previous = card.status
    if previous == CardStatus.BLOCKED and status == CardStatus.ACTIVE and not reason.strip():
        raise RegistryError("reactivating a blocked card needs a reason")
    card.status = status
    if status == CardStatus.ACTIVE:
        card.flagged = False
    card.updated_at = now
    record_event(
        session,
        card,
        "status",
        now,
        {"from": previous, "to": status, "reason": reason, "by": by},
    )


def open_transaction(
    session: Session, card: Card, merchant_id: str | None
) -> OpenTransaction | None:
    txn_id = card.open_transaction
    if txn_id is None:
        return None
    item: Payment | Load | None
    if txn_id.startswith("pay_"):
        item, kind = session.get(Payment, txn_id), "payment"
    else:
        item, kind = session.get(Load, txn_id), "load"
    if item is None or item.counter is None or item.balance_before is None:
        return None
    same = merchant_id is not None and item.merchant_id == merchant_id
    return OpenTransaction(
        id=item.id,
        kind=kind,
        status=item.status,
        counter=item.counter,
        amount=item.amount,
        balance_before=item.balance_before,
        random=bytes.fromhex(item.card_random or ""),
        same_merchant=same,
        own_id=None if same or merchant_id is None else _own_superseded(session, item, merchant_id),
    )


def _own_superseded(session: Session, item: Payment | Load, merchant_id: str) -> str | None:
    """The caller's own open transaction that ``item`` (another merchant's) superseded.

    So the caller is told to recover it: its proof may show the counter was used by it,
    which releases ``item`` in turn.
    """
    seen = {item.id}
    older_id = item.supersedes
    while older_id is not None and older_id not in seen:
        seen.add(older_id)
        older: Payment | Load | None = (
            session.get(Payment, older_id)
            if isinstance(item, Payment)
            else session.get(Load, older_id)
        )
        if older is None:
            return None
        if (
            older.merchant_id == merchant_id
            and older.status in OPEN
            and older.counter == item.counter
        ):
            return older.id
        older_id = older.supersedes
    return None


def card_record(session: Session, card: Card, merchant_id: str | None) -> CardRecord:
    open_txn = open_transaction(session, card, merchant_id)
    available = None if open_txn is None else ledger.balance(session, ledger.card_account(card.id))
    return record_of(card, open_txn, available)


@functools.lru_cache(maxsize=64)
def _issuer_id(digits: str) -> bytes:
    """A card row's issuer id as bytes (kept: a registry has a handful of issuers)."""
    return bytes.fromhex(digits)


def record_of(
    card: Card, open_txn: OpenTransaction | None = None, available: int | None = None
) -> CardRecord:
    """The card's row as decision values (an ORM card, or a Core row of ``cards``)."""
    return CardRecord(
        card_number=card.card_number,
        status=card.status,
        issuer_id=_issuer_id(card.issuer_id),
        key_version=card.key_version,
        start_date=card.start_date,
        expiry_date=card.expiry_date,
        max_balance=card.max_balance,
        shadow_balance=card.shadow_balance,
        online_counter=card.online_counter,
        offline_counter=card.offline_counter,
        open_transaction=open_txn,
        available=available,
    )


def card_json(card: Card) -> dict[str, Any]:
    return {
        "id": card.id,
        "object": "card",
        "card_number": card.card_number,
        "status": card.status,
        "flagged": card.flagged,
        "shadow_balance": card.shadow_balance,
        "online_counter": card.online_counter,
        "offline_counter": card.offline_counter,
        "max_balance": card.max_balance,
        "key_version": card.key_version,
        "start_date": card.start_date.isoformat(),
        "expiry_date": card.expiry_date.isoformat(),
        "open_transaction": card.open_transaction,
        "created_at": card.created_at.isoformat(),
        "updated_at": card.updated_at.isoformat(),
    }
