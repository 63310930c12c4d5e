"""one ledger transfer per purchase: the hold is the payment's status, not a transfer

Until now a purchase posted a hold at authorise (``card:<id> → held:purchases``) and its
capture (``held:purchases → merchant:<id>``) or release (``held:purchases → card``): two
transfers, four entries and the hot ``held:purchases`` row locked by every batch (issue 20).
From here a purchase posts one transfer, at capture, ``card:<id> → merchant:<id>``;
authorise and release post nothing, and the held amounts are derived from the open
(``authorised``/``uncertain``) payments (``ledger.balance``, ``ledger.check``).

The data moves with it: each payment open now whose hold stands on ``held:purchases`` gets
that hold back on its card's account with a transfer ``held:purchases → card:<id>``
(``<payment id>:hold_restated``, ``…:2`` after a downgrade and upgrade again; kind
``purchase_hold_restated``), so the stored ``held:purchases`` is what the derivation does
not cover (0 in a ledger the code wrote) and every derived balance reads as before;
captured and released history stays as it is.
Downgrading posts the holds of the payments then open back onto ``held:purchases``
(``<payment id>:hold_restored``), where the two-transfer code expects them.

Revision ID: 0014_i20_one_transfer_purchase
Revises: 0013b_i20_slim_outbox
Create Date: 2026-12-06 10:45:00
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_i20_one_transfer_purchase"
down_revision: str | None = "0013b_i20_slim_outbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD = "held:purchases"
OPEN = ("authorised", "uncertain")

_accounts = sa.table(
    "ledger_accounts",
    sa.column("id", sa.String),
    sa.column("kind", sa.String),
    sa.column("currency", sa.String),
    sa.column("balance", sa.BigInteger),
    sa.column("version", sa.BigInteger),
    sa.column("allow_negative", sa.Boolean),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
_transfers = sa.table(
    "ledger_transfers",
    sa.column("id", sa.String),
    sa.column("debit_account", sa.String),
    sa.column("credit_account", sa.String),
    sa.column("amount", sa.BigInteger),
    sa.column("currency", sa.String),
    sa.column("kind", sa.String),
    sa.column("reference", sa.String),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
_entries = sa.table(
    "ledger_entries",
    sa.column("transfer_id", sa.String),
    sa.column("account_id", sa.String),
    sa.column("amount", sa.BigInteger),
    sa.column("balance_after", sa.BigInteger),
    sa.column("account_version", sa.BigInteger),
)
_payments = sa.table(
    "payments",
    sa.column("id", sa.String),
    sa.column("status", sa.String),
    sa.column("card_id", sa.String),
    sa.column("amount", sa.BigInteger),
    sa.column("currency", sa.String),
)


def _now(bind: sa.Connection) -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    return now.replace(tzinfo=None) if bind.dialect.name == "sqlite" else now


def _held_by_payment(bind: sa.Connection) -> dict[str, int]:
    """Each open payment's amount standing on ``held:purchases`` (its transfers' net there)."""
    rows = bind.execute(
        sa.select(_payments.c.id, sa.func.sum(_entries.c.amount))
        .select_from(
            _payments.join(_transfers, _transfers.c.reference == _payments.c.id).join(
                _entries, _entries.c.transfer_id == _transfers.c.id
            )
        )
        .where(_payments.c.status.in_(OPEN), _entries.c.account_id == HELD)
        .group_by(_payments.c.id)
        .order_by(_payments.c.id)
    )
    return {str(payment_id): int(net or 0) for payment_id, net in rows}


def _post(
    bind: sa.Connection,
    transfer_id: str,
    debit: str,
    credit: str,
    amount: int,
    currency: str,
    kind: str,
    reference: str,
) -> None:
    """One transfer, as ``ledger.post_transfer`` writes it."""
    for account_id in (debit, credit):
        exists = bind.execute(sa.select(_accounts.c.id).where(_accounts.c.id == account_id))
        if exists.first() is None:
            bind.execute(
                _accounts.insert().values(
                    id=account_id,
                    kind=account_id.split(":", 1)[0],
                    currency=currency,
                    balance=0,
                    version=0,
                    allow_negative=False,
                    created_at=_now(bind),
                )
            )
    rows = bind.execute(
        sa.select(_accounts.c.id, _accounts.c.balance, _accounts.c.version).where(
            _accounts.c.id.in_([debit, credit])
        )
    )
    accounts = {str(row.id): (int(row.balance), int(row.version)) for row in rows}
    bind.execute(
        _transfers.insert().values(
            id=transfer_id,
            debit_account=debit,
            credit_account=credit,
            amount=amount,
            currency=currency,
            kind=kind,
            reference=reference,
            created_at=_now(bind),
        )
    )
    for account_id, signed in ((debit, -amount), (credit, amount)):
        balance, version = accounts[account_id]
        bind.execute(
            _accounts.update()
            .where(_accounts.c.id == account_id)
            .values(balance=balance + signed, version=version + 1)
        )
        bind.execute(
            _entries.insert().values(
                transfer_id=transfer_id,
                account_id=account_id,
                amount=signed,
                balance_after=balance + signed,
                account_version=version + 1,
            )
        )


def _free_id(bind: sa.Connection, base: str) -> str:
    """``base``, or ``base:2``, ``base:3``… when an earlier upgrade or downgrade took it."""
    candidate, n = base, 1
    while bind.execute(sa.select(_transfers.c.id).where(_transfers.c.id == candidate)).first():
        n += 1
        candidate = f"{base}:{n}"
    return candidate


def _card_of(bind: sa.Connection, payment_id: str) -> tuple[str, str]:
    row = bind.execute(
        sa.select(_payments.c.card_id, _payments.c.currency).where(_payments.c.id == payment_id)
    ).one()
    return f"card:{row.card_id}", str(row.currency)


def upgrade() -> None:
    bind = op.get_bind()
    for payment_id, held in _held_by_payment(bind).items():
        if held <= 0:
            continue
        card, currency = _card_of(bind, payment_id)
        _post(
            bind,
            _free_id(bind, f"{payment_id}:hold_restated"),
            HELD,
            card,
            held,
            currency,
            "purchase_hold_restated",
            payment_id,
        )


def downgrade() -> None:
    bind = op.get_bind()
    held = _held_by_payment(bind)
    open_payments = bind.execute(
        sa.select(_payments.c.id, _payments.c.amount)
        .where(_payments.c.status.in_(OPEN), _payments.c.card_id.is_not(None))
        .order_by(_payments.c.id)
    ).all()
    for payment_id, amount in open_payments:
        missing = int(amount) - held.get(str(payment_id), 0)
        if missing <= 0:
            continue
        card, currency = _card_of(bind, str(payment_id))
        _post(
            bind,
            _free_id(bind, f"{payment_id}:hold_restored"),
            card,
            HELD,
            missing,
            currency,
            "purchase_hold",
            str(payment_id),
        )
