"""funding: merchant float deposits, bank statements, their lines and exceptions

Loads gain ``expires_at`` (an unpaid bank-transfer order expires) and an index on
``funding_reference`` (a statement line finds its order by the payment reference).

Revision ID: 0006_funding
Revises: 0005_card_evidence
Create Date: 2026-12-06 04:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_funding"
down_revision: str | None = "0005_card_evidence"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("loads") as batch:
        batch.add_column(sa.Column("expires_at", _TZ, nullable=True))
        batch.create_index("ix_loads_funding_reference", ["funding_reference"])
    op.create_table(
        "float_deposits",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("merchant_id", sa.String(40), sa.ForeignKey("merchants.id"), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("bank_reference", sa.String(100), nullable=False, unique=True),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_index("ix_float_deposits_merchant_id", "float_deposits", ["merchant_id"])
    op.create_table(
        "bank_statements",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(8), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("opening_balance", sa.BigInteger(), nullable=False),
        sa.Column("closing_balance", sa.BigInteger(), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.UniqueConstraint("account", "number"),
    )
    op.create_table(
        "statement_lines",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column(
            "statement_id", sa.String(40), sa.ForeignKey("bank_statements.id"), nullable=False
        ),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("booked_on", sa.Date(), nullable=False),
        sa.Column("bank_reference", sa.String(100), nullable=False),
        sa.Column("payer", sa.String(200), nullable=False),
        sa.Column("remittance", sa.Text(), nullable=False),
        sa.Column("reference", sa.String(40), nullable=True),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("load_id", sa.String(40), nullable=True),
        sa.UniqueConstraint("statement_id", "line_no"),
    )
    op.create_index("ix_statement_lines_statement_id", "statement_lines", ["statement_id"])
    op.create_index("ix_statement_lines_load_id", "statement_lines", ["load_id"])
    op.create_table(
        "statement_exceptions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("line_id", sa.String(40), sa.ForeignKey("statement_lines.id"), nullable=True),
        sa.Column("kind", sa.String(24), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("reference", sa.String(40), nullable=True),
        sa.Column("load_id", sa.String(40), nullable=True),
        sa.Column("payer", sa.String(200), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("return_reference", sa.String(100), nullable=True),
        sa.Column("returned_at", _TZ, nullable=True),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_index("ix_statement_exceptions_status", "statement_exceptions", ["status"])


def downgrade() -> None:
    op.drop_index("ix_statement_exceptions_status", "statement_exceptions")
    op.drop_table("statement_exceptions")
    op.drop_index("ix_statement_lines_load_id", "statement_lines")
    op.drop_index("ix_statement_lines_statement_id", "statement_lines")
    op.drop_table("statement_lines")
    op.drop_table("bank_statements")
    op.drop_index("ix_float_deposits_merchant_id", "float_deposits")
    op.drop_table("float_deposits")
    with op.batch_alter_table("loads") as batch:
        batch.drop_index("ix_loads_funding_reference")
        batch.drop_column("expires_at")
