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
when it started (issue 19, finding 7). Every movement on an account has a version, given
under the account's row lock, so versions follow commit order. A batch first locks the
merchant's payable and top-up receivable — every transfer that already touched them has
committed by then, and none can touch them until the batch commits — and then takes, on
each account, the movements after the previous batch's mark, in version order, up to the
first one stamped after its business day ends; it records where it stopped
(``payable_version``, ``topups_version``). A movement stamped on a day whose batch already
ran, because its transaction committed after that batch, falls into the next batch: never
into none, never into two. A top-up returned after the batch that settled it leaves the
receivable positive; the next batch moves that back to the payable (a negative
``topups_settled``) and pays it out.

:func:`run_day` clears each merchant in its own transaction: one merchant's failure (or its
requests holding its accounts) never fails another's batch (issue 19, finding 6).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from sqlalchemy import (
    BigInteger,
    Date,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from webpurse.settlement import ledger
from webpurse.settlement.db import Base, UtcDateTime
from webpurse.settlement.models import Entry, Merchant, Payment, Refund, Transfer

log = structlog.get_logger(__name__)

CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "CST")
"""The default clearing time zone: business days are UTC+8 calendar days."""


class ClearingError(Exception):
    """Base class of clearing failures; ``code`` is the stable machine code."""

    code = "clearing_error"


class DayNotOverError(ClearingError):
    """A batch was asked for a business day that has not ended yet."""

    code = "day_not_over"


class OutOfOrderError(ClearingError):
    """A batch was asked for a day before the merchant's latest batch."""

    code = "clearing_out_of_order"


class UnknownMerchantError(ClearingError):
    """No merchant with that id."""

    code = "unknown_merchant"


class DayOutOfRangeError(ClearingError):
    """A business day outside the years clearing handles (2000-9998)."""

    code = "day_out_of_range"


FIRST_DAY = date(2000, 1, 1)
LAST_DAY = date(9998, 12, 31)


def check_day(day: date) -> date:
    """``day`` if clearing can handle it, else :class:`DayOutOfRangeError`."""
    if not FIRST_DAY <= day <= LAST_DAY:
        raise DayOutOfRangeError(f"day must be between {FIRST_DAY} and {LAST_DAY}")
    return day


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


def parse_timezone(text: str) -> tzinfo:
    """A clearing time zone from config: an IANA name (``Asia/Shanghai``) or ``±HH:MM``."""
    match = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", text.strip())
    if match:
        sign = 1 if match.group(1) == "+" else -1
        offset = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        if offset >= timedelta(hours=24):
            raise ClearingError(f"time zone offset out of range: {text!r}")
        return timezone(sign * offset)
    try:
        return ZoneInfo(text.strip())
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ClearingError(f"unknown time zone {text!r}") from exc


def timezone_from_env(env: Mapping[str, str] | None = None) -> tzinfo:
    """``WEBPURSE_CLEARING_TZ`` (default China Standard Time, UTC+8)."""
    env = os.environ if env is None else env
    text = env.get("WEBPURSE_CLEARING_TZ", "")
    return parse_timezone(text) if text else CHINA_STANDARD_TIME


def _tz_name(tz: tzinfo) -> str:
    """An IANA zone's key, or a fixed offset as ``UTC+08:00``."""
    key = getattr(tz, "key", None)
    if isinstance(key, str):
        return key
    offset = tz.utcoffset(None)
    if offset is None:
        return str(tz)
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


# --------------------------------------------------------------------------- persistence


