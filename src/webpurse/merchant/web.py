"""What every shop route shares: the parts the app wires (:class:`Shop`), the browser's
session and cart cookies, page rendering, and the order-ownership check.

Routers (``routes_*.py``) take the shop with ``shop: ShopDep``; :func:`create_app`
(``app.py``) builds one :class:`Shop` and puts it on ``app.state.shop``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates

from webpurse.merchant import i18n
from webpurse.merchant.cardread import CardReads
from webpurse.merchant.cart import COOKIE as CART_COOKIE
from webpurse.merchant.cart import Cart
from webpurse.merchant.cashier import Cashier, kind_of
from webpurse.merchant.flows import Phase
from webpurse.merchant.orders import TOPUP, Order, OrderBook
from webpurse.merchant.progress import OrderEvent, ProgressBus
from webpurse.merchant.security import LinkRefused, make_link, open_link
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import BANK_TRANSFER, REQUIRES_FUNDING
from webpurse.merchant.till import TillState
from webpurse.merchant.webhooks import RedisSeenEvents, SeenEvents
from webpurse.reader.remote.shared import SharedState

SESSION_COOKIE = "wp_sid"
READER_PATH = "/reader"
COOKIE_MAX_AGE = 60 * 60 * 24 * 30
GRANT_COOKIE = "wp_grant"
LINK_SECONDS = 14 * 24 * 3600
"""How long an online top-up's receipt link opens it (from when it was ordered)."""
TOPUP_METHODS = ("bank_transfer", "cash")


def _sign_sid(token: str, secret: bytes) -> str:
    mac = hmac.new(secret, b"wp_sid:" + token.encode(), hashlib.sha256).digest()
    return f"{token}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"


def _session_id(request: Request, secret: bytes) -> str:
    """The browser's session id: one this server issued (signed), else a new one.

    A client-chosen ``wp_sid`` is never adopted (session fixation): only ``token.signature``
    with our HMAC is, so an attacker cannot plant an id in a victim's browser and then read
    the victim's orders with it.
    """
    cookie = request.cookies.get(SESSION_COOKIE, "")
    token, _, _ = cookie.partition(".")
    if 16 <= len(token) <= 64 and hmac.compare_digest(cookie, _sign_sid(token, secret)):
        return token
    existing = getattr(request.state, "new_sid", None)
    if existing is not None:
        return str(existing).partition(".")[0]
    token = secrets.token_urlsafe(24)
    request.state.new_sid = _sign_sid(token, secret)
    return token


def secure(request: Request) -> bool:
    """Cookies are ``Secure`` when the shop is served over HTTPS (also behind a proxy
    that uvicorn trusts for ``X-Forwarded-Proto``)."""
    return request.url.scheme == "https"


