"""HTTP routes for loads (merchant key as a top-up agent, or operator key): /v1/loads …"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import and_, or_, select

from webpurse.settlement import idempotency, loads
from webpurse.settlement.auth import AnyPrincipal
from webpurse.settlement.funding import FundingPolicy
from webpurse.settlement.loads import load_json
from webpurse.settlement.models import Load
from webpurse.settlement.routes_payments import PROBLEMS, IdempotencyKey, SessionDep, make_ctx
from webpurse.settlement.schemas import (
    Cancel,
    Empty,
    ListOut,
    LoadAuthorise,
    LoadComplete,
    LoadCreate,
    LoadOut,
    Resolve,
)

router = APIRouter(prefix="/v1/loads", tags=["loads"])


@router.post("", status_code=201, response_model=LoadOut, responses=PROBLEMS)
def create_load(
    request: Request,
    body: LoadCreate,
    principal: AnyPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Order a load: drawn from the merchant's float now, or waiting for a bank transfer.

    ``merchant_float``: the funds are held until the card is credited or they return (409
    ``insufficient_float`` beyond the float). ``bank_transfer``: ``requires_funding`` with
    a payment reference until an imported statement pays it (docs/settlement-api.md).
    """
    ctx = make_ctx(request, session, principal)
    policy = FundingPolicy.from_settings(request.app.state.settlement.settings)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json"),
        lambda: (201, load_json(loads.create(ctx, body, policy))),
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
    stmt = select(Load)
    if not principal.is_operator:
        stmt = stmt.where(Load.merchant_id == principal.merchant_id)
    if card_number is not None:
        number = card_number.upper()
        stmt = stmt.where(or_(Load.card_number == number, Load.requested_card_number == number))
    if status is not None:
        stmt = stmt.where(Load.status == status)
    if starting_after is not None:
        anchor = loads.get_load(make_ctx(request, session, principal), starting_after)
        stmt = stmt.where(
            or_(
                Load.created_at < anchor.created_at,
                and_(Load.created_at == anchor.created_at, Load.id < anchor.id),
            )
        )
    rows = list(
        session.scalars(stmt.order_by(Load.created_at.desc(), Load.id.desc()).limit(limit + 1))
    )
    return {
        "object": "list",
        "data": [load_json(x) for x in rows[:limit]],
        "has_more": len(rows) > limit,
    }


@router.get("/{load_id}", response_model=LoadOut, responses=PROBLEMS)
def get_load(
    request: Request, load_id: str, principal: AnyPrincipal, session: SessionDep
) -> dict[str, Any]:
    return load_json(loads.get_load(make_ctx(request, session, principal), load_id))


@router.post("/{load_id}/authorise", response_model=LoadOut, responses=PROBLEMS)
def authorise_load(
    request: Request,
    load_id: str,
    body: LoadAuthorise,
    principal: AnyPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Verify the card's MAC1; issue MAC2 and the CREDIT FOR LOAD APDU."""
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json"),
        lambda: (200, load_json(loads.authorise(ctx, load_id, body))),
    )


@router.post("/{load_id}/complete", response_model=LoadOut, responses=PROBLEMS)
def complete_load(
    request: Request,
    load_id: str,
    body: LoadComplete,
    principal: AnyPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Verify the card's TAC; the value is now on the card."""
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json"),
        lambda: (200, load_json(loads.complete(ctx, load_id, body))),
    )


@router.post("/{load_id}/uncertain", response_model=LoadOut, responses=PROBLEMS)
def uncertain_load(
    request: Request,
    load_id: str,
    principal: AnyPrincipal,
    session: SessionDep,
    body: Empty | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        {},
        lambda: (200, load_json(loads.uncertain(ctx, load_id))),
    )


@router.post("/{load_id}/resolve", response_model=LoadOut, responses=PROBLEMS)
def resolve_load(
    request: Request,
    load_id: str,
    body: Resolve,
    principal: AnyPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json"),
        lambda: (200, load_json(loads.resolve(ctx, load_id, body))),
    )


@router.post("/{load_id}/cancel", response_model=LoadOut, responses=PROBLEMS)
def cancel_load(
    request: Request,
    load_id: str,
    principal: AnyPrincipal,
    session: SessionDep,
    body: Cancel | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Cancel a load before any credit; ``card_status_word`` 9303 is only observed."""
    ctx = make_ctx(request, session, principal)
    return idempotency.run(
        request,
        session,
        principal,
        idempotency_key,
        body.model_dump(mode="json", exclude_none=True) if body else {},
        lambda: (200, load_json(loads.cancel(ctx, load_id, body))),
    )
