"""HTTP routes for payments (merchant key): /v1/payments …

Creating and listing are the payment's own; the lifecycle routes are built by
:func:`~webpurse.settlement.routes_transactions.add_routes`, as for loads.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from webpurse.settlement import payments
from webpurse.settlement.auth import MerchantPrincipal
from webpurse.settlement.deps import PROBLEMS, SessionDep, WriteDep, make_ctx
from webpurse.settlement.models import Payment
from webpurse.settlement.pages import newest_first
from webpurse.settlement.payments import payment_json
from webpurse.settlement.routes_transactions import Kind, add_routes
from webpurse.settlement.schemas import (
    ListOut,
    PaymentCreate,
    PaymentOut,
    PurchaseAuthorise,
    PurchaseCapture,
)

router = APIRouter(prefix="/v1/payments", tags=["payments"])


@router.post("", status_code=201, response_model=PaymentOut, responses=PROBLEMS)
def create_payment(
    body: PaymentCreate, principal: MerchantPrincipal, write: WriteDep
) -> JSONResponse:
    """Create a payment; it waits for the shopper's card (`requires_card`)."""
    return write.once(
        principal,
        body,
        lambda ctx: payment_json(payments.create(ctx, body)),
        status=201,
        as_of="create",
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
    after = None
    if starting_after is not None:
        after = payments.get_payment(make_ctx(request, session, principal), starting_after)
    return newest_first(session, stmt, Payment, limit=limit, render=payment_json, after=after)


add_routes(
    router,
    Kind(
        name="payment",
        principal=MerchantPrincipal,
        out=PaymentOut,
        to_json=payment_json,
        get=payments.get_payment,
        authorise=payments.authorise,
        authorise_body=PurchaseAuthorise,
        finish_action="capture",
        finish=payments.capture,
        finish_body=PurchaseCapture,
        uncertain=payments.uncertain,
        resolve=payments.resolve,
        cancel=payments.cancel,
        docs={
            "authorise_payment": (
                "Check the card's raw answers and issue MAC1 and the DEBIT FOR PURCHASE APDU."
            ),
            "capture_payment": "Verify the card's MAC2 and TAC and post the payment.",
            "uncertain_payment": "The DEBIT was sent and its answer lost.",
            "resolve_payment": (
                "Settle an authorised or uncertain payment from the card's counter and proof."
            ),
            "cancel_payment": (
                "Cancel a payment before any debit could have been sent.\n\n"
                "With the card's answer to batch 1 (``issuer_data``, ``card_status_word`` 9303:"
                " the card\nlocked itself) an observation is recorded for the operator; the"
                " card is not touched."
            ),
        },
    ),
)
