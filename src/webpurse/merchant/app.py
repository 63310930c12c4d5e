"""The merchant web shop: FastAPI + Jinja2 pages, SSE progress, settlement webhooks.

Composition root: :func:`create_app` wires the order book (SQLAlchemy), the settlement
client (httpx, with the merchant's API key), the reader broker (remote agents, or a local
reader) and the cashier that runs the flows into one :class:`~webpurse.merchant.web.Shop`,
and mounts the routers: ``routes_shop`` (catalogue, cart, checkout), ``routes_topup``,
``routes_orders`` (payment page, status, SSE), ``routes_webhooks`` and the till's staff
routes. Everything is injectable for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
from argon2 import PasswordHasher
from fastapi import FastAPI, Request
from fastapi.exception_handlers import (
    http_exception_handler,
    request_validation_exception_handler,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from webpurse.body_limit import BodyLimit, plain_refusal
from webpurse.merchant import routes_orders, routes_shop, routes_topup, routes_webhooks
from webpurse.merchant.cardread import CardReads
from webpurse.merchant.cashier import Cashier
from webpurse.merchant.leases import RedisFlowLeases
from webpurse.merchant.orders import OrderBook, make_engine
from webpurse.merchant.progress import ProgressBus, RedisProgressBus
from webpurse.merchant.readers import ReaderBroker, RemoteBroker
from webpurse.merchant.security import RateLimiter, RedisRateLimiter
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import (
    BatchingSettlementClient,
    Settlement,
    SettlementClient,
)
from webpurse.merchant.staff import StaffBook
from webpurse.merchant.till import (
    ACCOUNT_FAILURES,
    ADDRESS_FAILURES,
    WINDOW,
    TillState,
    add_staff_routes,
)
from webpurse.merchant.web import READER_PATH, Shop
from webpurse.merchant.webhooks import RedisSeenEvents, SeenEvents
from webpurse.reader.remote import ReaderHub
from webpurse.reader.remote.shared import UNAVAILABLE, SharedState, SharedStateUnavailable

log = logging.getLogger(__name__)

HERE = Path(__file__).parent


def _log_too_large(method: str, path: str, limit: int, seen: int) -> None:
    log.warning("refused %s %s: 413 body over %d bytes (%d seen)", method, path, limit, seen)


async def _invalid_input(request: Request, exc: Exception) -> Response:
    """Bad form or query input: the usual 422, and a log line saying what was refused."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    log.info("refused %s %s: %s %s", request.method, request.url.path, where, first.get("msg"))
    return await request_validation_exception_handler(request, exc)


async def _refused(request: Request, exc: Exception) -> Response:
    """Every refusal (ours, or the form parser's: a part over 1 MB) leaves a log line."""
    assert isinstance(exc, StarletteHTTPException)
    log.info("refused %s %s: %d %s", request.method, request.url.path, exc.status_code, exc.detail)
    return await http_exception_handler(request, exc)


async def _shared_state_unavailable(request: Request, exc: Exception) -> Response:
    """The shop's Redis is away: refuse (503, retry shortly); nothing was changed."""
    log.warning("refused %s %s: 503 %s", request.method, request.url.path, exc)
    return JSONResponse(
        {
            "type": "about:blank",
            "title": "Service unavailable",
            "status": 503,
            "code": UNAVAILABLE,
            "detail": "payments are paused: the shop cannot reach its shared state; "
            "try again shortly",
        },
        status_code=503,
        media_type="application/problem+json",
        headers={"Retry-After": "5", "Cache-Control": "no-store"},
    )


def _till_state(
    engine: Engine,
    shared: SharedState | None,
    password_hasher: PasswordHasher | None,
    clock: Callable[[], float],
) -> TillState:
    """Staff accounts, and sign-in attempts counted here or (several processes) in Redis."""
    return TillState(
        staff=StaffBook(engine, password_hasher),
        by_account=RateLimiter(ACCOUNT_FAILURES, WINDOW, clock)
        if shared is None
        else RedisRateLimiter(shared, "signin-account", ACCOUNT_FAILURES, WINDOW),
        by_address=RateLimiter(ADDRESS_FAILURES, WINDOW, clock)
        if shared is None
        else RedisRateLimiter(shared, "signin-address", ADDRESS_FAILURES, WINDOW),
    )


