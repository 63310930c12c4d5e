"""Routes for card holds (holds.py): heal a card from its proof; the operators' hold queue.

- ``POST /v1/heal`` (merchant or operator key): the card's GET TRANSACTION PROVE answer
  for the counter settlement is missing settles that transaction (``recover.heal``);
- ``GET /v1/holds`` (operator): every merchant's holds past ``card_hold_ttl`` and payments
  released at the bound still awaiting their card's proof;
- ``POST /v1/holds/{id}/release`` (operator): release any merchant's open payment or load,
  audited (the card event ``operator_released``: operator key, time, reason).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from webpurse.settlement import holds
from webpurse.settlement.auth import AnyPrincipal, OperatorPrincipal
from webpurse.settlement.deps import PROBLEMS, SessionDep, WriteDep, make_ctx
from webpurse.settlement.schemas import CardHeal, HoldRelease

router = APIRouter(prefix="/v1", tags=["holds"])


@router.post("/heal", responses=PROBLEMS)
def heal_card(body: CardHeal, principal: AnyPrincipal, write: WriteDep) -> JSONResponse:
    """Settle the card's transaction at the counter settlement is missing, from its proof."""
    return write.once(principal, body, lambda ctx: holds.heal(ctx, body))


@router.get("/holds", responses=PROBLEMS)
def list_holds(
    request: Request, principal: OperatorPrincipal, session: SessionDep
) -> dict[str, Any]:
    """Holds past the bound (any merchant) and released payments awaiting their proof."""
    ctx = make_ctx(request, session, principal)
    ttl = request.app.state.settlement.settings.card_hold_ttl
    return {"object": "list", "data": holds.queue(ctx, ttl), "has_more": False}


@router.post("/holds/{object_id}/release", responses=PROBLEMS)
def release_hold(
    object_id: str, body: HoldRelease, principal: OperatorPrincipal, write: WriteDep
) -> JSONResponse:
    """Release any merchant's open payment or load (its hold back to its source), audited."""
    return write.once(principal, body, lambda ctx: holds.operator_release(ctx, object_id, body))
