"""payments: no index on status; ledger: no foreign key to a hot account (issue 20)

Every purchase updates its payment twice (authorise, capture) and each update changes
``status``. A full index on it took an index insertion per update and served no query
that a narrower index does not serve better. What asked for a status in bulk:

- the expiry sweep and the holds pass, "open (authorised or uncertain) since before T":
  a partial index on ``authorised_at`` over just the open payments (a payment enters it
  when authorised and leaves it when captured, released or expired);
- the holds list, "canceled at the bound": a partial index on ``card_id`` over the
  payments whose ``decline_code`` is ``hold_expired`` (the sweep alone sets it);
- "waiting for a card" already has ``ix_payments_merchant_open``.

The three foreign keys from ``ledger_transfers`` and ``ledger_entries`` to
``ledger_accounts`` each cost a key-share lock on the account row per inserted row: on a
hot account (``held:purchases``, a merchant's payable) that is a lookup and a lock on the
row every batch of every merchant is updating. The ledger posts only to accounts it has
just read and locked (``ledger._lock``), and ``webpurse ledger check`` now reports an
entry or transfer naming an account that does not exist, so integrity is still proven.

No data moves: indexes and constraints only.

Revision ID: 0011_i20_lean_indexes
Revises: 0010_idempotency_key_index
Create Date: 2026-12-06 08:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_i20_lean_indexes"
down_revision: str | None = "0010_idempotency_key_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('authorised', 'uncertain')"
HOLD_EXPIRED = "decline_code = 'hold_expired'"
# 0001 created the foreign keys unnamed: PostgreSQL named them itself; SQLite's batch mode
# rebuilds the table and finds them by the names this convention gives them.
_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
_FOREIGN_KEYS = (
    ("ledger_transfers", "debit_account"),
    ("ledger_transfers", "credit_account"),
    ("ledger_entries", "account_id"),
)


def _fk_name(table: str, column: str) -> str:
    if op.get_bind().dialect.name == "postgresql":
        return f"{table}_{column}_fkey"
    return f"fk_{table}_{column}_ledger_accounts"


def upgrade() -> None:
    with op.batch_alter_table("payments") as batch:
        batch.create_index(
            "ix_payments_open_authorised",
            ["authorised_at"],
            postgresql_where=sa.text(OPEN),
            sqlite_where=sa.text(OPEN),
        )
        batch.create_index(
            "ix_payments_hold_expired",
            ["card_id"],
            postgresql_where=sa.text(HOLD_EXPIRED),
            sqlite_where=sa.text(HOLD_EXPIRED),
        )
        batch.drop_index("ix_payments_status")
    for table in ("ledger_transfers", "ledger_entries"):
        with op.batch_alter_table(table, naming_convention=_NAMING) as batch:
            for fk_table, column in _FOREIGN_KEYS:
                if fk_table == table:
                    batch.drop_constraint(_fk_name(table, column), type_="foreignkey")


def downgrade() -> None:
    for table in ("ledger_entries", "ledger_transfers"):
        with op.batch_alter_table(table, naming_convention=_NAMING) as batch:
            for fk_table, column in _FOREIGN_KEYS:
                if fk_table == table:
                    batch.create_foreign_key(
                        _fk_name(table, column), "ledger_accounts", [column], ["id"]
                    )
    with op.batch_alter_table("payments") as batch:
        batch.create_index("ix_payments_status", ["status"], unique=False)
        batch.drop_index("ix_payments_hold_expired")
        batch.drop_index("ix_payments_open_authorised")
