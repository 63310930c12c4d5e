"""The clearing batches reconciled with the ledger entries between their marks.

Since migration 0015 an entry's place in its account's history is only its id, and a
batch's marks (``payable_entry``, ``topups_entry``) are entry ids: a batch took exactly
the movements after its merchant's previous batch's mark, up to and including its own,
passing over clearing's own transfers (payouts, top-ups settled). So, for every batch,
the movements in (previous mark, mark] add up to what it recorded:

- on the payable ``merchant:<M>``: ``payment_total - refund_total`` (captures in, refunds
  out, failed refunds back in; ``refund_total`` is net of those);
- on the top-up receivable ``topups:<M>``: ``-topup_total`` (a top-up sold is a debit, a
  returned one a credit).

Entry ids swapped or renumbered across a mark (no other column to fix, every sum still
holding) break this, and the next batch would pay the wrong amount. A batch's marks never
go back either. One query (:func:`mark_problems`), linear in the entries of the cleared
accounts.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from webpurse.settlement import ledger
from webpurse.settlement.clearing.batches import PAYOUT_KIND, TOPUPS_SETTLED_KIND

# Each batch's mark on its payable and on its receivable, as a row (is_mark 1) among that
# account's entries (is_mark 0, the amount a batch takes: 0 for clearing's own transfers).
# The running sum in (id, is_mark) order at a mark is what the entries up to it moved; less
# the same at the previous batch's mark, what the entries between the two marks moved.
_MARK_PROBLEMS = """
WITH marks AS (
    SELECT id AS batch, day, :payable || merchant_id AS account,
           COALESCE(payable_entry, 0) AS pos, payment_total - refund_total AS want
    FROM clearing_batches
    UNION ALL
    SELECT id, day, :receivable || merchant_id, COALESCE(topups_entry, 0), -topup_total
    FROM clearing_batches
),
stream AS (
    SELECT batch, day, account, pos, want, 1 AS is_mark, 0 AS moved FROM marks
    UNION ALL
    SELECT NULL, NULL, e.account_id, e.id, NULL, 0,
           CASE WHEN t.kind IN (:payout, :settled) THEN 0 ELSE e.amount END
    FROM ledger_entries e LEFT JOIN ledger_transfers t ON t.id = e.transfer_id
    WHERE e.account_id IN (SELECT account FROM marks)
),
running AS (
    SELECT batch, day, account, pos, want, is_mark,
           SUM(moved) OVER (PARTITION BY account ORDER BY pos, is_mark
                            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS upto
    FROM stream
),
ranges AS (
    SELECT batch, day, account, pos, want, upto,
           COALESCE(LAG(pos) OVER (PARTITION BY account ORDER BY day), 0) AS after,
           COALESCE(LAG(upto) OVER (PARTITION BY account ORDER BY day), 0) AS before
    FROM running WHERE is_mark = 1
)
SELECT batch, account, after, pos, want, upto - before AS got FROM ranges
WHERE pos < after OR upto - before != want
ORDER BY account, day
"""


def mark_problems(session: Session) -> list[str]:
    """What is wrong between the clearing batches and the entries between their marks.

    One query: the batches' marks merged into their accounts' entries (an index range scan
    on ``(account_id, id)`` per account, the transfer of each by primary key) and one
    running sum over them, so each entry of a cleared account is read once."""
    rows = session.execute(
        text(_MARK_PROBLEMS),
        {
            "payable": ledger.merchant_account(""),
            "receivable": ledger.topups_account(""),
            "payout": PAYOUT_KIND,
            "settled": TOPUPS_SETTLED_KIND,
        },
    )
    problems: list[str] = []
    for batch, account, after, upto, want, got in rows:
        if upto < after:
            problems.append(
                f"clearing batch {batch}: its mark on {account} ({upto}) is before the"
                f" previous batch's ({after})"
            )
        else:
            problems.append(
                f"clearing batch {batch}: {account} entries in ({after}, {upto}] sum to"
                f" {got}, the batch recorded {want}"
            )
    return problems


def ledger_check(session: Session) -> ledger.CheckReport:
    """:func:`webpurse.settlement.ledger.check` and the batches reconciled with the entries
    between their marks (:func:`mark_problems`): what ``webpurse ledger check`` runs."""
    report = ledger.check(session)
    report.problems.extend(mark_problems(session))
    return report
