"""An order's pages: the history, the receipt, the payment page (pairing the shopper's
agent), retry, and the live status (JSON and SSE)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from webpurse.merchant.catalogue import BY_ID
from webpurse.merchant.flows import Phase
from webpurse.merchant.orders import DECLINED, PENDING
from webpurse.merchant.progress import OrderEvent
from webpurse.merchant.web import (
    READER_PATH,
    ShopDep,
    awaiting_funds,
    describe,
    order_json,
    phase_for,
)

router = APIRouter()


@router.get("/orders", response_class=HTMLResponse)
async def order_history(request: Request, shop: ShopDep) -> Response:
    return shop.render(
        request, "orders.html", orders=shop.orders.for_session(shop.session_of(request))
    )


@router.get("/orders/{order_id}", response_class=HTMLResponse)
async def order_page(request: Request, shop: ShopDep, order_id: str) -> Response:
    shop.own_order(request, order_id)
    order = await shop.cashier.refresh(order_id) or shop.own_order(request, order_id)
    return shop.render(request, "order.html", order=order, products=BY_ID)


@router.get("/orders/{order_id}/pay", response_class=HTMLResponse)
async def pay_page(request: Request, shop: ShopDep, order_id: str) -> Response:
    order = shop.own_order(request, order_id)
    if order.is_final:
        return RedirectResponse(f"/orders/{order_id}", status_code=303)
    if awaiting_funds(order):
        order = await shop.cashier.refresh(order_id) or order
        if awaiting_funds(order) or order.is_final:
            return RedirectResponse(f"/orders/{order_id}/transfer", status_code=303)
    pairing = await shop.cashier.broker.pair(
        order_id, amount=order.amount, description=describe(order)
    )
    shop.cashier.start(order_id)
    return shop.render(
        request,
        "pay.html",
        order=order,
        pairing=pairing,
        agent_url=shop.settings.agent_url,
        reader_path=READER_PATH,
        products=BY_ID,
    )


@router.post("/orders/{order_id}/pairing")
async def new_pairing(request: Request, shop: ShopDep, order_id: str) -> JSONResponse:
    """A fresh single-use token when the page must pair the agent again."""
    order = shop.own_order(request, order_id)
    if order.is_final:
        raise HTTPException(409, "the order is already settled")
    if awaiting_funds(order):
        raise HTTPException(409, "the bank transfer has not arrived yet")
    pairing = await shop.cashier.broker.pair(
        order_id, amount=order.amount, description=describe(order)
    )
    shop.cashier.start(order_id)
    return JSONResponse(
        {"token": pairing.token, "code": pairing.short_code},
        headers={"Cache-Control": "no-store"},
    )


@router.post("/orders/{order_id}/retry")
async def retry(request: Request, shop: ShopDep, order_id: str) -> Response:
    order = shop.own_order(request, order_id)
    if order.status == DECLINED:
        shop.orders.update(order_id, status=PENDING, decline_code=None)
        shop.bus.publish(OrderEvent(order_id, Phase.WAITING_READER.value, PENDING))
    return RedirectResponse(f"/orders/{order_id}/pay", status_code=303)


@router.get("/orders/{order_id}/status")
async def order_status(request: Request, shop: ShopDep, order_id: str) -> JSONResponse:
    shop.own_order(request, order_id)
    order = await shop.cashier.refresh(order_id) or shop.own_order(request, order_id)
    last = await shop.bus.latest(order_id)
    return JSONResponse(order_json(order, last))


@router.get("/orders/{order_id}/events")
async def order_events(request: Request, shop: ShopDep, order_id: str) -> StreamingResponse:
    shop.own_order(request, order_id)

    async def stream() -> AsyncIterator[str]:
        order = await shop.cashier.refresh(order_id)
        last = await shop.bus.latest(order_id)
        if last is not None:
            yield last.to_sse()
        elif order is not None:
            yield OrderEvent(order_id, phase_for(order), order.status).to_sse()
        async for event in shop.bus.subscribe(order_id):
            if await request.is_disconnected():
                break
            yield event.to_sse() if event is not None else ": keep-alive\n\n"

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
