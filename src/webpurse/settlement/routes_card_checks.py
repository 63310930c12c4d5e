"""HTTP routes for card checks (merchant key): /v1/card_checks/{id} (docs/settlement-api.md)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from webpurse.settlement import card_checks
from webpurse.settlement.auth import AnyPrincipal
from webpurse.settlement.deps import PROBLEMS, WriteDep
from webpurse.settlement.schemas import CardCheckAnswer

router = APIRouter(prefix="/v1/card_checks", tags=["cards"])


@router.post("/{check_id}", responses=PROBLEMS)
def answer_card_check(
    check_id: str, body: CardCheckAnswer, principal: AnyPrincipal, write: WriteDep
) -> JSONResponse:
    """The card's answer to a card check a decline offered; used once, within its expiry.

    A verified MAC1 over the check's fresh terminal id that shows the card where no
    genuine card can be blocks the card as a clone; anything else changes nothing on it.
    """
    return write.once(
        principal,
        body,
        lambda ctx: card_checks.check_json(
            card_checks.answer(ctx, check_id, body.initialize_response)
        ),
    )