@dataclass
class Shop:
    """The parts one shop process is wired from, and the helpers its routes share."""

    settings: MerchantSettings
    orders: OrderBook
    cashier: Cashier
    bus: ProgressBus
    till: TillState
    card_reads: CardReads
    seen_events: SeenEvents | RedisSeenEvents
    templates: Jinja2Templates
    wall_clock: Callable[[], float]
    shared: SharedState | None = None

    async def require_shared(self) -> None:
        """Refuse (``SharedStateUnavailable``: a 503 problem) before anything is created
        when this shop runs with shared state that cannot be reached."""
        if self.shared is not None:
            await self.shared.ping()

    def lang_of(self, request: Request) -> str:
        return i18n.choose_language(
            request.query_params.get("lang"),
            request.cookies.get(i18n.COOKIE),
            request.headers.get("accept-language"),
        )

    def session_of(self, request: Request) -> str:
        return _session_id(request, self.settings.cookie_secret)

    def cart_of(self, request: Request) -> Cart:
        return Cart.decode(request.cookies.get(CART_COOKIE), self.settings.cookie_secret)

    def finish(self, request: Request, response: Response, cart: Cart | None = None) -> Response:
        """Set the cookies this request changed (language, a new session id, the cart)."""
        if request.query_params.get("lang") in i18n.LANGUAGES:
            response.set_cookie(
                i18n.COOKIE,
                request.query_params["lang"],
                max_age=COOKIE_MAX_AGE,
                samesite="lax",
                secure=secure(request),
            )
        new_sid = getattr(request.state, "new_sid", None)
        if new_sid:
            response.set_cookie(
                SESSION_COOKIE,
                new_sid,
                max_age=COOKIE_MAX_AGE,
                httponly=True,
                samesite="lax",
                secure=secure(request),
            )
        if cart is not None:
            response.set_cookie(
                CART_COOKIE,
                cart.encode(self.settings.cookie_secret),
                max_age=COOKIE_MAX_AGE,
                httponly=True,
                samesite="lax",
                secure=secure(request),
            )
        return response

    def render(
        self, request: Request, name: str, status_code: int = 200, **context: Any
    ) -> Response:
        lang = self.lang_of(request)
        cart = self.cart_of(request)
        base = {
            "request": request,
            "lang": lang,
            "t": i18n.translator(lang),
            "fen": i18n.format_fen,
            "decline_text": lambda code: i18n.decline_text(lang, code),
            "declines": i18n.decline_texts(lang),
            "cart_count": cart.count,
            "other_lang": "en" if lang == "zh" else "zh",
            "path": request.url.path,
        }
        base.update(context)
        response = self.templates.TemplateResponse(request, name, base, status_code=status_code)
        return self.finish(request, response)

    def granted(self, request: Request, order_id: str) -> bool:
        """The browser opened this order's receipt link (a signed, unexpired grant)."""
        token = request.cookies.get(GRANT_COOKIE)
        if not token:
            return False
        try:
            return open_link(self.settings.cookie_secret, token, self.wall_clock()) == order_id
        except LinkRefused:
            return False

    def own_order(self, request: Request, order_id: str) -> Order:
        """The order if this browser owns it (its session, or a receipt link), else 404."""
        order = self.orders.get(order_id)
        if order is None or not (
            secrets.compare_digest(order.session_id, self.session_of(request))
            or self.granted(request, order_id)
        ):
            raise HTTPException(404, "no such order")
        return order

    def receipt_link(self, request: Request, order: Order) -> str:
        created = order.created_at.timestamp() if order.created_at else self.wall_clock()
        token = make_link(self.settings.cookie_secret, order.id, int(created) + LINK_SECONDS)
        base = self.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        return f"{base}/topup/link/{token}"

    def t_link(self, request: Request, exc: LinkRefused) -> str:
        t = i18n.translator(self.lang_of(request))
        return t("link_expired") if exc.reason == "expired" else t("link_forged")


def get_shop(request: Request) -> Shop:
    shop: Shop = request.app.state.shop
    return shop


ShopDep = Annotated[Shop, Depends(get_shop)]


def awaiting_funds(order: Order) -> bool:
    return order.funding == BANK_TRANSFER and order.settlement_status == REQUIRES_FUNDING


def describe(order: Order) -> str:
    if order.kind == TOPUP:
        return f"top-up {order.id}"
    names = ", ".join(f"{line['quantity']}x {line['product']}" for line in order.lines)
    return f"order {order.id}: {names}"[:200]


def phase_for(order: Order) -> str:
    return {
        "paid": Phase.SUCCEEDED,
        "loaded": Phase.SUCCEEDED,
        "declined": Phase.DECLINED,
        "interrupted": Phase.INTERRUPTED,
        "canceled": Phase.FAILED,
    }.get(order.status, Phase.WAITING_READER).value


def order_json(order: Order, last: OrderEvent | None) -> dict[str, Any]:
    return {
        "id": order.id,
        "kind": order.kind,
        "status": order.status,
        "amount": order.amount,
        "settlement_id": order.settlement_id,
        "settlement_kind": kind_of(order).value,
        "decline_code": order.decline_code,
        "card_number": order.card_number,
        "balance_before": order.balance_before,
        "balance_after": order.balance_after,
        "tac": order.tac,
        "round_trips": order.round_trips,
        "funding": order.funding,
        "settlement_status": order.settlement_status,
        "payment_reference": order.payment_reference,
        "funding_expires_at": order.funding_expires_at,
        "phase": last.phase if last else phase_for(order),
    }
