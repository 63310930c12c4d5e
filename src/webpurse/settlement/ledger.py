"""The double-entry ledger: accounts, immutable transfers, caller-chosen idempotent ids.

Every transfer moves one positive integer amount from a debit account to a credit account,
so every transfer sums to zero and all accounts together always sum to zero. An account's
``balance`` and ``version`` are a cache: :func:`check` recomputes them from the entries
(their sum and their count). Touched accounts are locked in sorted id order (``SELECT …
FOR NO KEY UPDATE`` on PostgreSQL) so concurrent transfers cannot deadlock.

An entry stores only its amount (migration 0015): its balance after and its place in the
account's history are derived from the entry id. Every entry is inserted after its
account's row is locked and the lock is held to the commit, so on each account the ids
ascend in commit order: the running sum in id order is the balance after each entry
(:func:`history`), and "the entries after id N" are exactly those committed after it
(clearing's marks). Any new way of writing entries must keep that order: lock, then insert;
and the id sequence must hand out ids one at a time (PostgreSQL's default ``CACHE 1``).

Accounts (see docs/settlement-api.md):
- ``card:<card id>`` stored value on a card (what settlement owes the cardholder);
- ``funding:<method>`` money received for loads (negative: it is the source of value);
- ``topups:<merchant id>`` top-ups a merchant sold (it collected the money, so it owes it:
  negative until clearing nets it against the merchant's payable);
- ``held:purchases`` amounts authorised or uncertain, not yet captured or released: derived
  from the payments' status (issue 20, one transfer per purchase: a capture moves the amount
  from the card to the merchant, authorise and release post nothing). :func:`balance` adds the
  open payments to it and takes each card's open ones off its ``card:`` account, so readers
  see the held amounts where they were; :func:`available` is what a card may still spend.
  Its stored balance is what older databases posted to it directly (0 after migration 0014);
- ``held:loads`` funds for loads in flight, not yet on a card or returned;
- ``merchant:<merchant id>`` merchant payable;
- ``payouts:<merchant id>`` paid out to merchants (clearing);
- ``refunds:pending`` refunds on their way from the payable to their load (0 between requests);
- ``received:float_deposits``, ``received:bank_transfers`` money that reached the settlement
  bank account (negative: the sources of all value since issue 12);
- ``float:<merchant id>`` a merchant's unused prepaid top-up float;
- ``matched:bank_transfers`` statement credits matched to an order, not yet held for its load;
- ``returns:awaiting`` money received that funds nothing, waiting to go back to its payer;
- ``returned:payers`` money paid back to payers (it left).

``funding:`` and ``topups:`` are only in databases from before funding (issue 12): loads were
funded from them without any money received.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Select,
    String,
    Table,
    and_,
    bindparam,
    column,
    func,
    insert,
    literal,
    or_,
    select,
    table,
    update,
)
from sqlalchemy.orm import Session

from webpurse.settlement.db import (
    among_bound,
    among_values,
    bulk_insert,
    bulk_update,
    dialect_name,
    for_update,
    insert_ignoring_conflicts,
)
from webpurse.settlement.models import (
    Account,
    Card,
    Entry,
    Merchant,
    Payment,
    PaymentHold,
    Transfer,
)
from webpurse.settlement.refund_checks import open_refund_problems
from webpurse.settlement.transactions import OPEN, Status

_ACCOUNTS: Table = Account.__table__  # type: ignore[assignment]
_TRANSFERS: Table = Transfer.__table__  # type: ignore[assignment]
_ENTRIES: Table = Entry.__table__  # type: ignore[assignment]
_PAYMENTS: Table = Payment.__table__  # type: ignore[assignment]
_CARDS: Table = Card.__table__  # type: ignore[assignment]
_HOLDS: Table = PaymentHold.__table__  # type: ignore[assignment]
_MERCHANTS: Table = Merchant.__table__  # type: ignore[assignment]
# Only the columns the check reads (the webhooks package is not imported by the ledger).
_EVENTS = table("webhook_events", column("id"), column("merchant_id"))

HELD_PURCHASES = "held:purchases"
HELD_LOADS = "held:loads"
REFUNDS_PENDING = "refunds:pending"
RECEIVED_FLOAT_DEPOSITS = "received:float_deposits"
RECEIVED_BANK_TRANSFERS = "received:bank_transfers"
MATCHED_BANK_TRANSFERS = "matched:bank_transfers"
RETURNS_AWAITING = "returns:awaiting"
RETURNED_PAYERS = "returned:payers"

# Kinds whose balances may go below zero: the sources of value.
_NEGATIVE_KINDS = frozenset({"received", "funding", "topups"})
SOURCE_KINDS = ("received", "funding", "topups")
# Where the value received is: held on cards, owed, paid out, in flight, waiting or gone back.
HOLDING_KINDS = (
    "card",
    "merchant",
    "payouts",
    "refunds",
    "held",
    "float",
    "matched",
    "returns",
    "returned",
)


def card_account(card_id: str) -> str:
    return f"card:{card_id}"


def merchant_account(merchant_id: str) -> str:
    return f"merchant:{merchant_id}"


def payout_account(merchant_id: str) -> str:
    return f"payouts:{merchant_id}"


def funding_account(method: str) -> str:
    return f"funding:{method}"


def float_account(merchant_id: str) -> str:
    """The merchant's unused prepaid top-up float."""
    return f"float:{merchant_id}"


