"""Operator routes: merchants, the card registry and blacklist, the sweep, the ledger check.

Card issuance is not here: it handles card keys, so it is the local CLI only
(``webpurse settlement card issue``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import select

from webpurse.settlement import changes, clearing, expiry, idempotency, registry
from webpurse.settlement.auth import OperatorPrincipal
from webpurse.settlement.deps import PROBLEMS, IdempotencyKey, SessionDep
from webpurse.settlement.merchants import MerchantError, create_merchant, merchant_json
from webpurse.settlement.models import Card, CardEvent, CardObservation, Merchant, Payment
from webpurse.settlement.problems import ApiError, not_found
from webpurse.settlement.schemas import CardStatusChange, Empty, MerchantCreate
from webpurse.settlement.transactions import CardStatus

router = APIRouter(prefix="/v1", tags=["operator"])


@router.post("/merchants", status_code=201, responses=PROBLEMS)
def create_merchant_route(
    request: Request,
    body: MerchantCreate,
    principal: OperatorPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Register a merchant and its terminal; the API key is in this answer only."""
    now = request.app.state.settlement.clock()

    def handler() -> tuple[int, dict[str, Any]]:
        try:
            merchant, key = create_merchant(session, body.name, now, terminal_id=body.terminal_id)
        except MerchantError as exc:
            raise ApiError(409, "terminal_id_taken", str(exc), param="terminal_id") from None
        return 201, {**merchant_json(merchant), "api_key": key}

    # The key must not be replayable from storage: no idempotency record for this route.
    del idempotency_key
    return idempotency.run(request, session, principal, None, None, handler)


@router.get("/merchants", responses=PROBLEMS)
def list_merchants(principal: OperatorPrincipal, session: SessionDep) -> dict[str, Any]:
    rows = session.scalars(select(Merchant).order_by(Merchant.created_at))
    return {"object": "list", "data": [merchant_json(m) for m in rows], "has_more": False}


def _card(session: SessionDep, card_number: str) -> Card:
    card = registry.find_card(session, card_number)
    if card is None:
        raise not_found("card", "card_number")
    return card


@router.get("/cards", responses=PROBLEMS)
def list_cards(
    principal: OperatorPrincipal,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    flagged: bool | None = None,
) -> dict[str, Any]:
    stmt = select(Card)
    if flagged is not None:
        stmt = stmt.where(Card.flagged == flagged)
    rows = list(session.scalars(stmt.order_by(Card.created_at).limit(limit)))
    return {"object": "list", "data": [registry.card_json(c) for c in rows], "has_more": False}


@router.get("/cards/{card_number}", responses=PROBLEMS)
def get_card(card_number: str, principal: OperatorPrincipal, session: SessionDep) -> dict[str, Any]:
    return registry.card_json(_card(session, card_number))


@router.get("/cards/{card_number}/events", responses=PROBLEMS)
def card_events(
    card_number: str, principal: OperatorPrincipal, session: SessionDep
) -> dict[str, Any]:
    """The card's history: its recorded events and its purchases, oldest first.

    A purchase is not a recorded event but its payment (TAC, counter, ``succeeded_at``),
    shown as the ``purchase`` event it was recorded as before (migration 0013b). It goes
    before the first recorded event after it, or at the same instant one its capture
    caused (recorded after it in the same request); at the same instant otherwise, after
    the recorded ones.
    """
    card = _card(session, card_number)
    recorded = session.scalars(
        select(CardEvent).where(CardEvent.card_id == card.id).order_by(CardEvent.id)
    ).all()
    purchases = session.execute(
        select(Payment.id, Payment.amount, Payment.counter, Payment.tac, Payment.succeeded_at)
        .where(Payment.card_id == card.id, Payment.succeeded_at.is_not(None))
        .order_by(Payment.counter, Payment.id)
    ).all()
    data = [
        {"kind": kind, "detail": detail, "created_at": at.isoformat()}
        for kind, detail, at in changes.card_history(recorded, purchases)
    ]
    return {"object": "list", "data": data, "has_more": False}


