"""HTTP routes for loads (merchant key as a top-up agent, or operator key): /v1/loads …

Creating and listing are the load's own; the lifecycle routes are built by
:func:`~webpurse.settlement.routes_transactions.add_routes`, as for payments.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import or_, select

from webpurse.settlement import load_orders, loads
from webpurse.settlement.auth import AnyPrincipal
from webpurse.settlement.deps import PROBLEMS, SessionDep, WriteDep, make_ctx
from webpurse.settlement.funding import FundingPolicy
from webpurse.settlement.loads import load_json
from webpurse.settlement.models import Load
from webpurse.settlement.pages import newest_first
from webpurse.settlement.routes_transactions import Kind, add_routes
from webpurse.settlement.schemas import (
    ListOut,
    LoadAuthorise,
    LoadComplete,
    LoadCreate,
    LoadOut,
)
from webpurse.settlement.service import visible

router = APIRouter(prefix="/v1/loads", tags=["loads"])


@router.post("", status_code=201, response_model=LoadOut, responses=PROBLEMS)
def create_load(body: LoadCreate, principal: AnyPrincipal, write: WriteDep) -> JSONResponse:
    """Order a load: drawn from the merchant's float now, or waiting for a bank transfer.

    ``merchant_float``: the funds are held until the card is credited or they return (409
    ``insufficient_float`` beyond the float). ``bank_transfer``: ``requires_funding`` with
    a payment reference until an imported statement pays it (docs/settlement-api.md).
    """
    policy = FundingPolicy.from_settings(write.request.app.state.settlement.settings)
    return write.once(
        principal, body, lambda ctx: load_json(load_orders.create(ctx, body, policy)), status=201
    )


@router.get("", response_model=ListOut, responses=PROBLEMS)
def list_loads(
    request: Request,
    principal: AnyPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    starting_after: str | None = None,
    card_number: str | None = None,
    status: str | None = None,
) -> dict[str, Any]:
    """Loads, newest first; filter by card (e.g. pending refunds for the card on the reader)."""
    stmt = visible(select(Load), Load, principal)
    if card_number is not None:
        number = card_number.upper()
        stmt = stmt.where(or_(Load.card_number == number, Load.requested_card_number == number))
    if status is not None:
        stmt = stmt.where(Load.status == status)
    after = None
    if starting_after is not None:
        after = loads.get_load(make_ctx(request, session, principal), starting_after)
    return newest_first(session, stmt, Load, limit=limit, render=load_json, after=after)


add_routes(
    router,
    Kind(
        name="load",
        principal=AnyPrincipal,
        out=LoadOut,
        to_json=load_json,
        get=loads.get_load,
        authorise=loads.authorise,
        authorise_body=LoadAuthorise,
        finish_action="complete",
        finish=loads.complete,
        finish_body=LoadComplete,
        uncertain=loads.uncertain,
        resolve=loads.resolve,
        cancel=loads.cancel,
        docs={
            "authorise_load": "Verify the card's MAC1; issue MAC2 and the CREDIT FOR LOAD APDU.",
            "complete_load": "Verify the card's TAC; the value is now on the card.",
            "cancel_load": (
                "Cancel a load before any credit; ``card_status_word`` 9303 is only observed."
            ),
        },
    ),
)