def topups_account(merchant_id: str) -> str:
    """The merchant's top-up receivable: what it collected for loads it sold, until cleared."""
    return f"topups:{merchant_id}"


def account_kind(account_id: str) -> str:
    return account_id.split(":", 1)[0]


class LedgerError(Exception):
    """A transfer the ledger refuses: bad amount, unknown currency, overdraft, id reuse."""


@dataclass(frozen=True, slots=True)
class TransferResult:
    transfer: Transfer
    created: bool  # False when the id already existed with the same content (a retry)


def _new_account_row(account_id: str, now: dt.datetime, currency: str) -> dict[str, object]:
    kind = account_kind(account_id)
    return {
        "id": account_id,
        "kind": kind,
        "currency": currency,
        "balance": 0,
        "version": 0,
        "allow_negative": kind in _NEGATIVE_KINDS,
        "created_at": now,
    }


def _create_missing(
    session: Session, account_ids: list[str], now: dt.datetime, currency: str
) -> None:
    """Create accounts that do not exist yet; safe when two transactions race to do it.

    On PostgreSQL the second of two racing inserts waits for the first transaction and
    then does nothing (no unique violation): ``tests/settlement/test_ledger.py``.
    """
    rows = [_new_account_row(account_id, now, currency) for account_id in account_ids]
    session.execute(insert_ignoring_conflicts(session, _ACCOUNTS, rows))


def ensure_account(
    session: Session, account_id: str, now: dt.datetime, currency: str = "CNY"
) -> None:
    """Create the account unless it exists (one ``INSERT … ON CONFLICT DO NOTHING``)."""
    _create_missing(session, [account_id], now, currency)


def _lock(
    session: Session, account_ids: list[str], now: dt.datetime, currency: str
) -> dict[str, Any]:
    """Read (and on PostgreSQL lock) the accounts in sorted id order, creating any missing.

    One ``SELECT … ORDER BY id FOR NO KEY UPDATE`` (SQLAlchemy Core rows, no ORM objects):
    PostgreSQL locks the rows in that order, so two transfers touching the same accounts
    always queue instead of deadlocking. The weakest lock that serialises postings (they
    change the balance, never the id): it does not block a key-share lock on the row.
    """
    ids = sorted(set(account_ids))
    dialect = dialect_name(session)
    stmt = _lock_stmt(dialect, for_update(session))
    params = {"ids": among_values(dialect, ids)}
    found = {row.id: row for row in session.execute(stmt, params).all()}
    missing = [account_id for account_id in ids if account_id not in found]
    if missing:
        _create_missing(session, missing, now, currency)
        found = {row.id: row for row in session.execute(stmt, params).all()}
    return found


@functools.cache
def _lock_stmt(dialect: str, lock: bool) -> Select[Any]:
    """:func:`_lock`'s statement, built once per dialect (a batch's capture locks hundreds
    of card accounts: building the statement cost more than running it)."""
    stmt = (
        select(
            _ACCOUNTS.c.id,
            _ACCOUNTS.c.currency,
            _ACCOUNTS.c.balance,
            _ACCOUNTS.c.version,
            _ACCOUNTS.c.allow_negative,
        )
        .where(among_bound(dialect, _ACCOUNTS.c.id, "ids"))
        .order_by(_ACCOUNTS.c.id)
    )
    return stmt.with_for_update(key_share=True) if lock else stmt


def lock_accounts(
    session: Session, account_ids: list[str], now: dt.datetime, currency: str = "CNY"
) -> dict[str, int]:
    """Lock the accounts (sorted id order, as every transfer does) and read their versions.

    Clearing takes these locks before it reads what the accounts hold: a transfer that
    already touched one has committed by the time the lock is granted, and none can touch
    it until the clearing transaction ends. Returns ``{account id: version}``.
    """
    return {row.id: int(row.version) for row in _lock(session, account_ids, now, currency).values()}


