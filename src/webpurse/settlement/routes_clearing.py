"""HTTP routes of clearing: run batches (operator), read batches and their CSV reports.

An operator key runs and reads every batch; a merchant key reads only its own (another
merchant's batch answers 404, as if it did not exist).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from webpurse.settlement.auth import AnyPrincipal, OperatorPrincipal, Principal
from webpurse.settlement.clearing import (
    ClearingBatch,
    ClearingError,
    DayNotOverError,
    DayOutOfRangeError,
    OutOfOrderError,
    UnknownMerchantError,
    last_closed_day,
    run_batch,
    run_day,
    timezone_from_env,
)
from webpurse.settlement.problems import PROBLEM_JSON, ApiError, not_found
from webpurse.settlement.schemas import RequestBody
from webpurse.settlement.service import visible
from webpurse.settlement.sessions import get_session
from webpurse.settlement.settings import Clock

router = APIRouter(prefix="/v1/clearing", tags=["clearing"])

DbSession = Annotated[Session, Depends(get_session)]
_PROBLEM = {"content": {PROBLEM_JSON: {}}, "description": "problem details (RFC 9457)"}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: _PROBLEM for status in (400, 401, 403, 404, 409, 422)
}


def _clock(request: Request) -> dt.datetime:
    clock: Clock = request.app.state.settlement.clock
    return clock()


Now = Annotated[dt.datetime, Depends(_clock)]


def clearing_timezone(request: Request) -> dt.tzinfo:
    """The business-day time zone: settings ``clearing_timezone``, else the environment."""
    configured: dt.tzinfo | None = request.app.state.settlement.settings.clearing_timezone
    return configured if configured is not None else timezone_from_env()


Tz = Annotated[dt.tzinfo, Depends(clearing_timezone)]


def _iso_day(value: object) -> object:
    """Only ``YYYY-MM-DD``: pydantic would otherwise read ``0`` as a unix time (1970-01-01)."""
    if value is None or isinstance(value, dt.date):
        return value
    if isinstance(value, str) and len(value) == 10 and value[4] == value[7] == "-":
        return dt.date.fromisoformat(value)
    raise ValueError("day must be YYYY-MM-DD")


Day = Annotated[dt.date, BeforeValidator(_iso_day)]


class BatchRequest(RequestBody):
    """``POST /v1/clearing/batches``: which merchant (default all) and day (default yesterday)."""

    model_config = ConfigDict(extra="forbid")

    merchant: str | None = Field(default=None, max_length=40, description="mer_…; all if absent")
    day: Day | None = Field(
        default=None, description="business day YYYY-MM-DD; the last one that ended if absent"
    )


class BatchOut(BaseModel):
    id: str
    object: Literal["clearing_batch"] = "clearing_batch"
    merchant: str
    day: dt.date
    timezone: str
    window_start: dt.datetime
    window_end: dt.datetime
    currency: str
    payment_count: int
    payment_total: int
    refund_count: int
    refund_total: int
    topup_count: int = Field(description="top-ups (loads) the merchant sold that day")
    topup_total: int = Field(description="their amount net of returned ones: owed, in fen")
    topups_settled: int = Field(description="top-ups owed settled from the payable, in fen")
    carried_in: int
    net: int
    payout: int
    carried_out: int
    transfer_id: str | None
    created_at: dt.datetime
    created: bool | None = Field(
        default=None, description="on POST: whether this run made the batch (false: it existed)"
    )


class FailedBatch(BaseModel):
    """A merchant whose batch did not run this time (nothing of it was written)."""

    merchant: str
    code: str
    detail: str


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchOut]
    has_more: bool = False
    failed: list[FailedBatch] = []


def batch_out(batch: ClearingBatch, created: bool | None = None) -> BatchOut:
    return BatchOut(
        id=batch.id,
        merchant=batch.merchant_id,
        day=batch.day,
        timezone=batch.timezone,
        window_start=batch.window_start,
        window_end=batch.window_end,
        currency=batch.currency,
        payment_count=batch.payment_count,
        payment_total=batch.payment_total,
        refund_count=batch.refund_count,
        refund_total=batch.refund_total,
        topup_count=batch.topup_count,
        topup_total=batch.topup_total,
        topups_settled=batch.topups_settled,
        carried_in=batch.carried_in,
        net=batch.payment_total - batch.refund_total - batch.topup_total + batch.carried_in,
        payout=batch.payout,
        carried_out=batch.carried_out,
        transfer_id=batch.transfer_id,
        created_at=batch.created_at,
        created=created,
    )


def _problem(exc: ClearingError) -> ApiError:
    if isinstance(exc, UnknownMerchantError):
        return ApiError(404, "resource_missing", str(exc), param="merchant")
    if isinstance(exc, DayNotOverError | OutOfOrderError):
        return ApiError(409, exc.code, str(exc), param="day")
    if isinstance(exc, DayOutOfRangeError):
        return ApiError(400, exc.code, str(exc), param="day")
    return ApiError(400, exc.code, str(exc))


def _visible_batch(session: Session, principal: Principal, batch_id: str) -> ClearingBatch:
    batch = session.get(ClearingBatch, batch_id)
    if batch is None or not (principal.is_operator or batch.merchant_id == principal.merchant_id):
        raise not_found("clearing batch", "id")
    return batch


@router.post("/batches", response_model=BatchList, responses=PROBLEMS)
def create_batches(
    request: Request,
    body: BatchRequest,
    principal: OperatorPrincipal,
    session: DbSession,
    now: Now,
    tz: Tz,
) -> BatchList:
    """Clear a business day for one merchant or all; re-running returns the stored batches.

    For all merchants, each is cleared in its own transaction; a merchant whose batch
    failed is listed in ``failed`` (run the day again to retry it) and fails no other.
    """
    day = body.day or last_closed_day(now, tz)
    failed: list[FailedBatch] = []
    try:
        if body.merchant is not None:
            results = [run_batch(session, body.merchant, day, now, tz)]
        else:
            # Each merchant's batch runs in its own transaction; this request's own (the key
            # lookup) must not stay open beside them (on SQLite it holds the write lock).
            session.commit()
            cleared = run_day(request.app.state.settlement.session_factory, day, now, tz)
            results = cleared.batches
            failed = [
                FailedBatch(merchant=f.merchant_id, code=f.code, detail=f.detail)
                for f in cleared.failures
            ]
    except ClearingError as exc:
        raise _problem(exc) from exc
    return BatchList(data=[batch_out(r.batch, r.created) for r in results], failed=failed)


@router.get("/batches", response_model=BatchList, responses=PROBLEMS)
def list_batches(
    principal: AnyPrincipal,
    session: DbSession,
    merchant: Annotated[str | None, Query(max_length=40)] = None,
    day: Day | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> BatchList:
    """Batches, newest day first: all for an operator, its own for a merchant."""
    query = visible(select(ClearingBatch), ClearingBatch, principal)
    if merchant is not None:
        query = query.where(ClearingBatch.merchant_id == merchant)
    if day is not None:
        query = query.where(ClearingBatch.day == day)
    rows = session.scalars(
        query.order_by(ClearingBatch.day.desc(), ClearingBatch.merchant_id).limit(limit + 1)
    ).all()
    return BatchList(data=[batch_out(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/batches/{batch_id}", response_model=BatchOut, responses=PROBLEMS)
def get_batch(batch_id: str, principal: AnyPrincipal, session: DbSession) -> BatchOut:
    return batch_out(_visible_batch(session, principal, batch_id))


@router.get(
    "/batches/{batch_id}/report.csv",
    response_class=Response,
    responses={
        200: {"content": {"text/csv": {}}, "description": "the batch's CSV report"},
        **PROBLEMS,
    },
)
def get_report(batch_id: str, principal: AnyPrincipal, session: DbSession) -> Response:
    """The batch's report as written when it ran (amounts in fen; see docs/webhooks.md)."""
    batch = _visible_batch(session, principal, batch_id)
    return Response(
        content=batch.report_csv,
        media_type="text/csv; charset=utf-8",
        headers={"content-disposition": f'attachment; filename="{batch.id}.csv"'},
    )