@router.post("/cards/{card_number}/status", responses=PROBLEMS)
def set_card_status(
    request: Request,
    card_number: str,
    body: CardStatusChange,
    principal: OperatorPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Block, report lost, expire or reactivate a card; audited (key id, time, reason).

    Reactivating a blocked card needs a ``reason``: the way back for a card blocked as a
    clone once the operator has looked at the evidence in its events.
    """
    now = request.app.state.settlement.clock()

    def handler() -> tuple[int, dict[str, Any]]:
        card = _card(session, card_number)
        try:
            registry.set_status(session, card, body.status, now, body.reason, by=principal.key_id)
        except registry.RegistryError as exc:
            raise ApiError(422, "reason_required", str(exc), param="reason") from None
        return 200, registry.card_json(card)

    return idempotency.run(
        request, session, principal, idempotency_key, body.model_dump(mode="json"), handler
    )


@router.get("/card_observations", responses=PROBLEMS)
def card_observations(
    principal: OperatorPrincipal,
    session: SessionDep,
    card_number: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    """Unauthenticated mismatches and claims, newest first: for the operator, not the card.

    A counter or balance that does not match the shadow, a load MAC1 or card check that does
    not verify, a relayed 9303: each declined only the transaction at hand (docs/
    settlement-api.md, "Evidence").
    """
    stmt = select(CardObservation)
    if card_number is not None:
        stmt = stmt.where(CardObservation.card_number == card_number.upper())
    rows = session.scalars(
        stmt.order_by(CardObservation.created_at.desc(), CardObservation.id.desc()).limit(limit)
    )
    data = [
        {
            "object": "card_observation",
            "card_number": o.card_number,
            "kind": o.kind,
            "merchant_id": o.merchant_id,
            "reference": o.reference,
            "detail": o.detail,
            "created_at": o.created_at.isoformat(),
        }
        for o in rows
    ]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/blacklist", responses=PROBLEMS)
def blacklist(principal: OperatorPrincipal, session: SessionDep) -> dict[str, Any]:
    """Cards that must not transact: blocked or lost."""
    rows = session.scalars(
        select(Card)
        .where(Card.status.in_((CardStatus.BLOCKED, CardStatus.LOST)))
        .order_by(Card.card_number)
    )
    data = [{"card_number": c.card_number, "status": c.status, "flagged": c.flagged} for c in rows]
    return {"object": "list", "data": data, "has_more": False}


@router.post("/maintenance/sweep", responses=PROBLEMS)
def sweep(
    request: Request,
    principal: OperatorPrincipal,
    session: SessionDep,
    body: Empty | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Expire stale payments and loads now, one chunk (``more``: call again).

    One chunk of at most ``expiry.CHUNK`` rows of each kind, in this request's transaction,
    so an operator's sweep is as short as the server's own (``webpurse settlement sweep``
    runs every chunk).
    """
    state = request.app.state.settlement

    def handler() -> tuple[int, dict[str, Any]]:
        report = expiry.expire_stale(
            session,
            state.clock(),
            requires_card_ttl=state.settings.requires_card_ttl,
            authorised_ttl=state.settings.authorised_ttl,
            card_hold_ttl=state.settings.card_hold_ttl,
            limit=expiry.CHUNK,
        )
        return 200, {**report.to_json(), "more": report.most() >= expiry.CHUNK}

    return idempotency.run(request, session, principal, idempotency_key, {}, handler)


@router.get("/ledger/check", responses=PROBLEMS)
def ledger_check(principal: OperatorPrincipal, session: SessionDep) -> dict[str, Any]:
    """Recompute every balance from the entries and check the invariants."""
    report = clearing.ledger_check(session)
    return {
        "ok": report.ok,
        "accounts": report.accounts,
        "transfers": report.transfers,
        "totals": report.totals,
        "problems": report.problems,
    }
