"""Clearing: per-merchant, per-business-day batches, their CSV report and their payout.

design/payments-api.md ("Clearing"): each merchant gets a daily settlement report. A
batch for merchant M and business day D holds the payments M captured during D and the
refunds M granted during D, as the ledger recorded them (transfers into and out of M's
payable account), and the top-ups M sold during D (loads created with M's key, funded from
M's receivable ``topups:<M>``: M collected that money, so M owes it). It first settles
what M owes for top-ups from M's payable (payable → ``topups:<M>``), then pays out
``captured − refunded − top-ups sold`` (plus what M's previous batch carried forward,
bounded by M's payable balance) by one ledger transfer from M's payable account to M's
payouts account; a negative net is carried (owed by M), never paid out. The business day
is the China Standard Time (UTC+8) calendar day by default (ARCHITECTURE.md, "Settlement
server"), configurable.

The computation (:func:`business_day_window`, :func:`compute_batch`, :func:`render_csv`,
:func:`batch_id`, :func:`payout_transfer_id`) is pure. :func:`run_batch` is the thin
database adapter: it reads the day's items, stores the batch and posts the payout in one
transaction. Ids are derived from (merchant, day), so running a batch twice returns the
first one and never pays twice.

Which movements a batch holds is decided by commit order, not by the clock a request read
when it started (issue 19, finding 7). Every movement's entry on an account is inserted
under the account's row lock, so on each account the entry ids follow commit order (the
ledger module's docstring). A batch first locks the merchant's payable and top-up
receivable — every transfer that already touched them has committed by then, and none can
touch them until the batch commits — and then takes, on each account, the movements after
the previous batch's mark, in entry id order, up to the first one stamped after its
business day ends; it records where it stopped, the last entry id it passed
(``payable_entry``, ``topups_entry``). A movement stamped on a day whose batch already
ran, because its transaction committed after that batch, falls into the next batch: never
into none, never into two. A top-up returned after the batch that settled it leaves the
receivable positive; the next batch moves that back to the payable (a negative
``topups_settled``) and pays it out.

:func:`run_day` clears each merchant in its own transaction: one merchant's failure (or its
requests holding its accounts) never fails another's batch (issue 19, finding 6).

One noun per module: :mod:`.errors`, :mod:`.days` (business days and the time zone),
:mod:`.items` (lines, totals and ids), :mod:`.report` (the CSV), :mod:`.tables`,
:mod:`.batches` (one merchant's batch), :mod:`.daily` (a whole day) and :mod:`.checks` (the
batches reconciled with the ledger entries between their marks, for ``ledger check``). This package
re-exports their public names, so ``from webpurse.settlement.clearing import …`` keeps working.
"""

from __future__ import annotations

from webpurse.settlement.clearing.batches import (
    PAYOUT_KIND,
    REFUND_RETURN_KIND,
    TOPUPS_SETTLED_KIND,
    BatchResult,
    batch_items,
    run_batch,
)
from webpurse.settlement.clearing.checks import ledger_check, mark_problems
from webpurse.settlement.clearing.daily import ClearedDay, MerchantFailure, run_day
from webpurse.settlement.clearing.days import (
    CHINA_STANDARD_TIME,
    FIRST_DAY,
    LAST_DAY,
    business_day_of,
    business_day_window,
    check_day,
    ensure_day_over,
    last_closed_day,
    parse_timezone,
    timezone_from_env,
)
from webpurse.settlement.clearing.errors import (
    ClearingError,
    DayNotOverError,
    DayOutOfRangeError,
    OutOfOrderError,
    UnknownMerchantError,
)
from webpurse.settlement.clearing.items import (
    BatchTotals,
    ClearingItem,
    ItemKind,
    batch_id,
    compute_batch,
    payout_transfer_id,
    topups_transfer_id,
)
from webpurse.settlement.clearing.report import CSV_COLUMNS, render_csv
from webpurse.settlement.clearing.tables import ClearingBatch

__all__ = [
    "CHINA_STANDARD_TIME",
    "CSV_COLUMNS",
    "FIRST_DAY",
    "LAST_DAY",
    "PAYOUT_KIND",
    "REFUND_RETURN_KIND",
    "TOPUPS_SETTLED_KIND",
    "BatchResult",
    "BatchTotals",
    "ClearedDay",
    "ClearingBatch",
    "ClearingError",
    "ClearingItem",
    "DayNotOverError",
    "DayOutOfRangeError",
    "ItemKind",
    "MerchantFailure",
    "OutOfOrderError",
    "UnknownMerchantError",
    "batch_id",
    "batch_items",
    "business_day_of",
    "business_day_window",
    "check_day",
    "compute_batch",
    "ensure_day_over",
    "last_closed_day",
    "ledger_check",
    "mark_problems",
    "parse_timezone",
    "payout_transfer_id",
    "render_csv",
    "run_batch",
    "run_day",
    "timezone_from_env",
    "topups_transfer_id",
]
