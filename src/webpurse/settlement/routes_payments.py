"""HTTP routes for payments (merchant key): /v1/payments …"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from webpurse.settlement import idempotency, payments
from webpurse.settlement.auth import MerchantPrincipal, Principal
from webpurse.settlement.db import get_session
from webpurse.settlement.models import Payment
from webpurse.settlement.payments import payment_json
from webpurse.settlement.problems import PROBLEM_JSON
from webpurse.settlement.schemas import (
    Cancel,
    Empty,
    ListOut,
    PaymentCreate,
    PaymentOut,
    PurchaseAuthorise,
    PurchaseCapture,
    Resolve,
)
from webpurse.settlement.service import Ctx

router = APIRouter(prefix="/v1/payments", tags=["payments"])

SessionDep = Annotated[Session, Depends(get_session)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]

_problem = {"content": {PROBLEM_JSON: {}}, "description": "problem details (RFC 9457)"}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: _problem for status in (400, 401, 402, 403, 404, 409, 422)
}


def make_ctx(request: Request, session: Session, principal: Principal) -> Ctx:
    state = request.app.state.settlement
    return Ctx(
        session,
        state.security,
        state.clock(),
        principal,
        max_open_orders=state.settings.max_open_orders,
    )


@router.post("", status_code=201, response_model=PaymentOut, responses=PROBLEMS)
def create_payment(
    request: Request,
    body: PaymentCreate,
    principal: MerchantPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Create a payment; it waits for the shopper's card (`requires_card`)."""
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json"),
        lambda: (201, payment_json(payments.create(ctx, body))),
    )


@router.get("", response_model=ListOut, responses=PROBLEMS)
def list_payments(
    request: Request,
    principal: MerchantPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    starting_after: str | None = None,
) -> dict[str, Any]:
    """The merchant's payments, newest first."""
    stmt = select(Payment).where(Payment.merchant_id == principal.merchant_id)
    if starting_after is not None:
        ctx = make_ctx(request, session, principal)
        anchor = payments.get_payment(ctx, starting_after)
        stmt = stmt.where(
            or_(
                Payment.created_at < anchor.created_at,
                and_(Payment.created_at == anchor.created_at, Payment.id < anchor.id),
            )
        )
    rows = list(
        session.scalars(
            stmt.order_by(Payment.created_at.desc(), Payment.id.desc()).limit(limit + 1)
        )
    )
    return {
        "object": "list",
        "data": [payment_json(p) for p in rows[:limit]],
        "has_more": len(rows) > limit,
    }


@router.get("/{payment_id}", response_model=PaymentOut, responses=PROBLEMS)
def get_payment(
    request: Request, payment_id: str, principal: MerchantPrincipal, session: SessionDep
) -> dict[str, Any]:
    return payment_json(payments.get_payment(make_ctx(request, session, principal), payment_id))


@router.post("/{payment_id}/authorise", response_model=PaymentOut, responses=PROBLEMS)
def authorise_payment(
    request: Request,
    payment_id: str,
    body: PurchaseAuthorise,
    principal: MerchantPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Check the card's raw answers and issue MAC1 and the DEBIT FOR PURCHASE APDU."""
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json"),
        lambda: (200, payment_json(payments.authorise(ctx, payment_id, body))),
    )


@router.post("/{payment_id}/capture", response_model=PaymentOut, responses=PROBLEMS)
def capture_payment(
    request: Request,
    payment_id: str,
    body: PurchaseCapture,
    principal: MerchantPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Verify the card's MAC2 and TAC and post the payment."""
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json"),
        lambda: (200, payment_json(payments.capture(ctx, payment_id, body))),
    )


@router.post("/{payment_id}/uncertain", response_model=PaymentOut, responses=PROBLEMS)
def uncertain_payment(
    request: Request,
    payment_id: str,
    principal: MerchantPrincipal,
    session: SessionDep,
    body: Empty | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """The DEBIT was sent and its answer lost."""
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        {},
        lambda: (200, payment_json(payments.uncertain(ctx, payment_id))),
    )


@router.post("/{payment_id}/resolve", response_model=PaymentOut, responses=PROBLEMS)
def resolve_payment(
    request: Request,
    payment_id: str,
    body: Resolve,
    principal: MerchantPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Settle an authorised or uncertain payment from the card's counter and proof."""
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json"),
        lambda: (200, payment_json(payments.resolve(ctx, payment_id, body))),
    )


@router.post("/{payment_id}/cancel", response_model=PaymentOut, responses=PROBLEMS)
def cancel_payment(
    request: Request,
    payment_id: str,
    principal: MerchantPrincipal,
    session: SessionDep,
    body: Cancel | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Cancel a payment before any debit could have been sent.

    With the card's answer to batch 1 (``issuer_data``, ``card_status_word`` 9303: the card
    locked itself) an observation is recorded for the operator; the card is not touched.
    """
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json", exclude_none=True) if body else {},
        lambda: (200, payment_json(payments.cancel(ctx, payment_id, body))),
    )
