"""The clearing batch table: one immutable row per merchant and business day."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import (
    BigInteger,
    Date,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column

from webpurse.settlement.db import Base, UtcDateTime


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
    # Where the batch stopped on the payable and on the top-up receivable (the last ledger
    # entry id it passed on each): the next batch starts after them. None: nothing (0).
    payable_entry: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    topups_entry: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    report_csv: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
