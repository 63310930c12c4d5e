"""Clearing a whole business day, each merchant in its own transaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, tzinfo

import structlog
from sqlalchemy import (
    select,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from webpurse.settlement import ledger
from webpurse.settlement.clearing.batches import BatchResult, run_batch
from webpurse.settlement.clearing.days import CHINA_STANDARD_TIME, check_day, ensure_day_over
from webpurse.settlement.clearing.errors import ClearingError
from webpurse.settlement.models import Merchant

log = structlog.get_logger(__name__)


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
