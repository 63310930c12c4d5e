"""card evidence: observations of unauthenticated mismatches, and fresh card checks

Revision ID: 0005_card_evidence
Revises: 0004_supersedes
Create Date: 2026-12-06 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_card_evidence"
down_revision: str | None = "0004_supersedes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "card_observations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("card_number", sa.String(length=20), nullable=False),
        sa.Column("merchant_id", sa.String(length=40), nullable=True),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("reference", sa.String(length=40), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_card_observations_card_number", "card_observations", ["card_number"])
    op.create_index("ix_card_observations_created_at", "card_observations", ["created_at"])
    op.create_table(
        "card_checks",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column("card_id", sa.String(length=40), sa.ForeignKey("cards.id"), nullable=False),
        sa.Column("merchant_id", sa.String(length=40), nullable=True),
        sa.Column("nonce", sa.String(length=12), nullable=False),
        sa.Column("shadow_balance", sa.BigInteger(), nullable=False),
        sa.Column("online_counter", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=40), nullable=True),
        sa.Column("verdict", sa.String(length=20), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_card_checks_card_id", "card_checks", ["card_id"])


def downgrade() -> None:
    op.drop_index("ix_card_checks_card_id", table_name="card_checks")
    op.drop_table("card_checks")
    op.drop_index("ix_card_observations_created_at", table_name="card_observations")
    op.drop_index("ix_card_observations_card_number", table_name="card_observations")
    op.drop_table("card_observations")
