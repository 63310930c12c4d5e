"""The catalogue, the cart (a signed cookie) and checkout."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from webpurse.merchant.cart import Cart
from webpurse.merchant.catalogue import BY_ID, PRODUCTS
from webpurse.merchant.orders import PURCHASE, Order, lines_to_json
from webpurse.merchant.settlement import SettlementError
from webpurse.merchant.web import Shop, ShopDep, describe

log = logging.getLogger("webpurse.merchant.app")

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse)
async def catalogue(request: Request, shop: ShopDep) -> Response:
    return shop.render(request, "catalogue.html", products=PRODUCTS)


@router.post("/cart/add")
async def cart_add(
    request: Request,
    shop: ShopDep,
    product: Annotated[str, Form()],
    quantity: Annotated[int, Form()] = 1,
) -> Response:
    if product not in BY_ID or not 1 <= quantity <= 20:
        log.info("refused cart add %r x%r", product, quantity)
        raise HTTPException(422, "unknown product or quantity out of range")
    cart = shop.cart_of(request)
    cart.add(product, quantity)
    return shop.finish(request, RedirectResponse("/cart", status_code=303), cart)


@router.post("/cart/update")
async def cart_update(
    request: Request,
    shop: ShopDep,
    product: Annotated[str, Form()],
    quantity: Annotated[int, Form()],
) -> Response:
    if product not in BY_ID or not 0 <= quantity <= 20:
        raise HTTPException(422, "unknown product or quantity out of range")
    cart = shop.cart_of(request)
    cart.set(product, quantity)
    return shop.finish(request, RedirectResponse("/cart", status_code=303), cart)


@router.get("/cart", response_class=HTMLResponse)
async def cart_page(request: Request, shop: ShopDep) -> Response:
    return shop.render(request, "cart.html", cart=shop.cart_of(request))


async def open_and_redirect(
    shop: Shop, request: Request, order: Order, cart: Cart | None
) -> Response:
    try:
        await shop.cashier.open_settlement(order, describe(order))
    except SettlementError as exc:
        log.warning("order %s: settlement refused the payment: %s", order.id, exc)
        return shop.render(request, "error.html", status_code=502, message=str(exc))
    return shop.finish(request, RedirectResponse(f"/orders/{order.id}/pay", status_code=303), cart)


@router.post("/checkout")
async def checkout(request: Request, shop: ShopDep) -> Response:
    cart = shop.cart_of(request)
    if not cart.items:
        return RedirectResponse("/cart", status_code=303)
    await shop.require_shared()  # no order (nor payment at settlement) we cannot take
    order = shop.orders.create(
        session_id=shop.session_of(request),
        kind=PURCHASE,
        amount=cart.total,
        lines_json=lines_to_json(cart.lines),
    )
    return await open_and_redirect(shop, request, order, Cart())
