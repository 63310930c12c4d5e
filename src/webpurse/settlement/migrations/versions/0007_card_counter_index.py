"""payments and loads: an index on (card_id, counter)

Looking up a card's transactions at one counter is now on hot paths: every completed load
releases the card's other open loads at its counter, an authorisation checks whether its
merchant's hold of the card at that counter was released at the bound, a batch does it for
all its cards at once (holds.py, issue 19).

Revision ID: 0007_card_counter_index
Revises: 0006_funding
Create Date: 2026-12-06 04:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_card_counter_index"
down_revision: str | None = "0006_funding"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("payments", "loads"):
        with op.batch_alter_table(table) as batch:
            batch.create_index(f"ix_{table}_card_counter", ["card_id", "counter"], unique=False)


def downgrade() -> None:
    for table in ("loads", "payments"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_card_counter")
