"""payments: room on each page for a whole batch's authorise and capture (fillfactor 30)

A purchase updates its payment twice, in two later batches: the authorise (card, counter,
MAC1, …) and the capture (status, MAC2, TAC, times). A batch creates its payments with one
INSERT, so a page of ``payments`` holds rows of one or two batches, and the next batch
authorises all of them in one statement: every row of the page needs room for its new
version at once. Filled to 80 % (migration 0018) a page had room for a quarter of them;
the rest went to other pages and into every index, and the capture that followed was HOT
for the rows that had stayed: 37 % of the captures in a 512-shopper window (38.6 % in a
replay of the batch's statements, 85 purchases a batch, ``/work/exp`` of issue 20).
Filled to 30 % a page has room for both new versions of all its rows (the authorise's
dead ones are pruned before the capture needs the room): every capture is HOT, and the
statements read 8 fewer buffers a purchase (46.2 → 38.1 in the replay).

The authorise itself stays non-HOT: it sets ``card_id`` and ``counter``
(``ix_payments_card_counter``, ``ix_payments_hold_expired``) and clears ``awaiting_card``
(``ix_payments_merchant_open``'s predicate). Moving all three indexes off the row (an
append-only ``card_purchases`` and a ``payment_waits`` table) made it HOT, but the two
tables' own inserts and delete cost what the HOT update saved (same replay).

The cost is room: a page never holds more than 30 % of new rows, so the table takes about
2.7 times the space of the same rows at 80 %. Existing pages are not rewritten (as 0017).
SQLite has no fillfactor: nothing changes there.

Revision ID: 0021_i20_payments_room
Revises: 0019_i20_no_hot_fks
Create Date: 2026-12-06 17:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0021_i20_payments_room"
down_revision: str | None = "0019_i20_no_hot_fks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FILLFACTOR = 30
BEFORE = 80  # migration 0018's


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE payments SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE payments SET (fillfactor = {BEFORE})")
