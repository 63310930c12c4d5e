"""Funding of loads (issue 12): merchant floats, bank statements, exceptions (database side).

Value is never created: every load is funded by money settlement received.

- A merchant's **float** (``float:<merchant>``) is filled by deposits the operator records
  (``received:float_deposits`` → float, idempotent on the bank reference) and drawn by each
  ``merchant_float`` load in the same transaction as its hold, the float's ledger row locked
  (:func:`draw_float`): loads beyond it are refused, ``409 insufficient_float``.
- A **bank-transfer** order waits, ``requires_funding``, until an imported statement line pays
  its reference: :func:`import_statement` parses and checks the statement
  (:mod:`webpurse.settlement.statements`, pure), lets :func:`statements.plan` decide each
  credit line, and books it: matched → ``received:bank_transfers`` → ``matched:bank_transfers``
  → ``held:loads`` (the order becomes ``requires_card``, ``load.funded``); anything else →
  ``returns:awaiting`` and an exception for the operator, who marks it returned
  (→ ``returned:payers``) once the money went back.

The HTTP routes (``routes_funding``) and the CLI (``webpurse settlement float|statement``)
are thin visible of these functions.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from sqlalchemy import Select, Table, func, select
from sqlalchemy.orm import Session

from webpurse.settlement import events, ledger, references, statements
from webpurse.settlement.db import for_update, insert_ignoring_conflicts
from webpurse.settlement.errors import (
    Conflict,
    SettlementError,
    Unprocessable,
    conflict,
    not_found,
)
from webpurse.settlement.models import (
    BankStatement,
    FloatDeposit,
    Load,
    Merchant,
    StatementException,
    StatementLine,
    Transfer,
)
from webpurse.settlement.service import new_id
from webpurse.settlement.settings import Settings
from webpurse.settlement.transactions import Kind, Status, move
from webpurse.settlement.views import load_json

log = structlog.get_logger(__name__)

_DEPOSITS: Table = FloatDeposit.__table__  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class FundingPolicy:
    """The funding settings an operation needs (from :class:`Settings`)."""

    settlement_account: str = Settings.settlement_account
    bank_transfer_ttl: dt.timedelta = Settings.bank_transfer_ttl
    float_low_threshold: int = Settings.float_low_threshold

    @classmethod
    def from_settings(cls, settings: Settings) -> FundingPolicy:
        return cls(
            settlement_account=settings.settlement_account,
            bank_transfer_ttl=settings.bank_transfer_ttl,
            float_low_threshold=settings.float_low_threshold,
        )


# --- floats --------------------------------------------------------------------------


def float_json(session: Session, merchant_id: str, policy: FundingPolicy) -> dict[str, Any]:
    return {
        "object": "float",
        "merchant": merchant_id,
        "currency": "CNY",
        "balance": ledger.balance(session, ledger.float_account(merchant_id)),
        "low_threshold": policy.float_low_threshold,
    }


def deposit_json(deposit: FloatDeposit) -> dict[str, Any]:
    return {
        "id": deposit.id,
        "object": "float_deposit",
        "merchant": deposit.merchant_id,
        "amount": deposit.amount,
        "currency": deposit.currency,
        "bank_reference": deposit.bank_reference,
        "created_at": deposit.created_at.isoformat(),
    }


def record_deposit(
    session: Session,
    merchant_id: str,
    amount: int,
    bank_reference: str,
    now: dt.datetime,
    currency: str = "CNY",
) -> tuple[FloatDeposit, bool]:
    """Book a deposit into the merchant's float once: (the deposit, whether it is new).

    The bank reference is the deposit's identity: the same reference again with the same
    merchant and amount is the same deposit (nothing changes); with anything else it is
    refused, ``409 deposit_conflict``. Two racing inserts of one reference: PostgreSQL
    makes the second wait for the first and then insert nothing, so it finds the first.
    """
    if session.get(Merchant, merchant_id) is None:
        raise not_found("merchant", "merchant_id")
    row: dict[str, object] = {
        "id": new_id("fdep"),
        "merchant_id": merchant_id,
        "amount": amount,
        "currency": currency,
        "bank_reference": bank_reference,
        "created_at": now,
    }
    inserted = session.execute(
        insert_ignoring_conflicts(session, _DEPOSITS, [row]).returning(_DEPOSITS.c.id)
    ).first()
    if inserted is None:
        existing = session.scalars(
            select(FloatDeposit)
            .where(FloatDeposit.bank_reference == bank_reference)
            .execution_options(populate_existing=True)
        ).one()
        if (existing.merchant_id, existing.amount, existing.currency) != (
            merchant_id,
            amount,
            currency,
        ):
            log.warning(
                "float.deposit_conflict", bank_reference=bank_reference, merchant=merchant_id
            )
            raise conflict(
                "deposit_conflict",
                f"bank reference {bank_reference} was recorded as a deposit of"
                f" {existing.amount} fen for {existing.merchant_id}",
            )
        return existing, False
    deposit = session.get(FloatDeposit, str(row["id"]))
    assert deposit is not None
    ledger.post_transfer(
        session,
        deposit.id,
        ledger.RECEIVED_FLOAT_DEPOSITS,
        ledger.float_account(merchant_id),
        amount,
        "float_deposit",
        now=now,
        reference=deposit.id,
        currency=currency,
    )
    log.info("float.deposit", merchant=merchant_id, amount=amount, deposit=deposit.id)
    return deposit, True


def draw_float(
    session: Session,
    load: Load,
    now: dt.datetime,
    low_threshold: int,
) -> None:
    """Hold ``load``'s amount from its merchant's float, or refuse: 409 ``insufficient_float``.

    The float's ledger row is locked first (``SELECT … FOR UPDATE`` on PostgreSQL) and the
    decision is taken on the locked balance, so concurrent loads queue: together they
    never draw more than the float holds. A refusal rolls the whole request back.
    """
    assert load.merchant_id is not None
    account = ledger.float_account(load.merchant_id)
    balance = ledger.locked_balance(session, account, now)
    if balance < load.amount:
        log.info("load.insufficient_float", merchant=load.merchant_id, amount=load.amount)
        raise conflict(
            "insufficient_float",
            f"the merchant's float holds {balance} fen, less than the load's {load.amount} fen",
            extra={"float_balance": balance},
        )
    ledger.post_transfer(
        session,
        f"{load.id}:hold",
        account,
        ledger.HELD_LOADS,
        load.amount,
        "load_hold",
        now=now,
        reference=load.id,
    )
    after = balance - load.amount
    if after < low_threshold <= balance:
        events.emit(
            session,
            load.merchant_id,
            "float.low",
            {
                "object": "float",
                "merchant": load.merchant_id,
                "currency": "CNY",
                "balance": after,
                "low_threshold": low_threshold,
            },
            now=now,
        )
        log.info("float.low", merchant=load.merchant_id, balance=after)


# --- bank statements -----------------------------------------------------------------


S = TypeVar("S", bound="Select[Any]")


def _lock_rows(session: Session, stmt: S) -> S:
    if for_update(session):
        stmt = stmt.with_for_update()
    return stmt.execution_options(populate_existing=True)


def _orders(session: Session, lines: tuple[statements.Line, ...]) -> dict[str, Load]:
    refs: set[str] = set()
    for line in lines:
        valid, _ = references.find_in(line.remittance)
        refs.update(valid)
    if not refs:
        return {}
    rows = session.scalars(
        _lock_rows(
            session,
            select(Load)
            .where(Load.funding_method == "bank_transfer", Load.funding_reference.in_(refs))
            .order_by(Load.id),
        )
    )
    return {load.funding_reference: load for load in rows}


def _open_deposits(session: Session, lines: tuple[statements.Line, ...]) -> dict[str, int]:
    """Recorded float deposits these lines may be, not yet seen on an earlier statement."""
    refs = {line.bank_reference for line in lines if line.amount > 0 and line.bank_reference}
    if not refs:
        return {}
    seen = set(
        session.scalars(
            select(StatementLine.bank_reference).where(
                StatementLine.outcome == "float_deposit", StatementLine.bank_reference.in_(refs)
            )
        )
    )
    rows = session.scalars(select(FloatDeposit).where(FloatDeposit.bank_reference.in_(refs)))
    return {d.bank_reference: d.amount for d in rows if d.bank_reference not in seen}


def exception_json(exc: StatementException) -> dict[str, Any]:
    return {
        "id": exc.id,
        "object": "statement_exception",
        "kind": exc.kind,
        "amount": exc.amount,
        "currency": exc.currency,
        "reference": exc.reference,
        "load": exc.load_id,
        "line": exc.line_id,
        "payer": exc.payer,
        "detail": exc.detail,
        "status": exc.status,
        "return_reference": exc.return_reference,
        "returned_at": exc.returned_at.isoformat() if exc.returned_at else None,
        "created_at": exc.created_at.isoformat(),
    }


def add_exception(
    session: Session,
    *,
    kind: statements.Exceptional,
    amount: int,
    now: dt.datetime,
    debit_account: str,
    transfer_id: str,
    line: StatementLine | None = None,
    reference: str | None = None,
    load_id: str | None = None,
    detail: str = "",
) -> StatementException:
    """List money that funds nothing for the operator; it waits in ``returns:awaiting``."""
    exc = StatementException(
        id=new_id("sexc"),
        line_id=line.id if line is not None else None,
        kind=kind.value,
        amount=amount,
        currency="CNY",
        reference=reference,
        load_id=load_id,
        payer=line.payer if line is not None else "",
        detail=detail,
        status="awaiting_return",
        created_at=now,
    )
    session.add(exc)
    ledger.post_transfer(
        session,
        transfer_id,
        debit_account,
        ledger.RETURNS_AWAITING,
        amount,
        "awaiting_return",
        now=now,
        reference=exc.id,
    )
    log.info("statement.exception", kind=kind.value, amount=amount, exception=exc.id)
    return exc


def _fund(session: Session, load: Load, line: StatementLine, now: dt.datetime) -> None:
    """The line paid the order: received → matched → held, and the order waits for its card."""
    ledger.post_transfer(
        session,
        f"{line.id}:received",
        ledger.RECEIVED_BANK_TRANSFERS,
        ledger.MATCHED_BANK_TRANSFERS,
        line.amount,
        "statement_credit",
        now=now,
        reference=line.id,
    )
    ledger.post_transfer(
        session,
        f"{load.id}:hold",
        ledger.MATCHED_BANK_TRANSFERS,
        ledger.HELD_LOADS,
        load.amount,
        "load_hold",
        now=now,
        reference=load.id,
    )
    move(Kind.LOAD, load, Status.REQUIRES_CARD)
    load.expires_at = None
    load.updated_at = now
    events.emit(session, load.merchant_id, "load.funded", load_json(load), now=now)
    log.info("load.funded", load=load.id, line=line.id)


def _outcome(decision: statements.Decision | None) -> str:
    if decision is None:
        return "debit"
    if decision.deposit is not None:
        return "float_deposit"
    return "matched" if decision.matched else "exception"


def _statement_error(error: statements.StatementError) -> SettlementError:
    """A statement refused as a whole: 409 if it clashes with what was imported, else 422."""
    log.warning("statement.refused", code=error.code, detail=error.detail)
    refusal = {409: Conflict, 422: Unprocessable}[error.status]
    return refusal(error.detail, code=error.code)


def next_statement(session: Session, account: str) -> tuple[int, int]:
    """(number, opening balance) the next statement of ``account`` must have: what a demo or
    a test writing a statement file needs (the bank numbers them; imports check the chain)."""
    last = session.scalars(
        select(BankStatement)
        .where(BankStatement.account == statements.normalise_account(account))
        .order_by(BankStatement.number.desc())
        .limit(1)
    ).first()
    return (last.number + 1, last.closing_balance) if last is not None else (1, 0)


def _parse(text: str, fmt: str, policy: FundingPolicy) -> statements.Statement:
    """The statement, parsed and checked on its own (no database)."""
    try:
        statement = statements.parse(text, fmt)
        statements.check(statement, account=policy.settlement_account)
    except statements.StatementError as error:
        raise _statement_error(error) from None
    return statement


def _imported_before(
    session: Session, account: str, statement: statements.Statement
) -> dict[str, Any] | None:
    """The summary of this statement if it was imported before; None if it is the next one
    of the account's chain. Refuses other content under a known number, a gap in the
    numbers, or an opening balance that is not the previous statement's closing balance."""
    known = session.scalars(
        select(BankStatement).where(
            BankStatement.account == account, BankStatement.number == statement.number
        )
    ).first()
    if known is not None:
        if known.digest != statement.digest:
            raise _statement_error(
                statements.StatementError(
                    "statement_conflict",
                    f"statement {statement.number} of {account} was imported with other content",
                    409,
                )
            )
        return dict(known.summary)
    last = session.scalar(
        select(func.max(BankStatement.number)).where(BankStatement.account == account)
    )
    if last is None:
        return None
    if statement.number != last + 1:
        raise _statement_error(
            statements.StatementError(
                "statement_gap",
                f"statement {statement.number}: the next statement of {account} is {last + 1}",
                409,
            )
        )
    previous = session.scalars(
        select(BankStatement).where(BankStatement.account == account, BankStatement.number == last)
    ).one()
    if previous.closing_balance != statement.opening_balance:
        raise _statement_error(
            statements.StatementError(
                "statement_opening_mismatch",
                f"opening balance {statement.opening_balance} fen, but statement {last}"
                f" closed at {previous.closing_balance} fen",
            )
        )
    return None


