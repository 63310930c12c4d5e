"""Running one merchant's batch: read its movements, store the batch, post the payout."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo

import structlog
from sqlalchemy import (
    select,
)
from sqlalchemy.orm import Session

from webpurse.settlement import ledger
from webpurse.settlement.clearing.days import (
    CHINA_STANDARD_TIME,
    _tz_name,
    business_day_window,
    check_day,
    ensure_day_over,
)
from webpurse.settlement.clearing.errors import OutOfOrderError, UnknownMerchantError
from webpurse.settlement.clearing.items import (
    BatchTotals,
    ClearingItem,
    ItemKind,
    batch_id,
    compute_batch,
    payout_transfer_id,
    topups_transfer_id,
)
from webpurse.settlement.clearing.report import render_csv
from webpurse.settlement.clearing.tables import ClearingBatch
from webpurse.settlement.models import Entry, Merchant, Payment, Refund, Transfer

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """A batch and whether this run created it (``False``: it existed, nothing was paid)."""

    batch: ClearingBatch
    created: bool


PAYOUT_KIND = "payout"
REFUND_RETURN_KIND = "refund_return"  # refunds.fail: refunds:pending → the payable
TOPUPS_SETTLED_KIND = "topups_settled"
_CLEARING_KINDS = (PAYOUT_KIND, TOPUPS_SETTLED_KIND)


def _movements(
    session: Session, account: str, after: int, end: datetime
) -> tuple[list[Transfer], int]:
    """The account's movements after its entry ``after``, in commit (entry id) order, up
    to ``end``.

    Stops before the first movement stamped at or after ``end`` (it belongs to a later day,
    and so does everything committed after it); clearing's own transfers (payouts, top-ups
    settled) are passed over. Returns the movements and the entry id it stopped at.
    """
    rows = session.execute(
        select(Entry.id, Transfer)
        .join(Transfer, Transfer.id == Entry.transfer_id)
        .where(Entry.account_id == account, Entry.id > after)
        .order_by(Entry.id)
    ).all()
    taken: list[Transfer] = []
    last = after
    for entry_id, transfer in rows:
        if transfer.kind not in _CLEARING_KINDS:
            stamped = transfer.created_at
            if stamped.tzinfo is None:
                stamped = stamped.replace(tzinfo=UTC)
            if stamped >= end:
                break
            taken.append(transfer)
        last = int(entry_id)
    return taken, last


def batch_items(
    session: Session, merchant_id: str, after: tuple[int, int], end: datetime
) -> tuple[list[ClearingItem], tuple[int, int]]:
    """The merchant's movements a batch ending at ``end`` takes, and its marks.

    ``after`` is the previous batch's (payable, receivable) marks. Money into the payable
    (captures) becomes payment lines, money out of it (refunds) refund lines, with the
    merchant's reference and card number; movements on the top-up receivable become top-up
    lines (sold, or returned when the load failed), named by the load id. Call it with both
    accounts locked (:func:`webpurse.settlement.ledger.lock_accounts`).
    """
    account = ledger.merchant_account(merchant_id)
    receivable = ledger.topups_account(merchant_id)
    payable_moves, payable_mark = _movements(session, account, after[0], end)
    topup_moves, topups_mark = _movements(session, receivable, after[1], end)
    items: list[ClearingItem] = []
    for transfer in topup_moves:
        items.append(
            ClearingItem(
                kind=ItemKind.TOPUP
                if transfer.debit_account == receivable
                else ItemKind.TOPUP_RETURN,
                id=transfer.reference or transfer.id,
                amount=transfer.amount,
                at=transfer.created_at,
            )
        )
    for transfer in payable_moves:
        incoming = transfer.credit_account == account
        reference = transfer.reference or transfer.id
        if incoming and transfer.kind == REFUND_RETURN_KIND:
            refund = session.get(Refund, reference)
            items.append(
                ClearingItem(
                    kind=ItemKind.REFUND_RETURN,
                    id=reference,
                    amount=transfer.amount,
                    at=transfer.created_at,
                    payment_id=refund.payment_id if refund is not None else "",
                )
            )
            continue
        item_id, payment_id, merchant_reference, card_number = reference, "", "", ""
        refund = None if incoming else session.get(Refund, reference)
        if refund is not None:
            payment_id = refund.payment_id
        payment = session.get(Payment, reference if incoming else payment_id)
        if payment is not None:
            payment_id = payment.id
            merchant_reference = payment.merchant_reference
            card_number = payment.card_number or ""
        items.append(
            ClearingItem(
                kind=ItemKind.PAYMENT if incoming else ItemKind.REFUND,
                id=item_id,
                amount=transfer.amount,
                at=transfer.created_at,
                reference=merchant_reference,
                card_number=card_number,
                payment_id=payment_id,
            )
        )
    items.sort(key=lambda i: (i.at if i.at.tzinfo else i.at.replace(tzinfo=UTC), i.id))
    return items, (payable_mark, topups_mark)


def _previous_batch(session: Session, merchant_id: str, day: date) -> ClearingBatch | None:
    """The merchant's batch before ``day`` (its carry and marks are this one's start).

    Refuses a day earlier than a batch the merchant already has: the carry forward runs in
    day order."""
    later = session.scalars(
        select(ClearingBatch.day).where(
            ClearingBatch.merchant_id == merchant_id, ClearingBatch.day > day
        )
    ).first()
    if later is not None:
        raise OutOfOrderError(
            f"merchant {merchant_id} already has a batch for {later.isoformat()}; "
            "batches run in day order"
        )
    return session.scalars(
        select(ClearingBatch)
        .where(ClearingBatch.merchant_id == merchant_id, ClearingBatch.day < day)
        .order_by(ClearingBatch.day.desc())
    ).first()


def _post_totals(
    session: Session,
    identifier: str,
    merchant_id: str,
    totals: BatchTotals,
    now: datetime,
    currency: str,
) -> str | None:
    """Post the batch's money: the top-ups settled between payable and receivable, then the
    payout; the payout's transfer id (None when nothing is paid)."""
    payable = ledger.merchant_account(merchant_id)
    receivable = ledger.topups_account(merchant_id)
    if totals.topups_settled != 0:
        settling = totals.topups_settled > 0
        ledger.post_transfer(
            session,
            topups_transfer_id(identifier),
            payable if settling else receivable,
            receivable if settling else payable,
            abs(totals.topups_settled),
            TOPUPS_SETTLED_KIND,
            now=now,
            reference=identifier,
            currency=currency,
        )
    if totals.payout <= 0:
        return None
    transfer_id = payout_transfer_id(identifier)
    ledger.post_transfer(
        session,
        transfer_id,
        payable,
        ledger.payout_account(merchant_id),
        totals.payout,
        PAYOUT_KIND,
        now=now,
        reference=identifier,
        currency=currency,
    )
    return transfer_id


