"""clearing batches: where each stopped on the payable and the top-up receivable

Batches take movements by commit order (entry versions), not by the clock a request read:
each records the last version it took on the merchant's payable and top-up receivable.
Batches written before this revision get, as their marks, the last version of each account
among the movements stamped no later than the batch itself.

Revision ID: 0009_clearing_marks
Revises: 0008_open_orders
Create Date: 2026-12-06 05:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_clearing_marks"
down_revision: str | None = "0008_open_orders"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MARK = """
UPDATE clearing_batches SET {column} = (
    SELECT max(e.account_version)
    FROM ledger_entries e JOIN ledger_transfers t ON t.id = e.transfer_id
    WHERE e.account_id = '{prefix}:' || clearing_batches.merchant_id
      AND t.created_at <= clearing_batches.created_at
)
"""


def upgrade() -> None:
    with op.batch_alter_table("clearing_batches") as batch:
        batch.add_column(sa.Column("payable_version", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("topups_version", sa.BigInteger(), nullable=True))
    op.execute(_MARK.format(column="payable_version", prefix="merchant"))
    op.execute(_MARK.format(column="topups_version", prefix="topups"))


def downgrade() -> None:
    with op.batch_alter_table("clearing_batches") as batch:
        batch.drop_column("topups_version")
        batch.drop_column("payable_version")
