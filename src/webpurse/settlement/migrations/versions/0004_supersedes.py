"""payments and loads: the uncertain one at the same counter each supersedes

Revision ID: 0004_supersedes
Revises: 0003_clearing_topups
Create Date: 2026-11-27 14:25:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_supersedes"
down_revision: str | None = "0003_clearing_topups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("payments", "loads"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("supersedes", sa.String(length=40), nullable=True))


def downgrade() -> None:
    for table in ("loads", "payments"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("supersedes")
