"""Top-ups bought online: a bank transfer bound to one card (its number typed, or read off
the card by the shopper's agent), the transfer page, and the receipt link."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from webpurse.merchant.cardread import TooManyReads
from webpurse.merchant.catalogue import BY_ID, TOPUP_AMOUNTS
from webpurse.merchant.orders import CANCELED, TOPUP
from webpurse.merchant.security import LinkRefused, normalise_card_number, open_link
from webpurse.merchant.settlement import BANK_TRANSFER, SettlementError
from webpurse.merchant.web import (
    GRANT_COOKIE,
    LINK_SECONDS,
    READER_PATH,
    TOPUP_METHODS,
    Shop,
    ShopDep,
    awaiting_funds,
    describe,
)

log = logging.getLogger("webpurse.merchant.app")

router = APIRouter()


def _topup_form(
    request: Request, shop: Shop, method: str | None, status_code: int = 200, **refused: str
) -> Response:
    """The top-up form with ``method`` chosen (None: not yet); after a refusal, with its
    ``error`` and the ``card_number`` as typed."""
    return shop.render(
        request,
        "topup.html",
        status_code=status_code,
        amounts=TOPUP_AMOUNTS,
        method=method,
        agent_url=shop.settings.agent_url,
        reader_path=READER_PATH,
        **refused,
    )


@router.get("/topup", response_class=HTMLResponse)
async def topup_page(request: Request, shop: ShopDep) -> Response:
    method = request.query_params.get("method")
    return _topup_form(request, shop, method if method in TOPUP_METHODS else None)


@router.post("/topup")
async def topup(
    request: Request,
    shop: ShopDep,
    amount: Annotated[int, Form()],
    method: Annotated[str, Form(max_length=20)] = "",
    card_number: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """An online top-up is a bank transfer bound to one card: the order gets
    settlement's payment reference and no value until the money has been matched.
    Cash is paid at the till (staff only); anything else creates nothing."""
    if method == "cash":
        return RedirectResponse("/topup?method=cash", status_code=303)
    if method != BANK_TRANSFER:
        log.info("refused top-up without a funding method (%r)", method)
        raise HTTPException(422, "choose how to pay: bank transfer, or cash at the till")
    if amount not in TOPUP_AMOUNTS:
        log.info("refused top-up amount %r", amount)
        raise HTTPException(422, "choose one of the offered amounts")
    card = normalise_card_number(card_number)
    if card is None:
        log.info("refused top-up for card number %r", card_number[:64])
        return _topup_form(
            request,
            shop,
            BANK_TRANSFER,
            422,
            error="bad_card_number",
            card_number=card_number,
        )
    order = shop.orders.create(
        session_id=shop.session_of(request),
        kind=TOPUP,
        amount=amount,
        funding=BANK_TRANSFER,
        card_number=card,
    )
    try:
        await shop.cashier.open_settlement(order, describe(order))
    except SettlementError as exc:
        log.warning("order %s: settlement refused the top-up: %s", order.id, exc)
        shop.orders.update(order.id, status=CANCELED, decline_code=exc.code or "settlement_error")
        if exc.status == 404 or exc.code == "card_not_loadable":
            # No money may be asked for a card that is not ours or cannot take value.
            return _topup_form(
                request,
                shop,
                BANK_TRANSFER,
                422,
                error="unknown_card" if exc.status == 404 else "card_not_loadable",
                card_number=card_number,
            )
        return shop.render(request, "error.html", status_code=502, message=str(exc))
    return shop.finish(
        request, RedirectResponse(f"/orders/{order.id}/transfer", status_code=303), None
    )


@router.post("/topup/card-reads")
async def start_card_read(request: Request, shop: ShopDep) -> Response:
    """Pair the shopper's agent to read the card number off the card (no consent
    needed: SELECT and READ BINARY change nothing)."""
    try:
        read, pairing = await shop.card_reads.start(shop.session_of(request))
    except TooManyReads as exc:
        log.warning("refused a card read: %s", exc)
        raise HTTPException(503, "too many card reads at once: try again shortly") from None
    response = JSONResponse(
        {"id": read.id, "token": pairing.token, "code": pairing.short_code},
        headers={"Cache-Control": "no-store"},
    )
    return shop.finish(request, response)


@router.get("/topup/card-reads/{read_id}")
async def card_read(request: Request, shop: ShopDep, read_id: str) -> JSONResponse:
    read = await shop.card_reads.lookup(read_id, shop.session_of(request))
    if read is None:
        raise HTTPException(404, "no such card read")
    return JSONResponse(
        {"status": read.status, "card_number": read.card_number, "error": read.error},
        headers={"Cache-Control": "no-store"},
    )


@router.get("/orders/{order_id}/transfer", response_class=HTMLResponse)
async def transfer_page(request: Request, shop: ShopDep, order_id: str) -> Response:
    """The bank transfer's reference, and the wait for the money to be matched."""
    shop.own_order(request, order_id)
    order = await shop.cashier.refresh(order_id) or shop.own_order(request, order_id)
    if order.funding != BANK_TRANSFER:
        return RedirectResponse(f"/orders/{order_id}", status_code=303)
    return shop.render(
        request,
        "transfer.html",
        order=order,
        products=BY_ID,
        link=shop.receipt_link(request, order),
        waiting=awaiting_funds(order),
    )


@router.get("/topup/link/{token}")
async def topup_link(request: Request, shop: ShopDep, token: str) -> Response:
    """A top-up's receipt link: opens the order in any browser until it expires."""
    try:
        order_id = open_link(shop.settings.cookie_secret, token, shop.wall_clock())
    except LinkRefused as exc:
        status = 410 if exc.reason == "expired" else 403
        log.warning("refused a top-up link (%s) from %s", exc.reason, request.client)
        return shop.render(
            request, "error.html", status_code=status, message=shop.t_link(request, exc)
        )
    if shop.orders.get(order_id) is None:
        raise HTTPException(404, "no such order")
    response = RedirectResponse(f"/orders/{order_id}/transfer", status_code=303)
    response.set_cookie(
        GRANT_COOKIE,
        token,
        max_age=LINK_SECONDS,
        httponly=True,
        samesite="lax",
        secure=shop.settings.public_url.startswith("https://"),
    )
    return shop.finish(request, response)
