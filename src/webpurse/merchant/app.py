"""The merchant web shop: FastAPI + Jinja2 pages, SSE progress, settlement webhooks.

Composition root: :func:`create_app` wires the order book (SQLAlchemy), the settlement
client (httpx, with the merchant's API key), the reader broker (remote agents, or a local
reader) and the cashier that runs the flows. Everything is injectable for tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
from argon2 import PasswordHasher
from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from webpurse.body_limit import BodyLimit, plain_refusal
from webpurse.merchant import i18n
from webpurse.merchant.cardread import CardReads, TooManyReads
from webpurse.merchant.cart import COOKIE as CART_COOKIE
from webpurse.merchant.cart import Cart
from webpurse.merchant.cashier import Cashier, kind_of
from webpurse.merchant.catalogue import BY_ID, PRODUCTS, TOPUP_AMOUNTS
from webpurse.merchant.flows import Phase
from webpurse.merchant.orders import (
    DECLINED,
    PENDING,
    PURCHASE,
    TOPUP,
    Order,
    OrderBook,
    lines_to_json,
    make_engine,
)
from webpurse.merchant.progress import OrderEvent, ProgressBus
from webpurse.merchant.readers import ReaderBroker, RemoteBroker
from webpurse.merchant.security import (
    LinkRefused,
    RateLimiter,
    make_link,
    normalise_card_number,
    open_link,
)
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import (
    BANK_TRANSFER,
    REQUIRES_FUNDING,
    BatchingSettlementClient,
    Settlement,
    SettlementClient,
    SettlementError,
)
from webpurse.merchant.staff import StaffBook
from webpurse.merchant.till import (
    ACCOUNT_FAILURES,
    ADDRESS_FAILURES,
    WINDOW,
    FloatAlert,
    TillState,
    add_staff_routes,
)
from webpurse.merchant.webhooks import SeenEvents, WebhookRejected, verify_delivery
from webpurse.reader.remote import ReaderHub

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
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


def _secure(request: Request) -> bool:
    """Cookies are ``Secure`` when the shop is served over HTTPS (also behind a proxy
    that uvicorn trusts for ``X-Forwarded-Proto``)."""
    return request.url.scheme == "https"


def _log_too_large(method: str, path: str, limit: int, seen: int) -> None:
    log.warning("refused %s %s: 413 body over %d bytes (%d seen)", method, path, limit, seen)


def create_app(
    settings: MerchantSettings,
    *,
    settlement: Settlement | None = None,
    broker: ReaderBroker | None = None,
    hub: ReaderHub | None = None,
    password_hasher: PasswordHasher | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The shop. ``settlement`` defaults to the HTTP client with the settings' key;
    ``broker`` to shoppers' agents over the WebSocket at ``/reader`` (a ``ReaderHub``).
    ``clock`` (monotonic) paces sign-in attempts; ``wall_clock`` dates top-up links."""
    engine = make_engine(settings.resolved_database_url())
    orders = OrderBook(engine)
    till = TillState(
        staff=StaffBook(engine, password_hasher),
        by_account=RateLimiter(ACCOUNT_FAILURES, WINDOW, clock),
        by_address=RateLimiter(ADDRESS_FAILURES, WINDOW, clock),
    )
    bus = ProgressBus()
    http: httpx.AsyncClient | None = None
    if settlement is None:
        http = httpx.AsyncClient(base_url=settings.settlement_url, timeout=15.0)
        settlement = (
            BatchingSettlementClient(http, settings.settlement_api_key)
            if settings.settlement_batching
            else SettlementClient(http, settings.settlement_api_key)
        )
    if broker is None:
        hub = hub or ReaderHub()
        broker = RemoteBroker(hub)
    cashier = Cashier(orders, settlement, broker, bus)
    card_reads = CardReads(broker)
    seen_events = SeenEvents()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        poller = asyncio.create_task(cashier.poll(settings.poll_interval), name="poll settlement")
        yield
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
        await cashier.close()
        await card_reads.close()
        if hub is not None:
            await hub.close()
        if http is not None:
            await http.aclose()

    app = FastAPI(title="webpurse merchant shop", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.orders = orders
    app.state.cashier = cashier
    app.state.bus = bus
    app.state.settings = settings
    app.state.seen_events = seen_events
    app.state.till = till
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, refusal=plain_refusal, logger=_log_too_large
    )
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    if hub is not None:
        app.add_api_websocket_route(READER_PATH, hub.endpoint)

    @app.exception_handler(RequestValidationError)
    async def invalid_input(request: Request, exc: RequestValidationError) -> Response:
        """Bad form or query input: the usual 422, and a log line saying what was refused."""
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        log.info("refused %s %s: %s %s", request.method, request.url.path, where, first.get("msg"))
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> Response:
        """Every refusal (ours, or the form parser's: a part over 1 MB) leaves a log line."""
        log.info(
            "refused %s %s: %d %s", request.method, request.url.path, exc.status_code, exc.detail
        )
        return await http_exception_handler(request, exc)

    def lang_of(request: Request) -> str:
        return i18n.choose_language(
            request.query_params.get("lang"),
            request.cookies.get(i18n.COOKIE),
            request.headers.get("accept-language"),
        )

    def session_of(request: Request) -> str:
        return _session_id(request, settings.cookie_secret)

    def cart_of(request: Request) -> Cart:
        return Cart.decode(request.cookies.get(CART_COOKIE), settings.cookie_secret)

    def finish(request: Request, response: Response, cart: Cart | None = None) -> Response:
        if request.query_params.get("lang") in i18n.LANGUAGES:
            response.set_cookie(
                i18n.COOKIE,
                request.query_params["lang"],
                max_age=COOKIE_MAX_AGE,
                samesite="lax",
                secure=_secure(request),
            )
        new_sid = getattr(request.state, "new_sid", None)
        if new_sid:
            response.set_cookie(
                SESSION_COOKIE,
                new_sid,
                max_age=COOKIE_MAX_AGE,
                httponly=True,
                samesite="lax",
                secure=_secure(request),
            )
        if cart is not None:
            response.set_cookie(
                CART_COOKIE,
                cart.encode(settings.cookie_secret),
                max_age=COOKIE_MAX_AGE,
                httponly=True,
                samesite="lax",
                secure=_secure(request),
            )
        return response

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        lang = lang_of(request)
        cart = cart_of(request)
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
        response = templates.TemplateResponse(request, name, base, status_code=status_code)
        return finish(request, response)

    def granted(request: Request, order_id: str) -> bool:
        """The browser opened this order's receipt link (a signed, unexpired grant)."""
        token = request.cookies.get(GRANT_COOKIE)
        if not token:
            return False
        try:
            return open_link(settings.cookie_secret, token, wall_clock()) == order_id
        except LinkRefused:
            return False

    def own_order(request: Request, order_id: str) -> Order:
        order = orders.get(order_id)
        if order is None or not (
            secrets.compare_digest(order.session_id, session_of(request))
            or granted(request, order_id)
        ):
            raise HTTPException(404, "no such order")
        return order

    def receipt_link(request: Request, order: Order) -> str:
        created = order.created_at.timestamp() if order.created_at else wall_clock()
        token = make_link(settings.cookie_secret, order.id, int(created) + LINK_SECONDS)
        base = settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")
        return f"{base}/topup/link/{token}"

    def awaiting_funds(order: Order) -> bool:
        return order.funding == BANK_TRANSFER and order.settlement_status == REQUIRES_FUNDING

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def catalogue(request: Request) -> Response:
        return render(request, "catalogue.html", products=PRODUCTS)

    @app.post("/cart/add")
    async def cart_add(
        request: Request, product: Annotated[str, Form()], quantity: Annotated[int, Form()] = 1
    ) -> Response:
        if product not in BY_ID or not 1 <= quantity <= 20:
            log.info("refused cart add %r x%r", product, quantity)
            raise HTTPException(422, "unknown product or quantity out of range")
        cart = cart_of(request)
        cart.add(product, quantity)
        return finish(request, RedirectResponse("/cart", status_code=303), cart)

    @app.post("/cart/update")
    async def cart_update(
        request: Request, product: Annotated[str, Form()], quantity: Annotated[int, Form()]
    ) -> Response:
        if product not in BY_ID or not 0 <= quantity <= 20:
            raise HTTPException(422, "unknown product or quantity out of range")
        cart = cart_of(request)
        cart.set(product, quantity)
        return finish(request, RedirectResponse("/cart", status_code=303), cart)

    @app.get("/cart", response_class=HTMLResponse)
    async def cart_page(request: Request) -> Response:
        return render(request, "cart.html", cart=cart_of(request))

    async def open_and_redirect(request: Request, order: Order, cart: Cart | None) -> Response:
        try:
            await cashier.open_settlement(order, _describe(order))
        except SettlementError as exc:
            log.warning("order %s: settlement refused the payment: %s", order.id, exc)
            return render(request, "error.html", status_code=502, message=str(exc))
        return finish(request, RedirectResponse(f"/orders/{order.id}/pay", status_code=303), cart)

    @app.post("/checkout")
    async def checkout(request: Request) -> Response:
        cart = cart_of(request)
        if not cart.items:
            return RedirectResponse("/cart", status_code=303)
        order = orders.create(
            session_id=session_of(request),
            kind=PURCHASE,
            amount=cart.total,
            lines_json=lines_to_json(cart.lines),
        )
        return await open_and_redirect(request, order, Cart())

    @app.get("/topup", response_class=HTMLResponse)
    async def topup_page(request: Request) -> Response:
        method = request.query_params.get("method")
        return render(
            request,
            "topup.html",
            amounts=TOPUP_AMOUNTS,
            method=method if method in TOPUP_METHODS else None,
            agent_url=settings.agent_url,
            reader_path=READER_PATH,
        )

    @app.post("/topup")
    async def topup(
        request: Request,
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
            return render(
                request,
                "topup.html",
                status_code=422,
                amounts=TOPUP_AMOUNTS,
                method=BANK_TRANSFER,
                error="bad_card_number",
                card_number=card_number,
                agent_url=settings.agent_url,
                reader_path=READER_PATH,
            )
        order = orders.create(
            session_id=session_of(request),
            kind=TOPUP,
            amount=amount,
            funding=BANK_TRANSFER,
            card_number=card,
        )
        try:
            await cashier.open_settlement(order, _describe(order))
        except SettlementError as exc:
            log.warning("order %s: settlement refused the top-up: %s", order.id, exc)
            orders.update(order.id, status="canceled", decline_code=exc.code or "settlement_error")
            if exc.status == 404 or exc.code == "card_not_loadable":
                # No money may be asked for a card that is not ours or cannot take value.
                return render(
                    request,
                    "topup.html",
                    status_code=422,
                    amounts=TOPUP_AMOUNTS,
                    method=BANK_TRANSFER,
                    error="unknown_card" if exc.status == 404 else "card_not_loadable",
                    card_number=card_number,
                    agent_url=settings.agent_url,
                    reader_path=READER_PATH,
                )
            return render(request, "error.html", status_code=502, message=str(exc))
        return finish(
            request, RedirectResponse(f"/orders/{order.id}/transfer", status_code=303), None
        )

    @app.post("/topup/card-reads")
    async def start_card_read(request: Request) -> Response:
        """Pair the shopper's agent to read the card number off the card (no consent
        needed: SELECT and READ BINARY change nothing)."""
        try:
            read, pairing = card_reads.start(session_of(request))
        except TooManyReads as exc:
            log.warning("refused a card read: %s", exc)
            raise HTTPException(503, "too many card reads at once: try again shortly") from None
        response = JSONResponse(
            {"id": read.id, "token": pairing.token, "code": pairing.short_code},
            headers={"Cache-Control": "no-store"},
        )
        return finish(request, response)

    @app.get("/topup/card-reads/{read_id}")
    async def card_read(request: Request, read_id: str) -> JSONResponse:
        read = card_reads.get(read_id, session_of(request))
        if read is None:
            raise HTTPException(404, "no such card read")
        return JSONResponse(
            {"status": read.status, "card_number": read.card_number, "error": read.error},
            headers={"Cache-Control": "no-store"},
        )

    @app.get("/orders/{order_id}/transfer", response_class=HTMLResponse)
    async def transfer_page(request: Request, order_id: str) -> Response:
        """The bank transfer's reference, and the wait for the money to be matched."""
        own_order(request, order_id)
        order = await cashier.refresh(order_id) or own_order(request, order_id)
        if order.funding != BANK_TRANSFER:
            return RedirectResponse(f"/orders/{order_id}", status_code=303)
        return render(
            request,
            "transfer.html",
            order=order,
            products=BY_ID,
            link=receipt_link(request, order),
            waiting=awaiting_funds(order),
        )

    @app.get("/topup/link/{token}")
    async def topup_link(request: Request, token: str) -> Response:
        """A top-up's receipt link: opens the order in any browser until it expires."""
        try:
            order_id = open_link(settings.cookie_secret, token, wall_clock())
        except LinkRefused as exc:
            status = 410 if exc.reason == "expired" else 403
            log.warning("refused a top-up link (%s) from %s", exc.reason, request.client)
            return render(request, "error.html", status_code=status, message=t_link(request, exc))
        if orders.get(order_id) is None:
            raise HTTPException(404, "no such order")
        response = RedirectResponse(f"/orders/{order_id}/transfer", status_code=303)
        response.set_cookie(
            GRANT_COOKIE,
            token,
            max_age=LINK_SECONDS,
            httponly=True,
            samesite="lax",
            secure=settings.public_url.startswith("https://"),
        )
        return finish(request, response)

    def t_link(request: Request, exc: LinkRefused) -> str:
        t = i18n.translator(lang_of(request))
        return t("link_expired") if exc.reason == "expired" else t("link_forged")

    @app.get("/orders", response_class=HTMLResponse)
    async def order_history(request: Request) -> Response:
        return render(
            request,
            "orders.html",
            orders=orders.for_session(session_of(request)),
        )

    @app.get("/orders/{order_id}", response_class=HTMLResponse)
    async def order_page(request: Request, order_id: str) -> Response:
        own_order(request, order_id)
        order = await cashier.refresh(order_id) or own_order(request, order_id)
        return render(request, "order.html", order=order, products=BY_ID)

    @app.get("/orders/{order_id}/pay", response_class=HTMLResponse)
    async def pay_page(request: Request, order_id: str) -> Response:
        order = own_order(request, order_id)
        if order.is_final:
            return RedirectResponse(f"/orders/{order_id}", status_code=303)
        if awaiting_funds(order):
            order = await cashier.refresh(order_id) or order
            if awaiting_funds(order) or order.is_final:
                return RedirectResponse(f"/orders/{order_id}/transfer", status_code=303)
        pairing = cashier.broker.pair(order_id, amount=order.amount, description=_describe(order))
        cashier.start(order_id)
        return render(
            request,
            "pay.html",
            order=order,
            pairing=pairing,
            agent_url=settings.agent_url,
            reader_path=READER_PATH,
            products=BY_ID,
        )

    @app.post("/orders/{order_id}/pairing")
    async def new_pairing(request: Request, order_id: str) -> JSONResponse:
        """A fresh single-use token when the page must pair the agent again."""
        order = own_order(request, order_id)
        if order.is_final:
            raise HTTPException(409, "the order is already settled")
        if awaiting_funds(order):
            raise HTTPException(409, "the bank transfer has not arrived yet")
        pairing = cashier.broker.pair(order_id, amount=order.amount, description=_describe(order))
        cashier.start(order_id)
        return JSONResponse(
            {"token": pairing.token, "code": pairing.short_code},
            headers={"Cache-Control": "no-store"},
        )

    @app.post("/orders/{order_id}/retry")
    async def retry(request: Request, order_id: str) -> Response:
        order = own_order(request, order_id)
        if order.status == DECLINED:
            orders.update(order_id, status=PENDING, decline_code=None)
            bus.publish(OrderEvent(order_id, Phase.WAITING_READER.value, PENDING))
        return RedirectResponse(f"/orders/{order_id}/pay", status_code=303)

    @app.get("/orders/{order_id}/status")
    async def order_status(request: Request, order_id: str) -> JSONResponse:
        own_order(request, order_id)
        order = await cashier.refresh(order_id) or own_order(request, order_id)
        last = bus.last(order_id)
        return JSONResponse(_order_json(order, last))

    @app.get("/orders/{order_id}/events")
    async def order_events(request: Request, order_id: str) -> StreamingResponse:
        own_order(request, order_id)

        async def stream() -> AsyncIterator[str]:
            order = await cashier.refresh(order_id)
            last = bus.last(order_id)
            if last is not None:
                yield last.to_sse()
            elif order is not None:
                yield OrderEvent(order_id, _phase_for(order), order.status).to_sse()
            async for event in bus.subscribe(order_id):
                if await request.is_disconnected():
                    break
                yield event.to_sse() if event is not None else ": keep-alive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    @app.post("/webhooks/settlement")
    async def settlement_webhook(request: Request) -> Response:
        body = await request.body()
        if not settings.webhook_secret:
            raise HTTPException(503, "webhooks are not configured")
        try:
            verify_delivery(settings.webhook_secret, dict(request.headers), body)
        except WebhookRejected as exc:
            log.warning("rejected a webhook delivery: %s", exc)
            return JSONResponse({"error": "invalid_signature", "detail": str(exc)}, 400)
        try:
            event = json.loads(body)
            event_id = str(event["id"])
            obj = event["data"]["object"]
            if event.get("type") == "float.low":
                alert = FloatAlert(int(obj["balance"]), int(obj.get("low_threshold") or 0))
                object_id = ""
            else:
                object_id = str(obj["id"])
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "malformed_event"}, 400)
        if event_id in seen_events:
            return Response(status_code=204)
        if not object_id:
            log.warning(
                "float.low: the top-up float at settlement is down to %s (threshold %s)",
                i18n.format_fen(alert.balance),
                i18n.format_fen(alert.low_threshold),
            )
            till.float_alert = alert
            seen_events.add(event_id)
            return Response(status_code=204)
        order = orders.by_settlement_id(object_id)
        if order is not None:
            # Deliveries come in any order: re-fetch the object instead of trusting the body.
            await cashier.refresh(order.id)
        seen_events.add(event_id)  # only once handled: a failed delivery is retried in full
        return Response(status_code=204)

    add_staff_routes(
        app,
        settings=settings,
        orders=orders,
        cashier=cashier,
        till=till,
        render=render,
        session_id=session_of,
        finish=finish,
    )
    return app


def _describe(order: Order) -> str:
    if order.kind == TOPUP:
        return f"top-up {order.id}"
    names = ", ".join(f"{line['quantity']}x {line['product']}" for line in order.lines)
    return f"order {order.id}: {names}"[:200]


def _phase_for(order: Order) -> str:
    return {
        "paid": Phase.SUCCEEDED,
        "loaded": Phase.SUCCEEDED,
        "declined": Phase.DECLINED,
        "interrupted": Phase.INTERRUPTED,
        "canceled": Phase.FAILED,
    }.get(order.status, Phase.WAITING_READER).value


def _order_json(order: Order, last: OrderEvent | None) -> dict[str, Any]:
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
        "phase": last.phase if last else _phase_for(order),
    }


def app_from_env() -> FastAPI:
    """``uvicorn --factory webpurse.merchant.app:app_from_env``: settings from the environment."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return create_app(MerchantSettings.from_env())
