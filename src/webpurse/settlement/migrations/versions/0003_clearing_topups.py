"""clearing batches: the top-ups a merchant sold (netted against its payable)

Revision ID: 0003_clearing_topups
Revises: 0002_webhooks_clearing
Create Date: 2026-11-27 14:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_clearing_topups"
down_revision: str | None = "0002_webhooks_clearing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("clearing_batches") as batch:
        batch.add_column(sa.Column("topup_count", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(
            sa.Column("topup_total", sa.BigInteger(), server_default="0", nullable=False)
        )
        batch.add_column(
            sa.Column("topups_settled", sa.BigInteger(), server_default="0", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("clearing_batches") as batch:
        batch.drop_column("topups_settled")
        batch.drop_column("topup_total")
        batch.drop_column("topup_count")