class ClearingBatch(Base):
    """A merchant's clearing batch for one business day; immutable once written."""

    __tablename__ = "clearing_batches"
    __table_args__ = (UniqueConstraint("merchant_id", "day", name="uq_clearing_batches_day"),)

    id: Mapped[str] = mapped_column(String(80), primary_key=True)
    merchant_id: Mapped[str] = mapped_column(ForeignKey("merchants.id"), index=True)
    day: Mapped[date] = mapped_column(Date, index=True)
    timezone: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[datetime] = mapped_column(UtcDateTime())
    window_end: Mapped[datetime] = mapped_column(UtcDateTime())
    currency: Mapped[str] = mapped_column(String(3))
    payment_count: Mapped[int] = mapped_column(Integer)
    payment_total: Mapped[int] = mapped_column(BigInteger)
    refund_count: Mapped[int] = mapped_column(Integer)
    refund_total: Mapped[int] = mapped_column(BigInteger)
    topup_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    topup_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    topups_settled: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    carried_in: Mapped[int] = mapped_column(BigInteger)
    payout: Mapped[int] = mapped_column(BigInteger)
    carried_out: Mapped[int] = mapped_column(BigInteger)
    transfer_id: Mapped[str | None] = mapped_column(String(120), nullable=True)
    # Where the batch stopped on the payable and on the top-up receivable (entry versions):
    # the next batch starts after them. None: a batch of before these marks (0).
    payable_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    topups_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    report_csv: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())


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
    """The account's movements after version ``after``, in commit order, up to ``end``.

    Stops before the first movement stamped at or after ``end`` (it belongs to a later day,
    and so does everything committed after it); clearing's own transfers (payouts, top-ups
    settled) are passed over. Returns the movements and the version it stopped at.
    """
    rows = session.execute(
        select(Entry.account_version, Transfer)
        .join(Transfer, Transfer.id == Entry.transfer_id)
        .where(Entry.account_id == account, Entry.account_version > after)
        .order_by(Entry.account_version)
    ).all()
    taken: list[Transfer] = []
    last = after
    for version, transfer in rows:
        if transfer.kind not in _CLEARING_KINDS:
            stamped = transfer.created_at
            if stamped.tzinfo is None:
                stamped = stamped.replace(tzinfo=UTC)
            if stamped >= end:
                break
            taken.append(transfer)
        last = int(version)
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
    previous = session.scalars(
        select(ClearingBatch)
        .where(ClearingBatch.merchant_id == merchant_id, ClearingBatch.day < day)
        .order_by(ClearingBatch.day.desc())
    ).first()
    carried_in = previous.carried_out if previous is not None else 0
    marks = (
        (previous.payable_version or 0, previous.topups_version or 0)
        if previous is not None
        else (0, 0)
    )
    window = business_day_window(day, tz)
    items, marks = batch_items(session, merchant_id, marks, window[1])
    available = ledger.balance(session, payable)
    owed = -ledger.balance(session, receivable)
    totals = compute_batch(items, carried_in, available, owed)
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
    transfer_id = None
    if totals.payout > 0:
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
        payable_version=marks[0],
        topups_version=marks[1],
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


@dataclass(frozen=True, slots=True)
class MerchantFailure:
    """A merchant whose batch could not run this time (its transaction rolled back)."""

    merchant_id: str
    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class ClearedDay:
    """What :func:`run_day` did: the batches (new or stored) and the merchants that failed."""

    batches: list[BatchResult]
    failures: list[MerchantFailure]


def run_day(
    session_factory: Callable[[], Session],
    day: date,
    now: datetime,
    tz: tzinfo = CHINA_STANDARD_TIME,
) -> ClearedDay:
    """Clear ``day`` for every merchant (the daily job), each in its own transaction.

    One merchant's batch failing (its day out of order, a refused transfer, a database
    error) rolls back that batch alone and is reported in ``failures``; every other
    merchant's batch is stored and paid. Running the day again retries only what failed.
    """
    check_day(day)
    ensure_day_over(day, now, tz)
    with session_factory() as session:
        merchant_ids = list(session.scalars(select(Merchant.id).order_by(Merchant.id)))
    batches: list[BatchResult] = []
    failures: list[MerchantFailure] = []
    for merchant_id in merchant_ids:
        try:
            with session_factory() as session, session.begin():
                result = run_batch(session, merchant_id, day, now, tz)
            batches.append(result)
        except (ClearingError, ledger.LedgerError, SQLAlchemyError) as exc:
            code = getattr(exc, "code", None) or type(exc).__name__
            code = code if isinstance(code, str) else type(exc).__name__
            log.error("clearing.merchant_failed", merchant=merchant_id, code=code)
            failures.append(MerchantFailure(merchant_id, code, str(exc).splitlines()[0][:300]))
    return ClearedDay(batches, failures)
