"""No foreign-key check on a purchase's hot inserts and updates (issue 20)

Every row a purchase writes into these columns fired a referential check: a lookup of the
named row and a key-share lock on it (``SELECT 1 … FOR KEY SHARE``), per row, inside the
statement. Measured with ``pg_stat_statements`` (512 batched shoppers, per purchase):

- ``ledger_entries.transfer_id`` → ``ledger_transfers``: two checks per purchase, each
  locking a transfer row its own statement had just inserted (a WAL record for the lock);
- ``payments.merchant_id`` and ``webhook_events.merchant_id`` → ``merchants``: the
  merchant's one row, key-share locked by every batch of every server process (a hot
  row: concurrent lockers share it through a multixact);
- ``payments.card_id`` → ``cards``: the card the batch already holds locked FOR UPDATE.

Settlement writes these columns only with rows it has just read (or inserted) in the same
transaction, and none of the named rows is ever deleted. ``webpurse ledger check`` proves
what the constraints guarded: an entry naming no transfer (as before), and now a payment
naming no merchant or card and a webhook event naming no merchant.

No data moves: constraints only.

Revision ID: 0019_i20_no_hot_fks
Revises: 0018_i20_payment_holds
Create Date: 2026-12-06 17:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0019_i20_no_hot_fks"
down_revision: str | None = "0018_i20_payment_holds"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 0001 and 0002 created the foreign keys unnamed: PostgreSQL named them itself; SQLite's
# batch mode rebuilds the table and finds them by the names this convention gives them.
_NAMING = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
# (table, column, referred table)
_FOREIGN_KEYS = (
    ("ledger_entries", "transfer_id", "ledger_transfers"),
    ("payments", "merchant_id", "merchants"),
    ("payments", "card_id", "cards"),
    ("webhook_events", "merchant_id", "merchants"),
)
_TABLES = ("ledger_entries", "payments", "webhook_events")


def _fk_name(table: str, column: str, referred: str) -> str:
    if op.get_bind().dialect.name == "postgresql":
        return f"{table}_{column}_fkey"
    return f"fk_{table}_{column}_{referred}"


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, naming_convention=_NAMING) as batch:
            for fk_table, column, referred in _FOREIGN_KEYS:
                if fk_table == table:
                    batch.drop_constraint(_fk_name(table, column, referred), type_="foreignkey")


def downgrade() -> None:
    for table in reversed(_TABLES):
        with op.batch_alter_table(table, naming_convention=_NAMING) as batch:
            for fk_table, column, referred in _FOREIGN_KEYS:
                if fk_table == table:
                    batch.create_foreign_key(
                        _fk_name(table, column, referred), referred, [column], ["id"]
                    )
