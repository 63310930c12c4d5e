"""terminal sequence numbers from a PostgreSQL SEQUENCE, not the merchant's row

Every authorisation took the next number with ``UPDATE merchants SET terminal_seq =
terminal_seq + n … RETURNING``: the merchant row was locked from mid-batch to the commit,
so a merchant's concurrent batches queued on it (issue 20). A SEQUENCE issues numbers
without a row lock and outside the transaction (a rolled-back batch leaves a gap, which
DEBIT FOR PURCHASE does not mind: a terminal's numbers must be unique and increasing).

One sequence serves every terminal. The data moves with it: it starts after the highest
number any terminal has issued, so no terminal ever gets a number again. On SQLite (one
writer at a time) the merchant row's counter stays the source (``merchants.terminal_seqs``).
Downgrading writes the sequence's last value back to every merchant row, so the row
counters continue past every number the sequence issued.

Revision ID: 0012_i20_terminal_seq_sequence
Revises: 0011_i20_lean_indexes
Create Date: 2026-12-06 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_i20_terminal_seq_sequence"
down_revision: str | None = "0011_i20_lean_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SEQUENCE = "terminal_seq"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    issued = bind.execute(sa.text("SELECT coalesce(max(terminal_seq), 0) FROM merchants"))
    start = int(issued.scalar_one()) + 1
    op.execute(sa.text(f"CREATE SEQUENCE {SEQUENCE} START WITH {start} MINVALUE 1"))


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(
        sa.text(
            "UPDATE merchants SET terminal_seq = greatest(terminal_seq, (SELECT CASE WHEN"
            " is_called THEN last_value ELSE last_value - 1 END FROM terminal_seq))"
        )
    )
    op.execute(sa.text("DROP SEQUENCE terminal_seq"))
