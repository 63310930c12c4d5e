"""payments and loads: partial indexes of the requires_card rows per merchant (quotas)

Revision ID: 0008_open_orders
Revises: 0007_card_counter_index
Create Date: 2026-12-06 04:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_open_orders"
down_revision: str | None = "0007_card_counter_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN = sa.text("status = 'requires_card'")


def upgrade() -> None:
    for table in ("payments", "loads"):
        op.create_index(
            f"ix_{table}_merchant_open",
            table,
            ["merchant_id"],
            postgresql_where=_OPEN,
            sqlite_where=_OPEN,
        )


def downgrade() -> None:
    for table in ("loads", "payments"):
        op.drop_index(f"ix_{table}_merchant_open", table_name=table)
