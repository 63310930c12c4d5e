"""HTTP routes for refunds (merchant key): /v1/refunds …"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from webpurse.settlement import refunds
from webpurse.settlement.auth import MerchantPrincipal
from webpurse.settlement.deps import PROBLEMS, SessionDep, WriteDep, make_ctx
from webpurse.settlement.models import Refund
from webpurse.settlement.pages import newest_first
from webpurse.settlement.refunds import refund_json
from webpurse.settlement.schemas import ListOut, RefundCreate, RefundOut

router = APIRouter(prefix="/v1/refunds", tags=["refunds"])


@router.post("", status_code=201, response_model=RefundOut, responses=PROBLEMS)
def create_refund(
    body: RefundCreate, principal: MerchantPrincipal, write: WriteDep
) -> JSONResponse:
    """Refund (part of) a succeeded payment: a pending credit for the card's next contact."""
    return write.once(
        principal, body, lambda ctx: refund_json(refunds.create(ctx, body)), status=201
    )


@router.get("", response_model=ListOut, responses=PROBLEMS)
def list_refunds(
    principal: MerchantPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    payment: str | None = None,
) -> dict[str, Any]:
    stmt = select(Refund).where(Refund.merchant_id == principal.merchant_id)
    if payment is not None:
        stmt = stmt.where(Refund.payment_id == payment)
    return newest_first(session, stmt, Refund, limit=limit, render=refund_json)


@router.get("/{refund_id}", response_model=RefundOut, responses=PROBLEMS)
def get_refund(
    request: Request, refund_id: str, principal: MerchantPrincipal, session: SessionDep
) -> dict[str, Any]:
    return refund_json(refunds.get_refund(make_ctx(request, session, principal), refund_id))