def _existing(
    session: Session, transfer_id: str, debit_account: str, credit_account: str, amount: int
) -> TransferResult | None:
    """The transfer already posted under ``transfer_id`` (a retry), or None."""
    existing = session.get(Transfer, transfer_id, populate_existing=True)
    if existing is None:
        return None
    same = (existing.debit_account, existing.credit_account, existing.amount) == (
        debit_account,
        credit_account,
        amount,
    )
    if not same:
        raise LedgerError(f"transfer id {transfer_id} was used for a different transfer")
    return TransferResult(existing, created=False)


def _check_shape(amount: object, debit_account: str, credit_account: str) -> None:
    """Refuse a transfer that could never be posted: not a positive integer, one account."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise LedgerError(f"transfer amount must be a positive integer of fen, got {amount!r}")
    if debit_account == credit_account:
        raise LedgerError("a transfer needs two different accounts")


def _refusal(debit: Any, credit: Any, amount: int, currency: str) -> str | None:
    """Why the locked accounts cannot take this transfer now, or None when they can."""
    if debit.currency != currency or credit.currency != currency:
        return "both accounts must be in the transfer's currency"
    if not debit.allow_negative and debit.balance < amount:
        return f"{debit.id} holds {debit.balance} fen, cannot transfer {amount} fen"
    return None


def _write_legs(session: Session, transfer_id: str, legs: list[tuple[Any, int]]) -> None:
    """Update both locked accounts' balances and versions and insert their entries (the
    accounts are locked already: the entries' ids follow the commit order, see above)."""
    session.execute(
        update(_ACCOUNTS)
        .where(_ACCOUNTS.c.id == bindparam("account_id"))
        .values(balance=bindparam("new_balance"), version=bindparam("new_version")),
        [
            {
                "account_id": account.id,
                "new_balance": account.balance + signed,
                "new_version": account.version + 1,
            }
            for account, signed in legs
        ],
    )
    session.execute(
        insert(_ENTRIES),
        [
            {
                "transfer_id": transfer_id,
                "account_id": account.id,
                "amount": signed,
            }
            for account, signed in legs
        ],
    )


def post_transfer(
    session: Session,
    transfer_id: str,
    debit_account: str,
    credit_account: str,
    amount: int,
    kind: str,
    *,
    now: dt.datetime,
    reference: str | None = None,
    currency: str = "CNY",
) -> TransferResult:
    """Move ``amount`` fen from ``debit_account`` to ``credit_account`` exactly once.

    Runs inside the caller's transaction (so it commits or rolls back with the payment
    state that caused it). A repeated ``transfer_id`` with identical content returns the
    original transfer; with different content it raises :class:`LedgerError`. A refused
    transfer writes nothing.

    Four statements (SQLAlchemy Core): lock both accounts, insert the transfer (``ON
    CONFLICT DO NOTHING``: a retry inserts nothing), update both balances, insert both
    entries.
    """
    _check_shape(amount, debit_account, credit_account)
    accounts = _lock(session, [debit_account, credit_account], now, currency)
    debit, credit = accounts[debit_account], accounts[credit_account]
    refusal = _refusal(debit, credit, amount, currency)
    if refusal is not None:
        retried = _existing(session, transfer_id, debit_account, credit_account, amount)
        if retried is not None:
            return retried
        raise LedgerError(refusal)
    row: dict[str, object] = {
        "id": transfer_id,
        "debit_account": debit_account,
        "credit_account": credit_account,
        "amount": amount,
        "currency": currency,
        "kind": kind,
        "reference": reference,
        "created_at": now,
    }
    inserted = session.execute(
        insert_ignoring_conflicts(session, _TRANSFERS, [row]).returning(_TRANSFERS.c.id)
    ).first()
    if inserted is None:
        retried = _existing(session, transfer_id, debit_account, credit_account, amount)
        assert retried is not None
        return retried
    _write_legs(session, transfer_id, [(debit, -amount), (credit, amount)])
    return TransferResult(Transfer(**row), created=True)


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """A transfer to post with :func:`post_transfers` (fields as in :func:`post_transfer`)."""

    id: str
    debit_account: str
    credit_account: str
    amount: int
    kind: str
    reference: str | None = None