def _plan(
    session: Session, statement: statements.Statement, orders: dict[str, Load], now: dt.datetime
) -> dict[int, statements.Decision]:
    """What each credit line does (:func:`statements.plan`), by line number."""
    plan = statements.plan(
        statement.lines,
        {
            ref: statements.Order(
                load_id=load.id,
                amount=load.amount,
                status=load.status,
                expires_at=load.expires_at,
                funded=session.get(Transfer, f"{load.id}:hold") is not None,
            )
            for ref, load in orders.items()
        },
        now,
        _open_deposits(session, statement.lines),
    )
    return {decision.line.line_no: decision for decision in plan}


@dataclass
class _Summary:
    """What an import did, line by line: the ``statement_import`` object's lists."""

    matched: list[dict[str, Any]]
    exceptions: list[dict[str, Any]]
    deposits: list[dict[str, Any]]
    debits: int = 0


def _book_line(
    session: Session,
    record: BankStatement,
    line: statements.Line,
    decision: statements.Decision | None,
    loads: dict[str, Load],
    summary: _Summary,
    now: dt.datetime,
) -> None:
    """Store one statement line and book what its decision says; note it in ``summary``."""
    row = StatementLine(
        id=new_id("sline"),
        statement_id=record.id,
        line_no=line.line_no,
        amount=line.amount,
        booked_on=line.booked_on,
        bank_reference=line.bank_reference,
        payer=line.payer,
        remittance=line.remittance,
        reference=decision.reference if decision else None,
        outcome=_outcome(decision),
        load_id=decision.load_id if decision else None,
    )
    session.add(row)
    session.flush()
    if decision is None:
        summary.debits += 1
        return
    if decision.deposit is not None:  # booked when the operator recorded it
        summary.deposits.append({"line": line.line_no, "bank_reference": decision.deposit})
        return
    if decision.matched:
        assert decision.load_id is not None
        _fund(session, loads[decision.load_id], row, now)
        summary.matched.append(
            {
                "line": line.line_no,
                "load": decision.load_id,
                "reference": decision.reference,
                "amount": line.amount,
            }
        )
        return
    assert decision.exception is not None
    exc = add_exception(
        session,
        kind=decision.exception,
        amount=line.amount,
        now=now,
        debit_account=ledger.RECEIVED_BANK_TRANSFERS,
        transfer_id=f"{row.id}:received",
        line=row,
        reference=decision.reference,
        load_id=decision.load_id,
        detail=decision.detail,
    )
    summary.exceptions.append(
        {
            "id": exc.id,
            "kind": exc.kind,
            "line": line.line_no,
            "amount": line.amount,
            "reference": decision.reference,
            "load": decision.load_id,
        }
    )


