"""payments: no index names the status, so a capture is a HOT update (issue 20)

A purchase updates its payment twice. PostgreSQL writes an update HOT (on the row's own
page, no new index entry) only when no indexed column changed, and a column an index
predicate names counts: ``ix_payments_merchant_open`` (``status = 'requires_card'``) and
``ix_payments_open_authorised`` (``status IN ('authorised', 'uncertain')``) made every
status change, so every purchase's two updates, non-HOT (0 of 8,170 in a 512-shopper
window). The authorise sets the card and its counter, which ``ix_payments_card_counter``
indexes, so it stays non-HOT; the capture changes only the status, MAC2, TAC and times.

- The open holds move to ``payment_holds`` (payment, card, amount, authorised_at): a row
  inserted when a payment is authorised and deleted when its hold ends, in the transaction
  that changes the status. ``ledger.available`` sums a card's rows by
  ``ix_payment_holds_card`` (before: every open payment of every card was read), the
  sweeps find old holds by ``ix_payment_holds_authorised``, and ``webpurse ledger check``
  proves the rows are exactly the open payments.
- "Waiting for a card" is a flag, ``awaiting_card``, set at create and cleared by whatever
  ends the wait (authorise, decline, cancel, expiry): ``ix_payments_merchant_open`` names
  it instead of the status. The capture does not touch it.
- Each page of ``payments`` keeps 20 % free (fillfactor 80) for the capture's new row
  version; existing pages are not rewritten (as migration 0017 for the cards).

Existing data moves: the flag is set on the payments waiting for a card, and every open
payment gets its hold row. Downgrading puts the status indexes back and drops both.

Revision ID: 0018_i20_payment_holds
Revises: 0017_i20_hot_payments
Create Date: 2026-12-06 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_i20_payment_holds"
down_revision: str | None = "0017_i20_hot_payments"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = 80
OPEN = "status IN ('authorised', 'uncertain')"
REQUIRES_CARD = "status = 'requires_card'"
_PAYMENTS = sa.table(
    "payments",
    sa.column("id", sa.String),
    sa.column("status", sa.String),
    sa.column("awaiting_card", sa.Boolean),
)


def _postgresql() -> bool:
    return op.get_bind().dialect.name == "postgresql"


def upgrade() -> None:
    op.add_column(
        "payments",
        sa.Column("awaiting_card", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.execute(
        _PAYMENTS.update()
        .where(_PAYMENTS.c.status == "requires_card")
        .values(awaiting_card=sa.true())
    )
    op.drop_index("ix_payments_merchant_open", table_name="payments")
    op.create_index(
        "ix_payments_merchant_open",
        "payments",
        ["merchant_id"],
        postgresql_where=sa.text("awaiting_card"),
        sqlite_where=sa.text("awaiting_card = 1"),
    )
    op.create_table(
        "payment_holds",
        sa.Column("payment_id", sa.String(40), primary_key=True),
        sa.Column("card_id", sa.String(40), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("authorised_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_payment_holds_card", "payment_holds", ["card_id"])
    op.create_index("ix_payment_holds_authorised", "payment_holds", ["authorised_at"])
    op.execute(
        "INSERT INTO payment_holds (payment_id, card_id, amount, authorised_at)"
        " SELECT id, card_id, amount, COALESCE(authorised_at, updated_at) FROM payments"
        " WHERE status IN ('authorised', 'uncertain') AND card_id IS NOT NULL"
    )
    op.drop_index("ix_payments_open_authorised", table_name="payments")
    if _postgresql():
        op.execute(f"ALTER TABLE payments SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if _postgresql():
        op.execute("ALTER TABLE payments RESET (fillfactor)")
    op.create_index(
        "ix_payments_open_authorised",
        "payments",
        ["authorised_at"],
        postgresql_where=sa.text(OPEN),
        sqlite_where=sa.text(OPEN),
    )
    op.drop_index("ix_payment_holds_authorised", table_name="payment_holds")
    op.drop_index("ix_payment_holds_card", table_name="payment_holds")
    op.drop_table("payment_holds")
    op.drop_index("ix_payments_merchant_open", table_name="payments")
    op.create_index(
        "ix_payments_merchant_open",
        "payments",
        ["merchant_id"],
        postgresql_where=sa.text(REQUIRES_CARD),
        sqlite_where=sa.text(REQUIRES_CARD),
    )
    with op.batch_alter_table("payments") as batch:
        batch.drop_column("awaiting_card")