@dataclass
class HotCredits:
    """The credits :func:`post_transfers` left for :func:`post_hot_credits` to post last.

    A hot account (a merchant's payable, credited by every purchase of a batch) is locked
    only to be credited: nothing is decided on its balance, so its lock can wait until the
    very end of the transaction, the last statements before the commit. Concurrent
    batches of one merchant then queue on it for the commit only, not for the rest of the
    batch's work (keys, events, answers). Its entries are inserted after that lock, in
    posting order, as every entry is (their ids are the account's history).
    """

    currency: str
    now: dt.datetime
    # (transfer id, account id, signed amount), in posting order
    entries: list[tuple[str, str, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.entries)


def post_transfers(
    session: Session,
    transfers: Sequence[TransferSpec],
    *,
    now: dt.datetime,
    currency: str = "CNY",
    defer: frozenset[str] = frozenset(),
) -> HotCredits:
    """Post many new transfers at once: the ledger's half of group commit.

    Every touched account is locked once for the whole group (one sorted ``SELECT … FOR
    UPDATE``) and updated once, to its final balance and version, however many transfers
    touch it: a hot account (``held:purchases``, a merchant's payable) is locked per batch,
    not per transfer (payments-api.md, "Ledger"). The entries are inserted after the lock,
    in the transfers' order, so their ids give exactly the history posting them one by one
    would have written.

    The accounts in ``defer`` are only credited here (a transfer debiting one is refused
    with ``ValueError``): they are neither locked nor written now, but returned as
    :class:`HotCredits`, which the caller posts with :func:`post_hot_credits` as the last
    thing before its commit. The transfer rows themselves are written now.

    All or nothing: a refused transfer raises :class:`LedgerError` before anything is
    written. The ids must be new (a reused id fails the insert; retries of single
    transfers go through :func:`post_transfer`).
    """
    hot = HotCredits(currency, now)
    if not transfers:
        return hot
    for spec in transfers:
        _check_shape(spec.amount, spec.debit_account, spec.credit_account)
        if spec.debit_account in defer:
            raise ValueError(f"{spec.debit_account} is debited: it cannot be posted last")
    touched = (
        {spec.debit_account for spec in transfers} | {spec.credit_account for spec in transfers}
    ) - defer
    # Each locked row unpacked once, in _lock_stmt's column order: a Row's attribute is a
    # name look-up in Python (~0.3 µs), read per transfer it cost more than the posting.
    balances: dict[str, int] = {}
    versions: dict[str, int] = {}
    other_currency: set[str] = set()
    limited: set[str] = set()  # not allowed below zero
    for account_id, account_currency, balance, version, allow_negative in _lock(
        session, list(touched), now, currency
    ).values():
        balances[account_id], versions[account_id] = int(balance), int(version)
        if account_currency != currency:
            other_currency.add(account_id)
        if not allow_negative:
            limited.add(account_id)
    transfer_rows: list[dict[str, object]] = []
    entry_rows: list[dict[str, object]] = []
    for spec in transfers:
        debit_id, credit_id, amount = spec.debit_account, spec.credit_account, spec.amount
        # A deferred credit account is not read here: only the debit one is checked then.
        if debit_id in other_currency or credit_id in other_currency:
            raise LedgerError("both accounts must be in the transfer's currency")
        if debit_id in limited and balances[debit_id] < amount:
            raise LedgerError(
                f"{debit_id} holds {balances[debit_id]} fen, cannot transfer {amount} fen"
            )
        transfer_rows.append(
            {
                "id": spec.id,
                "debit_account": debit_id,
                "credit_account": credit_id,
                "amount": amount,
                "currency": currency,
                "kind": spec.kind,
                "reference": spec.reference,
                "created_at": now,
            }
        )
        for account_id, signed in ((debit_id, -amount), (credit_id, amount)):
            if account_id in defer:
                hot.entries.append((spec.id, account_id, signed))
                continue
            balances[account_id] += signed
            versions[account_id] += 1
            entry_rows.append({"transfer_id": spec.id, "account_id": account_id, "amount": signed})
    bulk_insert(session, _TRANSFERS, transfer_rows)
    bulk_update(
        session,
        _ACCOUNTS,
        [
            {"id": account_id, "balance": balances[account_id], "version": versions[account_id]}
            for account_id in sorted(touched)
        ],
    )
    bulk_insert(session, _ENTRIES, entry_rows)
    return hot


def post_hot_credits(session: Session, hot: HotCredits) -> None:
    """Lock the hot accounts :func:`post_transfers` deferred, credit them, insert their
    entries (in posting order, after the lock): call it last before the commit."""
    if not hot:
        return
    totals: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for _, account_id, amount in hot.entries:
        totals[account_id] += amount
        counts[account_id] += 1
    accounts = _lock(session, list(totals), hot.now, hot.currency)
    if any(row.currency != hot.currency for row in accounts.values()):
        raise LedgerError("both accounts must be in the transfer's currency")
    bulk_update(
        session,
        _ACCOUNTS,
        [
            {
                "id": account_id,
                "balance": int(accounts[account_id].balance) + totals[account_id],
                "version": int(accounts[account_id].version) + counts[account_id],
            }
            for account_id in sorted(totals)
        ],
    )
    bulk_insert(
        session,
        _ENTRIES,
        [
            {"transfer_id": transfer_id, "account_id": account_id, "amount": amount}
            for transfer_id, account_id, amount in hot.entries
        ],
    )


def locked_balance(
    session: Session, account_id: str, now: dt.datetime, currency: str = "CNY"
) -> int:
    """The account's balance, its row locked (PostgreSQL) until the transaction ends.

    A caller that decides on the balance (may this load draw the float?) and then posts a
    transfer from it reads it here: a concurrent transaction waits for this one, so two
    decisions never both see the same funds.
    """
    return int(_lock(session, [account_id], now, currency)[account_id].balance)


def _stored_balance(session: Session, account_id: str) -> int:
    value = session.execute(
        select(_ACCOUNTS.c.balance).where(_ACCOUNTS.c.id == account_id)
    ).scalar_one_or_none()
    return 0 if value is None else int(value)


def _open_holds(session: Session, card_id: str | None = None) -> int:
    """The amounts of open (authorised or uncertain) payments: all, or one card's (their
    ``payment_holds`` rows, which :func:`check` proves are exactly the open payments)."""
    stmt = select(func.coalesce(func.sum(_HOLDS.c.amount), 0))
    if card_id is not None:
        stmt = stmt.where(_HOLDS.c.card_id == card_id)
    return int(session.scalar(stmt) or 0)


def open_holds_by_card(session: Session) -> dict[str, int]:
    """Every card's open purchase holds (cards with none are left out)."""
    stmt = (
        select(_PAYMENTS.c.card_id, func.sum(_PAYMENTS.c.amount))
        .where(_PAYMENTS.c.status.in_(OPEN), _PAYMENTS.c.card_id.is_not(None))
        .group_by(_PAYMENTS.c.card_id)
    )
    return {str(card_id): int(held) for card_id, held in session.execute(stmt) if held}


def balance(session: Session, account_id: str) -> int:
    """The account's balance as the database has it now (0 for an unknown account).

    Purchase holds are the payments' status, not transfers: ``held:purchases`` is its stored
    balance plus every open payment, a ``card:`` account its stored balance less the card's
    open payments — the numbers a hold transfer at authorise would have left.
    """
    stored = _stored_balance(session, account_id)
    if account_id == HELD_PURCHASES:
        return stored + _open_holds(session)
    if account_kind(account_id) == "card":
        return stored - _open_holds(session, account_id.split(":", 1)[1])
    return stored


@dataclass(frozen=True, slots=True)
class Available:
    """What a card may still spend: its account less its open holds, in its currency."""

    amount: int
    currency: str


def available(
    session: Session, card_ids: Sequence[str], *, excluding: str | None = None
) -> dict[str, Available]:
    """Each card's available value, in one statement: its ``card:`` account's stored
    balance less the amounts of its open payments (but ``excluding``, the payment being
    authorised). A card with no account yet has 0 (in CNY, as the account would be made).

    The caller holds the cards' rows locked: every step that lowers what a card may spend
    (authorise, capture, a released payment proven after all) locks the card row first.
    """
    if not card_ids:
        return {}
    dialect = dialect_name(session)
    params: dict[str, Any] = {"cards": among_values(dialect, card_ids)}
    if excluding is not None:
        params["excluding"] = excluding
    rows = session.execute(_available_stmt(dialect, excluding is not None), params).all()
    return {
        str(card_id): Available(int(stored or 0) - int(holds or 0), currency or "CNY")
        for card_id, stored, currency, holds in rows
    }


@functools.cache
def _available_stmt(dialect: str, excluding: bool) -> Select[Any]:
    """:func:`available`'s statement, built once per dialect (building one costs more than
    running it for a batch); the cards bound as ``cards``, the payment left out as
    ``excluding``."""
    # One index lookup per card (ix_payment_holds_card), whatever the number of open
    # payments of other cards.
    held = select(func.coalesce(func.sum(_HOLDS.c.amount), 0)).where(
        _HOLDS.c.card_id == _CARDS.c.id
    )
    if excluding:
        held = held.where(_HOLDS.c.payment_id != bindparam("excluding"))
    account_id = literal("card:", String) + _CARDS.c.id
    return (
        select(_CARDS.c.id, _ACCOUNTS.c.balance, _ACCOUNTS.c.currency, held.scalar_subquery())
        .select_from(_CARDS.outerjoin(_ACCOUNTS, _ACCOUNTS.c.id == account_id))
        .where(among_bound(dialect, _CARDS.c.id, "cards"))
    )


@dataclass(frozen=True, slots=True)
class HistoryLine:
    """One entry of an account's history with what it derives: its place (1, 2, …) and
    the account's balance after it."""

    entry_id: int
    transfer_id: str
    amount: int
    version: int
    balance_after: int


def history(session: Session, account_id: str) -> list[HistoryLine]:
    """The account's entries in commit (id) order, each with its version and the balance
    after it: one statement, the running sum a window function over the entry ids."""
    stmt = (
        select(
            _ENTRIES.c.id,
            _ENTRIES.c.transfer_id,
            _ENTRIES.c.amount,
            func.row_number().over(order_by=_ENTRIES.c.id),
            func.sum(_ENTRIES.c.amount).over(order_by=_ENTRIES.c.id),  # ids are unique
        )
        .where(_ENTRIES.c.account_id == account_id)
        .order_by(_ENTRIES.c.id)
    )
    return [
        HistoryLine(int(entry_id), str(transfer_id), int(amount), int(version), int(after))
        for entry_id, transfer_id, amount, version, after in session.execute(stmt)
    ]


# --- the ledger check ---------------------------------------------------------------


def funds_received(totals: dict[str, int]) -> int:
    """Money received: float deposits and bank statement credits (and, in databases from
    before funding, the old ``funding:`` and ``topups:`` sources)."""
    return -sum(totals.get(kind, 0) for kind in SOURCE_KINDS)


def funds_held(totals: dict[str, int]) -> int:
    """Where the money received is now (ARCHITECTURE.md "Invariants")."""
    return sum(totals.get(kind, 0) for kind in HOLDING_KINDS)


@dataclass
class CheckReport:
    accounts: int = 0
    transfers: int = 0
    problems: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _transfer_problems(session: Session, legs: dict[str, list[Entry]]) -> list[str]:
    """Each transfer has exactly its two entries, -amount and +amount; no entry is orphaned.

    Consumes ``legs`` (the entries by transfer id): what is left names no transfer.
    """
    problems: list[str] = []
    for transfer in session.scalars(select(Transfer)):
        entries = legs.pop(transfer.id, [])
        got = sorted((e.account_id, e.amount) for e in entries)
        want = sorted(
            [(transfer.debit_account, -transfer.amount), (transfer.credit_account, transfer.amount)]
        )
        if transfer.amount <= 0 or got != want:
            problems.append(f"transfer {transfer.id}: entries {got} != {want}")
    for orphan in legs:
        problems.append(f"entries for unknown transfer {orphan}")
    return problems


def _check_account(report: CheckReport, account: Account, entries: list[Entry]) -> int:
    """Replay one account's entries (in id order, the commit order) against its cached
    balance and version: the balance is their sum, the version their count, and an account
    that may not go negative never went below zero after any of them.

    Adds what is wrong to ``report.problems`` and returns the sum of the entries.
    """
    account_id = account.id
    running = 0
    dipped: tuple[int, int] | None = None  # (entry id, balance after it)
    for entry in entries:
        running += entry.amount
        if dipped is None and running < 0:
            dipped = (entry.id, running)
    if running != account.balance:
        report.problems.append(
            f"{account_id}: cached balance {account.balance}, entries give {running}"
        )
    if len(entries) != account.version:
        report.problems.append(f"{account_id}: version {account.version} != entry count")
    if not account.allow_negative and running < 0:
        report.problems.append(f"{account_id}: negative balance {running}")
    elif not account.allow_negative and dipped is not None:
        report.problems.append(
            f"{account_id}: balance {dipped[1]} after entry {dipped[0]}, below zero"
        )
    return running


def _sum_problems(totals: dict[str, int]) -> list[str]:
    """All accounts sum to zero and the funds received equal the value held."""
    problems: list[str] = []
    total = sum(totals.values())
    if total != 0:
        problems.append(f"accounts sum to {total}, not zero")
    received = funds_received(totals)
    held = funds_held(totals)
    if received != held:
        problems.append(
            f"funds received {received} != value held {held} (cards + merchant payables +"
            " payouts + pending refunds + held + floats + matched + awaiting return + returned)"
        )
    return problems


def derive_purchase_holds(totals: dict[str, int], holds: dict[str, int]) -> None:
    """Move the open purchase holds (:func:`open_holds_by_card`) in per-kind ``totals`` off
    the cards onto ``held``, where a hold transfer would have put them (the sum is the same)."""
    total = sum(holds.values())
    if total:
        totals["card"] = totals.get("card", 0) - total
        totals["held"] = totals.get("held", 0) + total


def _hold_problems(
    totals: dict[str, int], running: dict[str, int], holds: dict[str, int]
) -> list[str]:
    """Derive the purchase holds into ``totals`` and prove each card's account covers its
    open holds (what the hold transfer of old guaranteed: a card account never below zero)."""
    problems: list[str] = []
    for card_id, held in sorted(holds.items()):
        account_id = card_account(card_id)
        stored = running.get(account_id, 0)
        if stored < held:
            problems.append(f"{account_id}: open holds {held} exceed its balance {stored}")
    derive_purchase_holds(totals, holds)
    return problems


def _payment_status_problems(session: Session) -> list[str]:
    """The purchase holds are the payments' status, so a status changed behind settlement's
    back moves value without a transfer: a card whose open transaction names a payment that
    is no longer open (its hold vanished, the card looks richer), and an open payment that
    was captured already (its value counted twice)."""
    problems: list[str] = []
    vanished = (
        select(_CARDS.c.id, _PAYMENTS.c.id, _PAYMENTS.c.status)
        .select_from(_CARDS.join(_PAYMENTS, _PAYMENTS.c.id == _CARDS.c.open_transaction))
        .where(_PAYMENTS.c.status.not_in(OPEN))
        .order_by(_CARDS.c.id)
    )
    for card_id, payment_id, status in session.execute(vanished):
        problems.append(
            f"{card_account(card_id)}: its open transaction {payment_id} is {status},"
            " its hold is not counted"
        )
    captured = (
        select(_PAYMENTS.c.id, _PAYMENTS.c.status)
        .select_from(_PAYMENTS.join(_TRANSFERS, _TRANSFERS.c.reference == _PAYMENTS.c.id))
        .where(_PAYMENTS.c.status.in_(OPEN), _TRANSFERS.c.kind == "purchase_capture")
        .order_by(_PAYMENTS.c.id)
    )
    for payment_id, status in session.execute(captured):
        problems.append(f"payment {payment_id} is {status} but captured")
    return problems + _hold_row_problems(session)


def _reference_problems(session: Session) -> list[str]:
    """A purchase's rows name their merchant and card without a foreign key (migration
    0019: a referential check per row on hot rows), so the check proves the names: no
    payment names a merchant or a card that does not exist, no webhook event a merchant."""
    problems: list[str] = []
    checks = (
        ("payment", _PAYMENTS, _PAYMENTS.c.merchant_id, _MERCHANTS, "merchant"),
        ("payment", _PAYMENTS, _PAYMENTS.c.card_id, _CARDS, "card"),
        ("webhook event", _EVENTS, _EVENTS.c.merchant_id, _MERCHANTS, "merchant"),
    )
    for what, rows, named, target, kind in checks:
        unknown = (
            select(rows.c.id, named)
            .select_from(rows.outerjoin(target, target.c.id == named))
            .where(named.is_not(None), target.c.id.is_(None))
            .order_by(rows.c.id)
        )
        for row_id, name in session.execute(unknown):
            problems.append(f"{what} {row_id} names unknown {kind} {name}")
    return problems


def _hold_row_problems(session: Session) -> list[str]:
    """``payment_holds`` is the index of the open payments that ``available`` and the
    sweeps read: a row for each open payment, with its card and amount, and none for any
    other (a missing row lets the card spend its hold again; an extra one withholds value),
    and its ``authorised_at`` the payment's (the sweeps end a hold by the row's time).
    ``awaiting_card`` is likewise exactly the payments waiting for a card."""
    problems: list[str] = []
    missing = (
        select(_PAYMENTS.c.id, _PAYMENTS.c.status)
        .select_from(_PAYMENTS.outerjoin(_HOLDS, _HOLDS.c.payment_id == _PAYMENTS.c.id))
        .where(_PAYMENTS.c.status.in_(OPEN), _HOLDS.c.payment_id.is_(None))
        .order_by(_PAYMENTS.c.id)
    )
    for payment_id, status in session.execute(missing):
        problems.append(f"payment {payment_id} is {status} but has no hold row")
    extra = (
        select(_HOLDS.c.payment_id, _PAYMENTS.c.status)
        .select_from(_HOLDS.outerjoin(_PAYMENTS, _PAYMENTS.c.id == _HOLDS.c.payment_id))
        .where(or_(_PAYMENTS.c.id.is_(None), _PAYMENTS.c.status.not_in(OPEN)))
        .order_by(_HOLDS.c.payment_id)
    )
    for payment_id, status in session.execute(extra):
        problems.append(f"hold row for payment {payment_id}, which is {status or 'missing'}")
    held_at: Any = _HOLDS.c.authorised_at
    authorised_at: Any = _PAYMENTS.c.authorised_at
    if dialect_name(session) == "sqlite":  # text there: the instant, whatever its spelling
        held_at, authorised_at = func.julianday(held_at), func.julianday(authorised_at)
    other_time = held_at != authorised_at
    differ = (
        select(_HOLDS.c.payment_id)
        .select_from(_HOLDS.join(_PAYMENTS, _PAYMENTS.c.id == _HOLDS.c.payment_id))
        .where(
            or_(
                _HOLDS.c.card_id != _PAYMENTS.c.card_id,
                _PAYMENTS.c.card_id.is_(None),
                _HOLDS.c.amount != _PAYMENTS.c.amount,
                # the sweeps read the row's time: a later one would keep the card held
                and_(_PAYMENTS.c.authorised_at.is_not(None), other_time),
            )
        )
        .order_by(_HOLDS.c.payment_id)
    )
    for (payment_id,) in session.execute(differ):
        problems.append(f"hold row for payment {payment_id} differs from the payment")
    awaiting = (
        select(_PAYMENTS.c.id, _PAYMENTS.c.status)
        .where(
            or_(
                and_(
                    _PAYMENTS.c.awaiting_card.is_(True),
                    _PAYMENTS.c.status != Status.REQUIRES_CARD,
                ),
                and_(
                    _PAYMENTS.c.awaiting_card.is_(False),
                    _PAYMENTS.c.status == Status.REQUIRES_CARD,
                ),
            )
        )
        .order_by(_PAYMENTS.c.id)
    )
    for payment_id, status in session.execute(awaiting):
        problems.append(f"payment {payment_id} is {status} but its awaiting_card disagrees")
    return problems


def check(session: Session) -> CheckReport:
    """Recompute every balance from the entries and prove the ledger's invariants.

    - each transfer has exactly two entries, -amount and +amount, on its two accounts;
    - each account's cached balance is the sum of its entries and its cached version their
      count; replayed in id (commit) order, an account that may not go negative never went
      below zero;
    - no account that may not go negative is negative, and each card's account covers its
      open purchase holds (authorised or uncertain payments); the totals show the holds as
      ``held`` and the cards net of them, as when holds were transfers;
    - no card's open transaction is a payment that is not open, and no open payment was
      captured (a status changed behind settlement's back would move a hold unseen);
    - no entry names a transfer, no payment a merchant or card, no webhook event a merchant
      that does not exist (no foreign key guards them: migrations 0011, 0019);
    - all accounts sum to zero, and funds received (float deposits and bank statement
      credits, ``received``; ``funding``/``topups`` of old) equal the value held on cards,
      merchant payables, payouts, pending refunds, held amounts, unused floats, matched
      money not yet loaded, money awaiting return and money returned (ARCHITECTURE.md
      "Invariants");
    - ``refunds:pending`` holds exactly the pending refunds whose load is not in flight
      (none: a refund whose load ends without a credit fails), and no refund is pending
      with a load that ended (:func:`webpurse.settlement.refunds.open_refund_problems`).
    """
    report = CheckReport()
    accounts = {
        a.id: a for a in session.scalars(select(Account).execution_options(populate_existing=True))
    }
    report.accounts = len(accounts)
    report.transfers = session.scalar(select(func.count()).select_from(Transfer)) or 0

    legs: dict[str, list[Entry]] = defaultdict(list)
    per_account: dict[str, list[Entry]] = defaultdict(list)
    for entry in session.scalars(select(Entry).order_by(Entry.account_id, Entry.id)):
        legs[entry.transfer_id].append(entry)
        per_account[entry.account_id].append(entry)

    report.problems.extend(_transfer_problems(session, legs))
    running: dict[str, int] = {}
    for account_id, account in accounts.items():
        running[account_id] = _check_account(report, account, per_account.get(account_id, []))
        kind = account.kind
        report.totals[kind] = report.totals.get(kind, 0) + running[account_id]
    report.problems.extend(_hold_problems(report.totals, running, open_holds_by_card(session)))
    report.problems.extend(_payment_status_problems(session))
    report.problems.extend(_reference_problems(session))
    # No foreign key guards the account names (migration 0011): the check does.
    for account_id in sorted(set(per_account) - set(accounts)):
        report.problems.append(f"entries on unknown account {account_id}")
    report.problems.extend(_sum_problems(report.totals))
    report.problems.extend(open_refund_problems(session, balance(session, REFUNDS_PENDING)))
    return report