def import_statement(
    session: Session, text: str, fmt: str, policy: FundingPolicy, now: dt.datetime
) -> tuple[dict[str, Any], bool]:
    """Import one statement in the caller's transaction: (its summary, whether it is new).

    A statement settlement refuses raises a :mod:`~.errors` refusal before anything is written.
    """
    statement = _parse(text, fmt, policy)
    account = statements.normalise_account(statement.account)
    # One import at a time: every import (and nothing else) posts from this account.
    ledger.locked_balance(session, ledger.RECEIVED_BANK_TRANSFERS, now)
    before = _imported_before(session, account, statement)
    if before is not None:
        return before, False
    record = BankStatement(
        id=new_id("stmt"),
        account=account,
        number=statement.number,
        format=fmt,
        currency=statement.currency,
        opening_balance=statement.opening_balance,
        closing_balance=statement.closing_balance,
        digest=statement.digest,
        summary={},
        created_at=now,
    )
    session.add(record)
    session.flush()
    orders = _orders(session, statement.lines)
    decided = _plan(session, statement, orders, now)
    loads = {load.id: load for load in orders.values()}
    done = _Summary(matched=[], exceptions=[], deposits=[])
    for line in statement.lines:
        _book_line(session, record, line, decided.get(line.line_no), loads, done, now)
    summary = {
        "object": "statement_import",
        "statement_id": record.id,
        "account": account,
        "number": statement.number,
        "matched": done.matched,
        "exceptions": done.exceptions,
        "float_deposits": done.deposits,
        "debits": done.debits,
    }
    record.summary = summary
    log.info(
        "statement.imported",
        statement=record.id,
        number=statement.number,
        matched=len(done.matched),
        exceptions=len(done.exceptions),
    )
    return summary, True