def _settlement_client(settings: MerchantSettings) -> tuple[Settlement, httpx.AsyncClient]:
    """The HTTP client of settlement with the settings' key (and the connection it owns)."""
    http = httpx.AsyncClient(base_url=settings.settlement_url, timeout=15.0)
    settlement = (
        BatchingSettlementClient(
            http,
            settings.settlement_api_key,
            max_in_flight=settings.settlement_batches_in_flight,
        )
        if settings.settlement_batching
        else SettlementClient(http, settings.settlement_api_key)
    )
    return settlement, http


def _lifespan(
    shop: Shop, *, hub: ReaderHub | None, http: httpx.AsyncClient | None, takeover: bool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The shop's background tasks (polling settlement, taking over dead processes'
    orders) while it runs, and everything it opened closed when it stops."""
    settings, cashier, bus, shared = shop.settings, shop.cashier, shop.bus, shop.shared

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        poller = asyncio.create_task(cashier.poll(settings.poll_interval), name="poll settlement")
        watcher = (
            asyncio.create_task(cashier.watch(settings.takeover_interval), name="takeover")
            if takeover
            else None
        )
        yield
        for task in (poller, watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await cashier.close()
        await shop.card_reads.close()
        if hub is not None:
            await hub.close()
        if http is not None:
            await http.aclose()
        if isinstance(bus, RedisProgressBus):
            await bus.flush()
        if shared is not None:
            await shared.close()

    return lifespan


def _mount(app: FastAPI, shop: Shop, hub: ReaderHub | None) -> None:
    """The shop's state, middleware, error handlers and routes on ``app``."""
    settings = shop.settings
    app.state.shop = shop
    app.state.orders = shop.orders
    app.state.cashier = shop.cashier
    app.state.bus = shop.bus
    app.state.settings = settings
    app.state.seen_events = shop.seen_events
    app.state.till = shop.till
    app.add_middleware(
        BodyLimit, limit=settings.max_body_bytes, refusal=plain_refusal, logger=_log_too_large
    )
    app.add_exception_handler(RequestValidationError, _invalid_input)
    app.add_exception_handler(StarletteHTTPException, _refused)
    app.add_exception_handler(SharedStateUnavailable, _shared_state_unavailable)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if hub is not None:
        app.add_api_websocket_route(READER_PATH, hub.endpoint)
    for module in (routes_shop, routes_topup, routes_orders, routes_webhooks):
        app.include_router(module.router)
    add_staff_routes(
        app,
        settings=settings,
        orders=shop.orders,
        cashier=shop.cashier,
        till=shop.till,
        render=shop.render,
        session_id=shop.session_of,
        finish=shop.finish,
    )


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
    shared = (
        SharedState.from_url(
            settings.redis_url, prefix=settings.redis_prefix, name=settings.node_name
        )
        if settings.redis_url
        else None
    )
    till = _till_state(engine, shared, password_hasher, clock)
    bus = ProgressBus() if shared is None else RedisProgressBus(shared)
    http: httpx.AsyncClient | None = None
    if settlement is None:
        settlement, http = _settlement_client(settings)
    if broker is None:
        hub = hub or ReaderHub(shared=shared)
        broker = RemoteBroker(hub)
    leases = RedisFlowLeases(shared) if shared is not None else None
    cashier = Cashier(orders, settlement, broker, bus, leases=leases)
    shop = Shop(
        settings=settings,
        orders=orders,
        cashier=cashier,
        bus=bus,
        till=till,
        card_reads=CardReads(broker, shared=shared),
        seen_events=SeenEvents() if shared is None else RedisSeenEvents(shared),
        templates=Jinja2Templates(directory=HERE / "templates"),
        wall_clock=wall_clock,
        shared=shared,
    )
    lifespan = _lifespan(shop, hub=hub, http=http, takeover=leases is not None)
    app = FastAPI(title="webpurse merchant shop", lifespan=lifespan, docs_url=None, redoc_url=None)
    _mount(app, shop, hub)
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory webpurse.merchant.app:app_from_env``: settings from the environment."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return create_app(MerchantSettings.from_env())
