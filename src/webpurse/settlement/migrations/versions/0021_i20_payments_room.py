"""payments: room on each page for a whole batch's authorise and capture (fillfactor 30)

A purchase updates its payment twice, in two later batches than the one that created it:
the authorise (card, counter, MAC1, …) and the capture (status, MAC2, TAC, times). A batch
creates its payments with one INSERT, so a page of ``payments`` holds rows of one or two
batches, and a later batch updates all of them in one statement: every row of the page
needs room for a new version at once. Filled to 80 % (migration 0018) a page had room for
a quarter of them; the rest went to other pages and into every index, and only the
captures of rows that had stayed were HOT: 18.7 % of the payments' updates in a
512-shopper window (``bench versions``, a private PostgreSQL with pg_stat_statements, 4
interleaved rounds), i.e. 37 % of the captures. Filled to 30 %: 49.5 % (98 % of the
captures); the capture's UPDATE 24.0 → 11.6 µs and 15.4 → 7.3 buffer hits a purchase,
the capture's read of its payments' cards by id 71.6 → 8.9 µs and 12.4 → 3.0 hits (no
dead index entries to step over), all the purchase's statements 153.7 → 140.7 hits;
PostgreSQL CPU per purchase 0.245/0.207/0.270 → 0.202/0.195/0.210 ms (rounds 2–4).
Fillfactor 50 made 90 % of the captures HOT and measured about the same (0.247/0.193/
0.197 ms, 139.5 hits) for less room; in a replay of the batch's payment statements on
a PostgreSQL of its own (85 purchases a batch) 88 % of the captures were HOT at 50, all at
30, and 38 % at 80 (write statements 36.1, 34.0 and 39.8 µs a purchase).

The authorise itself stays non-HOT: it sets ``card_id`` and ``counter``
(``ix_payments_card_counter``, and ``card_id`` is ``ix_payments_hold_expired``'s key) and
clears ``awaiting_card`` (``ix_payments_merchant_open``'s predicate). Moving all three off
the row (an append-only ``card_purchases`` and a ``payment_waits`` table) made it HOT in
the replay (92 % of all updates at fillfactor 30), but the two tables' inserts and delete
cost what the HOT update saved (39.0 buffer hits a purchase against 38.7 without them, 41-47
against 40-44 µs); moving only the card and counter left it non-HOT.

The cost is room: new rows fill a page to 30 % at most, so once vacuumed the table takes
about 2.7 times the space it took at 80 % (without a vacuum, as in the benchmark, it took
less: 4,384 pages against 5,685 for as many purchases, the non-HOT versions' bloat gone).
Existing pages are not rewritten (as 0017). SQLite has no fillfactor: nothing changes there.

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