def run_batch(
    session: Session,
    merchant_id: str,
    day: date,
    now: datetime,
    tz: tzinfo = CHINA_STANDARD_TIME,
    *,
    currency: str = "CNY",
) -> BatchResult:
    """Clear one merchant's business day: compute, store the batch and post its payout.

    Runs in the caller's transaction. Idempotent: the batch id and the payout transfer id
    derive from (merchant, day), so a second run returns the stored batch untouched. Refuses
    a day that has not ended, and a day earlier than the merchant's latest batch (the carry
    forward runs in day order). Locks the merchant's payable and top-up receivable before it
    reads them (see the module's docstring), so what it pays is what they hold.
    """
    check_day(day)
    identifier = batch_id(merchant_id, day)
    existing = session.get(ClearingBatch, identifier)
    if existing is not None:
        return BatchResult(existing, created=False)
    if session.get(Merchant, merchant_id) is None:
        raise UnknownMerchantError(f"no merchant {merchant_id}")
    ensure_day_over(day, now, tz)
    payable = ledger.merchant_account(merchant_id)
    receivable = ledger.topups_account(merchant_id)
    ledger.lock_accounts(session, [payable, receivable], now, currency)
    # A concurrent run of the same batch may have committed while this one waited.
    existing = session.get(ClearingBatch, identifier, populate_existing=True)
    if existing is not None:
        return BatchResult(existing, created=False)
    previous = _previous_batch(session, merchant_id, day)
    carried_in = previous.carried_out if previous is not None else 0
    marks = (
        (previous.payable_entry or 0, previous.topups_entry or 0)
        if previous is not None
        else (0, 0)
    )
    window = business_day_window(day, tz)
    items, marks = batch_items(session, merchant_id, marks, window[1])
    available = ledger.balance(session, payable)
    owed = -ledger.balance(session, receivable)
    totals = compute_batch(items, carried_in, available, owed)
    transfer_id = _post_totals(session, identifier, merchant_id, totals, now, currency)
    batch = ClearingBatch(
        id=identifier,
        merchant_id=merchant_id,
        day=day,
        timezone=_tz_name(tz),
        window_start=window[0],
        window_end=window[1],
        currency=currency,
        payment_count=totals.payment_count,
        payment_total=totals.payment_total,
        refund_count=totals.refund_count,
        refund_total=totals.refund_total,
        topup_count=totals.topup_count,
        topup_total=totals.topup_total,
        topups_settled=totals.topups_settled,
        carried_in=totals.carried_in,
        payout=totals.payout,
        carried_out=totals.carried_out,
        transfer_id=transfer_id,
        payable_entry=marks[0],
        topups_entry=marks[1],
        report_csv=render_csv(merchant_id, day, items, totals, tz, currency=currency),
        created_at=now,
    )
    session.add(batch)
    session.flush()
    log.info(
        "clearing.batch",
        batch=identifier,
        payments=totals.payment_count,
        refunds=totals.refund_count,
        topups=totals.topup_count,
        payout=totals.payout,
    )
    return BatchResult(batch, created=True)
