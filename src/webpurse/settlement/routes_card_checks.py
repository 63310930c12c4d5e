"""HTTP routes for card checks (merchant key): /v1/card_checks/{id} (docs/settlement-api.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from webpurse.settlement import card_checks, idempotency
from webpurse.settlement.auth import AnyPrincipal
from webpurse.settlement.deps import PROBLEMS, IdempotencyKey, SessionDep, make_ctx
from webpurse.settlement.schemas import CardCheckAnswer

router = APIRouter(prefix="/v1/card_checks", tags=["cards"])


@router.post("/{check_id}", responses=PROBLEMS)
def answer_card_check(
    request: Request,
    check_id: str,
    body: CardCheckAnswer,
    principal: AnyPrincipal,
    session: SessionDep,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """The card's answer to a card check a decline offered; used once, within its expiry.

    A verified MAC1 over the check's fresh terminal id that shows the card where no
    genuine card can be blocks the card as a clone; anything else changes nothing on it.
    """
    ctx = make_ctx(request, session, principal)

    def handler() -> tuple[int, dict[str, Any]]:
        check = card_checks.answer(ctx, check_id, body.initialize_response)
        return 200, card_checks.check_json(check)

    return idempotency.run(
        request, session, principal, idempotency_key, body.model_dump(mode="json"), handler
    )
