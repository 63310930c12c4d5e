"""A batch's lines and totals, and the ids derived from (merchant, day) (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum


class ItemKind(StrEnum):
    """What a clearing line is: a capture, a refund, a top-up sold or a top-up returned."""

    PAYMENT = "payment"
    REFUND = "refund"
    TOPUP = "topup"  # a load the merchant sold: it owes the amount
    TOPUP_RETURN = "topup_return"  # that load failed: its amount is no longer owed
    REFUND_RETURN = "refund_return"  # a refund failed (its load ended): back to the merchant

    @property
    def sign(self) -> int:
        """+1 when the line adds to what the merchant is owed, -1 when it takes from it."""
        if self in (ItemKind.PAYMENT, ItemKind.TOPUP_RETURN, ItemKind.REFUND_RETURN):
            return 1
        return -1


@dataclass(frozen=True, slots=True)
class ClearingItem:
    """One line of a batch (payment, refund, top-up sold or returned), amounts in fen (> 0)."""

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

    ``net`` is the day's captures minus its refunds minus the top-ups it sold (net of those
    returned) plus what the merchant's previous batch carried forward. The payout is that,
    bounded below by zero and above by what the merchant's payable account holds when the
    batch runs, after settling what it owes for top-ups (``topups_settled``; a refund of a
    later day may already have been taken from it); whatever is not paid is carried to the
    next batch (negative: owed by the merchant).
    """

    payment_count: int
    payment_total: int
    refund_count: int
    refund_total: int
    carried_in: int
    payout: int
    topup_count: int = 0
    topup_total: int = 0
    topups_settled: int = 0

    @property
    def day_net(self) -> int:
        """Captures minus refunds minus top-ups sold, of the day alone."""
        return self.payment_total - self.refund_total - self.topup_total

    @property
    def net(self) -> int:
        """The day's net plus what was carried in: what the merchant is owed for it."""
        return self.day_net + self.carried_in

    @property
    def carried_out(self) -> int:
        """What is left for the merchant's next batch (negative: owed by the merchant)."""
        return self.net - self.payout


def compute_batch(
    items: Sequence[ClearingItem],
    carried_in: int = 0,
    available: int | None = None,
    topups_owed: int = 0,
) -> BatchTotals:
    """Add up a day's items and decide the payout.

    ``carried_in`` is the previous batch's ``carried_out``; ``available`` is the merchant's
    payable balance when the batch runs (``None``: no bound); ``topups_owed`` what its
    top-up receivable is owed then (settled first, from the payable, as far as it goes). A
    negative ``topups_owed`` (loads returned after their top-ups were settled) goes back to
    the payable: ``topups_settled`` is then negative and the payout may use it.
    """
    payments = [i for i in items if i.kind is ItemKind.PAYMENT]
    refunds = [i for i in items if i.kind is ItemKind.REFUND]
    refunds_returned = [i for i in items if i.kind is ItemKind.REFUND_RETURN]
    topups = [i for i in items if i.kind is ItemKind.TOPUP]
    returned = [i for i in items if i.kind is ItemKind.TOPUP_RETURN]
    payment_total = sum(i.amount for i in payments)
    refund_total = sum(i.amount for i in refunds) - sum(i.amount for i in refunds_returned)
    topup_total = sum(i.amount for i in topups) - sum(i.amount for i in returned)
    payout = max(payment_total - refund_total - topup_total + carried_in, 0)
    settled = 0
    if available is not None:
        # top-ups returned after they were settled (owed < 0): the receivable gives it back
        settled = min(topups_owed, max(available, 0)) if topups_owed >= 0 else topups_owed
        payout = min(payout, max(available - settled, 0))
    return BatchTotals(
        payment_count=len(payments),
        payment_total=payment_total,
        refund_count=len(refunds),
        refund_total=refund_total,
        carried_in=carried_in,
        payout=payout,
        topup_count=len(topups),
        topup_total=topup_total,
        topups_settled=settled,
    )


def batch_id(merchant_id: str, day: date) -> str:
    """The batch id for (merchant, day): deterministic, so a re-run finds the first batch."""
    return f"clr_{day.strftime('%Y%m%d')}_{merchant_id}"


def payout_transfer_id(batch: str) -> str:
    """The ledger transfer id of a batch's payout (idempotent: one payout per batch)."""
    return f"payout_{batch}"


def topups_transfer_id(batch: str) -> str:
    """The ledger transfer id settling a batch's top-ups owed (payable → receivable)."""
    return f"topups_{batch}"
