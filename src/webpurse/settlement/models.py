"""The settlement schema as SQLAlchemy models (the migrations are the source of truth).

Money columns are integer fen (BigInteger); ids are prefixed strings; times are UTC.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    delete,
    event,
    false,
    insert,
    inspect,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, Session, mapped_column

from webpurse.settlement.db import Base, UtcDateTime
from webpurse.settlement.transactions import OPEN, Status

CARDS_FILLFACTOR = 85
"""Each page of ``cards`` is filled to this share at most (PostgreSQL ``fillfactor``,
migration 0017): a card is updated twice per purchase, and an update that finds room on
its row's page and changes no indexed column is HOT (no new index entry)."""
PAYMENTS_FILLFACTOR = 30
"""Likewise ``payments`` (migrations 0018, 0021): a purchase updates its payment twice, in
later batches than the one that created it, and a batch updates every row of a page at once:
each page keeps room for two new versions of all its rows, so the capture (which changes no
indexed column) is HOT; the authorise sets the card and counter (indexed) and is not."""


class Merchant(Base):
    __tablename__ = "merchants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    terminal_id: Mapped[str] = mapped_column(String(12), unique=True)
    # The last 4-byte terminal transaction sequence number issued (a PSAM's counter) on
    # SQLite; on PostgreSQL the ``terminal_seq`` SEQUENCE issues them (migration 0012) and
    # this is what had been issued before it (``merchants.terminal_seqs``).
    terminal_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # merchant | operator
    merchant_id: Mapped[str | None] = mapped_column(ForeignKey("merchants.id"), nullable=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


class MasterKeyRecord(Base):
    """A master key, AES-GCM encrypted under the key-encryption key (never in clear)."""

    __tablename__ = "master_keys"

    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(12))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary(64))
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class Card(Base):
    """A registered card: what settlement knows about it (the shadow of its purse)."""

    __tablename__ = "cards"
    # Room on each page for the updated versions of its cards (see CARDS_FILLFACTOR). The
    # purchase's card updates (open_transaction; the shadow balance, counter) change no
    # indexed column, so with room they stay on their page: HOT updates.
    __table_args__ = ({"postgresql_with": {"fillfactor": CARDS_FILLFACTOR}},)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    card_number: Mapped[str] = mapped_column(String(20), unique=True)
    status: Mapped[str] = mapped_column(String(16))  # active | blocked | lost | expired
    issuer_id: Mapped[str] = mapped_column(String(16))
    key_version: Mapped[int] = mapped_column(Integer)
    start_date: Mapped[dt.date] = mapped_column(Date)
    expiry_date: Mapped[dt.date] = mapped_column(Date)
    max_balance: Mapped[int] = mapped_column(BigInteger)
    shadow_balance: Mapped[int] = mapped_column(BigInteger, default=0)
    online_counter: Mapped[int] = mapped_column(Integer, default=0)
    offline_counter: Mapped[int] = mapped_column(Integer, default=0)
    # The one open transaction (payment or load id) while MAC1/MAC2 is out.
    open_transaction: Mapped[str | None] = mapped_column(String(40), nullable=True)
    flagged: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class CardEvent(Base):
    __tablename__ = "card_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    card_id: Mapped[str] = mapped_column(ForeignKey("cards.id"), index=True)
    kind: Mapped[str] = mapped_column(String(40))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        Index("ix_payments_merchant_created", "merchant_id", "created_at", "id"),
        Index("ix_payments_card_counter", "card_id", "counter"),
        # No index names status (migration 0018): a capture changes only columns no index
        # reads, so it is a HOT update. Waiting for a card is its own flag (cleared by
        # authorise, decline, cancel and expiry, which end the wait); an open hold is a
        # row of payment_holds (PaymentHold).
        Index(
            "ix_payments_merchant_open",
            "merchant_id",
            postgresql_where=text("awaiting_card"),
            sqlite_where=text("awaiting_card = 1"),
        ),
        Index(
            "ix_payments_hold_expired",
            "card_id",
            postgresql_where=text("decline_code = 'hold_expired'"),
            sqlite_where=text("decline_code = 'hold_expired'"),
        ),
        {"postgresql_with": {"fillfactor": PAYMENTS_FILLFACTOR}},
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # No foreign keys on the merchant or the card (migration 0019): a purchase's checks on
    # hot rows; ``ledger.check`` reports a payment naming either that does not exist.
    merchant_id: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    description: Mapped[str] = mapped_column(Text, default="")
    merchant_reference: Mapped[str] = mapped_column(String(200), default="")
    metadata_: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    terminal_id: Mapped[str] = mapped_column(String(12))
    key_index: Mapped[int] = mapped_column(Integer, default=1)
    card_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    card_number: Mapped[str | None] = mapped_column(String(20), nullable=True)
    decline_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # What the authorisation bound: the card's INITIALIZE values and the DEBIT fields.
    balance_before: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    counter: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The uncertain one at the same counter this one proceeded past (released on capture).
    supersedes: Mapped[str | None] = mapped_column(String(40), nullable=True)
    key_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    card_random: Mapped[str | None] = mapped_column(String(8), nullable=True)
    terminal_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    txn_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    txn_time: Mapped[str | None] = mapped_column(String(6), nullable=True)
    mac1: Mapped[str | None] = mapped_column(String(8), nullable=True)
    mac2: Mapped[str | None] = mapped_column(String(8), nullable=True)
    tac: Mapped[str | None] = mapped_column(String(8), nullable=True)
    refunded_amount: Mapped[int] = mapped_column(BigInteger, default=0)
    authorised_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    # When the card proved the debit: the capture's answer and the card's purchase history
    # are rendered from the row with it (views.payment_as_of, routes_admin.card_events).
    succeeded_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    # status == requires_card, kept by _sync_payment_holds (ORM) and batch._write (Core);
    # indexed instead of the status so that the capture leaves every indexed column alone.
    awaiting_card: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class PaymentHold(Base):
    """An open (authorised or uncertain) payment's hold on its card: the row exists exactly
    while the payment's status is open (``webpurse ledger check`` proves it).

    The holds are the payments' status; this table is their index, kept apart so that the
    payment's own updates stay HOT (migration 0018): inserted at authorise, deleted when
    the hold ends (capture, cancel, release, expiry), in the transaction that changes the
    status. ``ledger.available`` sums a card's rows; the sweeps find old ones by
    ``authorised_at``. No foreign keys: the check proves the rows agree with the payments.
    """

    __tablename__ = "payment_holds"
    __table_args__ = (
        Index("ix_payment_holds_card", "card_id"),
        Index("ix_payment_holds_authorised", "authorised_at"),
    )

    payment_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    card_id: Mapped[str] = mapped_column(String(40))
    amount: Mapped[int] = mapped_column(BigInteger)
    authorised_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class Load(Base):
    __tablename__ = "loads"
    __table_args__ = (
        Index("ix_loads_merchant_created", "merchant_id", "created_at", "id"),
        Index("ix_loads_card_counter", "card_id", "counter"),
        Index(
            "ix_loads_merchant_open",
            "merchant_id",
            postgresql_where=text("status = 'requires_card'"),
            sqlite_where=text("status = 'requires_card'"),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    merchant_id: Mapped[str | None] = mapped_column(ForeignKey("merchants.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(20), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    funding_method: Mapped[str] = mapped_column(String(20))
    # bank_transfer: the settlement-issued payment reference (RF creditor reference).
    funding_reference: Mapped[str] = mapped_column(String(200), index=True)
    # requires_funding: when the unpaid order expires.
    expires_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    refund_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    terminal_id: Mapped[str] = mapped_column(String(12))
    key_index: Mapped[int] = mapped_column(Integer, default=1)
    requested_card_number: Mapped[str | None] = mapped_column(String(20), nullable=True)
    card_id: Mapped[str | None] = mapped_column(ForeignKey("cards.id"), nullable=True)
    card_number: Mapped[str | None] = mapped_column(String(20), nullable=True)
    decline_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    balance_before: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    counter: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # The uncertain one at the same counter this one proceeded past (released on capture).
    supersedes: Mapped[str | None] = mapped_column(String(40), nullable=True)
    key_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    card_random: Mapped[str | None] = mapped_column(String(8), nullable=True)
    txn_date: Mapped[str | None] = mapped_column(String(8), nullable=True)
    txn_time: Mapped[str | None] = mapped_column(String(6), nullable=True)
    mac2: Mapped[str | None] = mapped_column(String(8), nullable=True)
    tac: Mapped[str | None] = mapped_column(String(8), nullable=True)
    authorised_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class Refund(Base):
    __tablename__ = "refunds"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"), index=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(20))
    load_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class Account(Base):
    """A ledger account; ``balance`` is a cache the ledger check recomputes from entries."""

    __tablename__ = "ledger_accounts"

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20), index=True)
    currency: Mapped[str] = mapped_column(String(3))
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    allow_negative: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class Transfer(Base):
    """An immutable transfer: ``amount`` from ``debit_account`` to ``credit_account``.

    No foreign key to the accounts (migration 0011): a hot account would take a key-share
    lock per row; the ledger posts only to accounts it has locked, and ``ledger.check``
    reports any transfer or entry naming an account that does not exist. Read by id only
    (and whole by the ledger check): no index on the accounts or the reference (0015).
    """

    __tablename__ = "ledger_transfers"

    id: Mapped[str] = mapped_column(String(120), primary_key=True)
    debit_account: Mapped[str] = mapped_column(String(80))
    credit_account: Mapped[str] = mapped_column(String(80))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    kind: Mapped[str] = mapped_column(String(40))
    reference: Mapped[str | None] = mapped_column(String(80), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class Entry(Base):
    """One leg of a transfer on one account.

    Its balance after and its place in the account's history are derived (migration 0015):
    every entry on an account is inserted while its transaction holds the account's row
    locked (``ledger._lock``), so per account the ids ascend in commit order, and the
    running sum in id order is the balance after each entry (:func:`ledger.history`).
    ``(account_id, id)`` is indexed for clearing, which reads an account's entries after
    the last id a batch took.
    """

    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_entries_account_id", "account_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # No foreign key (migration 0019): ``ledger.check`` reports entries of no transfer.
    transfer_id: Mapped[str] = mapped_column(String(120))
    account_id: Mapped[str] = mapped_column(String(80))  # no foreign key: see Transfer
    amount: Mapped[int] = mapped_column(BigInteger)  # signed: -debit, +credit


class KeyState(TypeDecorator[str]):
    """An idempotency key's state, ``in_flight`` or ``done``, stored as a smallint: its
    index in :data:`KEY_STATES` (0, 1). ``done`` is the column's default, which
    ``db.bulk_insert``'s JSON rows rely on (they bypass this type)."""

    impl = SmallInteger
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> int | None:
        return None if value is None else KEY_STATES.index(value)

    def process_result_value(self, value: int | None, dialect: Dialect) -> str | None:
        return None if value is None else KEY_STATES[value]


KEY_STATES = ("in_flight", "done")  # the stored code is the index


class Digest(TypeDecorator[str]):
    """A SHA-256 digest stored as its 32 bytes, read and written as its 64 hex digits.

    Also binds PostgreSQL's text form of a bytea (``\\x`` and the hex digits,
    ``idempotency.stored_fingerprint``), which ``db.bulk_insert``'s rows carry: on
    PostgreSQL as JSON that the server reads straight into the column, bypassing this type;
    elsewhere bound through it.
    """

    impl = LargeBinary(32)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> bytes | None:
        if value is None:
            return None
        digest = bytes.fromhex(value.removeprefix("\\x"))
        if len(digest) != 32:
            raise ValueError(f"a SHA-256 digest is 32 bytes, not {len(digest)}")
        return digest

    def process_result_value(self, value: bytes | None, dialect: Dialect) -> str | None:
        return None if value is None else bytes(value).hex()


class IdempotencyRecord(Base):
    """A POST's idempotency key: the request's fingerprint and, once done, its response.

    Its primary key is (key, principal): it leads with the key, so a look-up is an index
    look-up even on a table without statistics (``idempotency.lookup``), and it is the
    only unique index a key row costs (migration 0016: no surrogate id). The fingerprint
    is its 32 bytes and the state a smallint; the fixed-width columns come first, so
    PostgreSQL pads nothing between them. ``created_at``'s btree finds the oldest keys for
    ``idempotency.purge`` (a BRIN index was measured and refused: without statistics
    PostgreSQL scans the whole table for it).
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (PrimaryKeyConstraint("key", "principal", name="pk_idempotency_keys"),)

    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), index=True)
    response_status: Mapped[int | None] = mapped_column(SmallInteger, nullable=True)
    state: Mapped[str] = mapped_column(KeyState(), server_default=text("1"))  # done
    principal: Mapped[str] = mapped_column(String(40))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(Digest())
    # Instead of ``response_body``: the payment whose answer this was, and the purchase
    # step (create, authorise, capture) it answered; replayed as it was then
    # (views.payment_as_of).
    object_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    step: Mapped[str | None] = mapped_column(String(12), nullable=True)
    response_body: Mapped[str | None] = mapped_column(Text, nullable=True)


class CardObservation(Base):
    """An unauthenticated mismatch or claim about a card, for the operator to read.

    Never a flag on the card (docs/settlement-api.md, "Evidence"): the card number is the
    one the answer or the merchant named, which anyone can write.
    """

    __tablename__ = "card_observations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    card_number: Mapped[str] = mapped_column(String(20), index=True)
    merchant_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    kind: Mapped[str] = mapped_column(String(40))
    reference: Mapped[str | None] = mapped_column(String(40), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime(), index=True)


class CardCheck(Base):
    """A card check: a fresh INITIALIZE FOR LOAD challenge, used at most once."""

    __tablename__ = "card_checks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    card_id: Mapped[str] = mapped_column(ForeignKey("cards.id"), index=True)
    merchant_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    nonce: Mapped[str] = mapped_column(String(12))  # the challenge terminal id, hex
    # The shadow when the check was issued: the answer is judged against it, so a genuine
    # answer held back until the card has spent elsewhere still matches (docs/settlement-api.md).
    shadow_balance: Mapped[int] = mapped_column(BigInteger)
    online_counter: Mapped[int] = mapped_column(Integer)
    reference: Mapped[str | None] = mapped_column(String(40), nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(20), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())
    used_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)


# --- funding (issue 12): float deposits, bank statements, exceptions ------------------


class FloatDeposit(Base):
    """Money a merchant paid into its top-up float, as the operator saw it arrive."""

    __tablename__ = "float_deposits"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    # The bank's reference of the credit: a deposit's identity (a replay finds it).
    bank_reference: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class BankStatement(Base):
    """An imported statement of the settlement bank account; (account, number) is unique."""

    __tablename__ = "bank_statements"
    __table_args__ = (UniqueConstraint("account", "number"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account: Mapped[str] = mapped_column(String(64))
    number: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(8))
    currency: Mapped[str] = mapped_column(String(3))
    opening_balance: Mapped[int] = mapped_column(BigInteger)
    closing_balance: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))  # SHA-256 of what was parsed
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


class StatementLine(Base):
    """One line of an imported statement and what settlement did with it."""

    __tablename__ = "statement_lines"
    __table_args__ = (UniqueConstraint("statement_id", "line_no"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    statement_id: Mapped[str] = mapped_column(ForeignKey("bank_statements.id"), index=True)
    line_no: Mapped[int] = mapped_column(Integer)
    amount: Mapped[int] = mapped_column(BigInteger)  # signed: + credit, - debit
    booked_on: Mapped[dt.date] = mapped_column(Date)
    bank_reference: Mapped[str] = mapped_column(String(100), default="")
    payer: Mapped[str] = mapped_column(String(200), default="")
    remittance: Mapped[str] = mapped_column(Text, default="")
    reference: Mapped[str | None] = mapped_column(String(40), nullable=True)
    outcome: Mapped[str] = mapped_column(String(20))  # matched | exception | debit
    load_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)


class StatementException(Base):
    """Money received that funds no top-up: it waits for the operator to return it."""

    __tablename__ = "statement_exceptions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    line_id: Mapped[str | None] = mapped_column(ForeignKey("statement_lines.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(24))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    reference: Mapped[str | None] = mapped_column(String(40), nullable=True)
    load_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    payer: Mapped[str] = mapped_column(String(200), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(20), index=True)  # awaiting_return | returned
    return_reference: Mapped[str | None] = mapped_column(String(100), nullable=True)
    returned_at: Mapped[dt.datetime | None] = mapped_column(UtcDateTime(), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UtcDateTime())


# --- the payments' derived index rows, kept with the status ----------------------------

_HOLDS: Table = PaymentHold.__table__  # type: ignore[assignment]
_OPEN = frozenset(s.value for s in OPEN)


@event.listens_for(Session, "before_flush")
def _sync_payment_holds(session: Session, _context: object, _instances: object) -> None:
    """Keep ``awaiting_card`` and the ``payment_holds`` row of every Payment whose status
    an ORM path changed (authorise, uncertain, capture, cancel, release, expiry), in the
    flush that writes the status. The batched fast path writes Core rows and keeps both
    itself (batch._write); ``webpurse ledger check`` proves they agree."""
    changed: list[tuple[Payment, bool | None]] = []
    for obj in (*session.new, *session.dirty):
        if not isinstance(obj, Payment):
            continue
        history = inspect(obj).attrs.status.history
        if obj in session.new:
            changed.append((obj, False))
        elif history.has_changes():
            before = history.deleted[0] if history.deleted else None
            changed.append((obj, None if before is None else str(before) in _OPEN))
    if not changed:
        return
    connection = session.connection()
    for payment, was_open in changed:
        payment.awaiting_card = payment.status == Status.REQUIRES_CARD
        is_open = str(payment.status) in _OPEN
        if was_open is not False and (not is_open or was_open is None):
            connection.execute(delete(_HOLDS).where(_HOLDS.c.payment_id == payment.id))
        if is_open and was_open is not True:
            if payment.card_id is None:  # holds nothing; ledger.check reports it
                continue
            since = payment.authorised_at or payment.updated_at or payment.created_at
            connection.execute(
                insert(_HOLDS).values(
                    payment_id=payment.id,
                    card_id=payment.card_id,
                    amount=payment.amount,
                    authorised_at=since,
                )
            )
