"""The merchant's clearing report as CSV (pure)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from datetime import UTC, date, tzinfo

from webpurse.settlement.clearing.days import CHINA_STANDARD_TIME
from webpurse.settlement.clearing.items import BatchTotals, ClearingItem, batch_id

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
    and top-ups sold (``topup``, the load id) carry a negative amount, a returned top-up
    (``topup_return``) and a failed refund (``refund_return``) a positive one, so the item
    lines sum to the day's net. Trailer lines
    (``id`` = the batch id) with ``kind`` = ``total_payments``, ``total_refunds``,
    ``total_topups``, ``day_net``, ``carried_in``, ``net``, ``topups_settled``, ``payout``
    and ``carried_out``.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for item in sorted(items, key=lambda i: (i.at, i.kind.value, i.id)):
        signed = item.kind.sign * item.amount
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
        ("total_topups", -totals.topup_total),
        ("day_net", totals.day_net),
        ("carried_in", totals.carried_in),
        ("net", totals.net),
        ("topups_settled", totals.topups_settled),
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
