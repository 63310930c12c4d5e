"""Clearing: per-merchant, per-business-day batches, their CSV report and their payout.

design/payments-api.md ("Clearing"): each merchant gets a daily settlement report. A
batch for merchant M and business day D holds the payments M captured during D and the
refunds M granted during D; it pays out ``captured − refunded`` (plus any negative
remainder carried from M's previous batch) by one ledger transfer from M's payable
account to the payouts account. The business day is the China Standard Time (UTC+8)
calendar day by default (ARCHITECTURE.md, "Settlement server"), configurable.

The computation (:func:`business_day_window`, :func:`compute_batch`, :func:`render_csv`,
:func:`batch_id`, :func:`payout_transfer_id`) is pure. :func:`run_batch` is the thin
database adapter: it reads the day's items, stores the batch and posts the payout in one
transaction. Ids are derived from (merchant, day), so running a batch twice returns the
first one and never pays twice.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from enum import StrEnum

CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "CST")
"""The default clearing time zone: business days are UTC+8 calendar days."""


class ClearingError(Exception):
    """Base class of clearing failures; ``code`` is the stable machine code."""

    code = "clearing_error"


class DayNotOverError(ClearingError):
    """A batch was asked for a business day that has not ended yet."""

    code = "day_not_over"


class ItemKind(StrEnum):
    """What a clearing line is: money in (a capture) or money back (a refund)."""

    PAYMENT = "payment"
    REFUND = "refund"


@dataclass(frozen=True, slots=True)
class ClearingItem:
    """One line of a batch: a captured payment or a granted refund, amounts in fen (> 0)."""

    kind: ItemKind
    id: str
    amount: int
    at: datetime
    reference: str = ""
    card_number: str = ""
    payment_id: str = ""

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ValueError(f"clearing item {self.id}: amount must be > 0 fen")


@dataclass(frozen=True, slots=True)
class BatchTotals:
    """What one batch adds up to, in fen.

    ``net`` is the day's captures minus its refunds plus what the merchant's previous batch
    carried forward. The payout is that, bounded below by zero and above by what the
    merchant's payable account holds when the batch runs (a refund of a later day may
    already have been taken from it); whatever is not paid is carried to the next batch.
    """

    payment_count: int
    payment_total: int
    refund_count: int
    refund_total: int
    carried_in: int
    payout: int

    @property
    def day_net(self) -> int:
        """Captures minus refunds of the day alone."""
        return self.payment_total - self.refund_total

    @property
    def net(self) -> int:
        """The day's net plus what was carried in: what the merchant is owed for it."""
        return self.day_net + self.carried_in

    @property
    def carried_out(self) -> int:
        """What is left for the merchant's next batch (negative: owed by the merchant)."""
        return self.net - self.payout


def business_day_window(day: date, tz: tzinfo = CHINA_STANDARD_TIME) -> tuple[datetime, datetime]:
    """The UTC instants ``[start, end)`` of business day ``day`` in time zone ``tz``."""
    start = datetime.combine(day, time(0, 0), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), time(0, 0), tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def business_day_of(instant: datetime, tz: tzinfo = CHINA_STANDARD_TIME) -> date:
    """The business day an instant (naive means UTC) belongs to."""
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return instant.astimezone(tz).date()


def last_closed_day(now: datetime, tz: tzinfo = CHINA_STANDARD_TIME) -> date:
    """The most recent business day that has fully ended at ``now`` (yesterday, locally)."""
    return business_day_of(now, tz) - timedelta(days=1)


def ensure_day_over(day: date, now: datetime, tz: tzinfo = CHINA_STANDARD_TIME) -> None:
    """Raise :class:`DayNotOverError` unless business day ``day`` has ended at ``now``."""
    _, end = business_day_window(day, tz)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if now < end:
        raise DayNotOverError(f"business day {day.isoformat()} ends at {end.isoformat()}")


def compute_batch(
    items: Sequence[ClearingItem], carried_in: int = 0, available: int | None = None
) -> BatchTotals:
    """Add up a day's items and decide the payout.

    ``carried_in`` is the previous batch's ``carried_out``; ``available`` is the merchant's
    payable balance when the batch runs (``None``: no bound).
    """
    payments = [i for i in items if i.kind is ItemKind.PAYMENT]
    refunds = [i for i in items if i.kind is ItemKind.REFUND]
    payment_total = sum(i.amount for i in payments)
    refund_total = sum(i.amount for i in refunds)
    payout = max(payment_total - refund_total + carried_in, 0)
    if available is not None:
        payout = min(payout, max(available, 0))
    return BatchTotals(
        payment_count=len(payments),
        payment_total=payment_total,
        refund_count=len(refunds),
        refund_total=refund_total,
        carried_in=carried_in,
        payout=payout,
    )


def batch_id(merchant_id: str, day: date) -> str:
    """The batch id for (merchant, day): deterministic, so a re-run finds the first batch."""
    return f"clr_{day.strftime('%Y%m%d')}_{merchant_id}"


def payout_transfer_id(batch: str) -> str:
    """The ledger transfer id of a batch's payout (idempotent: one payout per batch)."""
    return f"payout_{batch}"


CSV_COLUMNS = (
    "kind",
    "id",
    "payment_id",
    "amount",
    "currency",
    "at_utc",
    "reference",
    "card_number",
)


def render_csv(
    merchant_id: str,
    day: date,
    items: Sequence[ClearingItem],
    totals: BatchTotals,
    tz: tzinfo = CHINA_STANDARD_TIME,
    *,
    currency: str = "CNY",
) -> str:
    """The merchant's report: one line per item, then the totals, amounts in fen.

    Columns: ``kind,id,payment_id,amount,currency,at_utc,reference,card_number``; refunds
    carry a negative amount so the item lines sum to the day's net. Trailer lines (``id`` =
    the batch id) with ``kind`` = ``total_payments``, ``total_refunds``, ``day_net``,
    ``carried_in``, ``net``, ``payout`` and ``carried_out``.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in sorted(items, key=lambda i: (i.at, i.kind.value, i.id)):
        signed = item.amount if item.kind is ItemKind.PAYMENT else -item.amount
        at = item.at if item.at.tzinfo is not None else item.at.replace(tzinfo=UTC)
        writer.writerow(
            [
                item.kind.value,
                item.id,
                item.payment_id,
                signed,
                currency,
                at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                _csv_safe(item.reference),
                item.card_number,
            ]
        )
    batch = batch_id(merchant_id, day)
    for kind, amount in (
        ("total_payments", totals.payment_total),
        ("total_refunds", -totals.refund_total),
        ("day_net", totals.day_net),
        ("carried_in", totals.carried_in),
        ("net", totals.net),
        ("payout", totals.payout),
        ("carried_out", totals.carried_out),
    ):
        writer.writerow([kind, batch, "", amount, currency, "", "", ""])
    return out.getvalue()


def _csv_safe(text: str) -> str:
    """Neutralise spreadsheet formulas in merchant-supplied text (CSV injection)."""
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text