# --- exceptions ----------------------------------------------------------------------


def list_exceptions(session: Session, status: str | None = None) -> list[StatementException]:
    stmt = select(StatementException)
    if status is not None:
        stmt = stmt.where(StatementException.status == status)
    return list(
        session.scalars(stmt.order_by(StatementException.created_at, StatementException.id))
    )


def return_exception(
    session: Session, exception_id: str, return_reference: str, now: dt.datetime
) -> StatementException:
    """Record that the money of an exception went back to its payer (idempotent)."""
    exc = session.scalars(
        _lock_rows(session, select(StatementException).where(StatementException.id == exception_id))
    ).first()
    if exc is None:
        raise not_found("statement exception", "id")
    if exc.status == "returned":
        if exc.return_reference != return_reference:
            raise conflict(
                "exception_returned",
                f"already returned with bank reference {exc.return_reference}",
            )
        return exc
    ledger.post_transfer(
        session,
        f"{exc.id}:returned",
        ledger.RETURNS_AWAITING,
        ledger.RETURNED_PAYERS,
        exc.amount,
        "returned_to_payer",
        now=now,
        reference=exc.id,
    )
    exc.status = "returned"
    exc.return_reference = return_reference
    exc.returned_at = now
    log.info("statement.exception_returned", exception=exc.id, amount=exc.amount)
    return exc
