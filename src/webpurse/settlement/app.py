"""The composition root: ``create_app(settings) -> FastAPI``.

Wires the database, the security module, the clock, logging and metrics into the
routers. Routes of the webhooks and clearing work are included when their modules exist.
"""

from __future__ import annotations

import gc
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from webpurse.body_limit import ASGIApp, BodyLimit, Message, Receive, Scope, Send
from webpurse.settlement.db import SessionFactory, make_engine, make_session_factory, migrate
from webpurse.settlement.errors import SettlementError
from webpurse.settlement.ledger import LedgerError
from webpurse.settlement.problems import PROBLEM_JSON, ApiError, problem
from webpurse.settlement.routes_webhooks import webhook_worker_lifespan
from webpurse.settlement.settings import Clock, Settings

log = structlog.get_logger(__name__)


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    declines: Counter


def _metrics() -> Metrics:
    registry = CollectorRegistry()
    return Metrics(
        registry=registry,
        requests=Counter(
            "webpurse_settlement_requests_total",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=registry,
        ),
        latency=Histogram(
            "webpurse_settlement_request_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            registry=registry,
        ),
        declines=Counter(
            "webpurse_settlement_declines_total",
            "Card declines by decline code",
            ["decline_code"],
            registry=registry,
        ),
    )


@dataclass
class SettlementState:
    """What routes reach through ``request.app.state.settlement``."""

    settings: Settings
    engine: Engine
    session_factory: SessionFactory
    security: Any
    clock: Clock
    metrics: Metrics


def _problem(error: ApiError, request: Request) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    return JSONResponse(error.body(request_id), status_code=error.status, media_type=PROBLEM_JSON)


def _body_refusal(status: int, code: str, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A body-limit refusal as problem+json, with a fresh request id (none was assigned yet)."""
    request_id = f"req_{uuid.uuid4().hex}"
    body = json.dumps(ApiError(status, code, detail).body(request_id)).encode("utf-8")
    headers = [
        (b"content-type", PROBLEM_JSON.encode("ascii")),
        (b"x-request-id", request_id.encode("ascii")),
    ]
    return headers, body


_FROZEN: list[bool] = []
GC_YOUNG = 20_000


def _freeze_startup_objects() -> None:
    """Take what importing and building the app made out of the cyclic GC (once a process).

    The modules, the ORM mappings, the schemas and the compiled statements live as long as
    the process; left in the collector, every full collection walks them again (~0.1 s
    with a heap this size, a few % of the server's CPU per purchase at load). Objects made
    while serving are still collected, but the youngest generation only once
    :data:`GC_YOUNG` more container objects are alive than at the last collection instead
    of Python's 700. Measured in process on 250-item batches: at 700 a round of create,
    authorise and capture batches ran ~27 young and 2-3 older collections of the batches'
    own live rows (20-100 µs per purchase in the collector, far more in a round with a full
    collection); at 5,000 still two; at 20,000 none in eight rounds. What outlives
    requests still triggers a collection, and the garbage cycles leave stays bounded.
    """
    if not _FROZEN:
        _FROZEN.append(True)
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(GC_YOUNG, older, oldest)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Background work while serving: webhook deliveries and the expiry sweep."""
    from webpurse.settlement.expiry import sweeper_lifespan

    _freeze_startup_objects()
    async with webhook_worker_lifespan(app), sweeper_lifespan(app):
        yield


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    allowed: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            allowed |= {method.upper() for method in operations}
    return sorted(allowed)


def _echo(headers: list[tuple[bytes, bytes]], request_id: bytes) -> list[tuple[bytes, bytes]]:
    """``headers`` with X-Request-Id set as Starlette's ``MutableHeaders`` sets it: in
    place of the first one there is (any other dropped), else at the end."""
    found = [i for i, (name, _) in enumerate(headers) if name == b"x-request-id"]
    for i in reversed(found[1:]):
        del headers[i]
    if found:
        headers[found[0]] = (b"x-request-id", request_id)
    else:
        headers.append((b"x-request-id", request_id))
    return headers


class RequestContext:
    """Every request: its id (the caller's X-Request-Id or a new one) bound to the log
    context and echoed, its count and latency by route, one log line.

    A pure ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``)
    runs the app in a task of its own and streams the answer through a memory channel,
    a few % of the server's CPU per request. The latency, as before, is until the answer
    starts; a request the app fails with an exception is neither counted nor logged here
    (the server's error handler answers it).
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if 0 < len(incoming) <= 100 else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        echoed = request_id.encode("latin-1")

        async def send_with_context(message: Message) -> None:
            if message["type"] == "http.response.start":
                elapsed = time.perf_counter() - started
                status = message["status"]
                method = scope["method"]
                path = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.requests.labels(method, path, str(status)).inc()
                self.metrics.latency.labels(method, path).observe(elapsed)
                message["headers"] = _echo(list(message.get("headers", ())), echoed)
                log.info(
                    "http.request",
                    method=method,
                    path=path,
                    status=status,
                    ms=round(elapsed * 1000, 2),
                )
            await send(message)

        await self.app(scope, receive, send_with_context)


def _add_problem_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every refusal as problem+json: the domain's refusals, routing errors, a pool that
    stayed busy, a transfer the ledger refused, a request that failed validation."""

    @app.exception_handler(SettlementError)
    async def api_error(request: Request, refusal: SettlementError) -> JSONResponse:
        exc = problem(refusal)
        if exc.decline_code:
            metrics.declines.labels(exc.decline_code).inc()
        log.info("http.problem", code=exc.code, decline_code=exc.decline_code, status=exc.status)
        return _problem(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # The router names only the first route whose path matched; list every method
            # the schema documents for this path (RFC 9110 §15.5.6).
            headers["Allow"] = ", ".join(_allowed_methods(app, request.url.path))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = _problem(ApiError(exc.status_code, code, str(exc.detail)), request)
        response.headers.update(headers)
        log.info("http.problem", code=code, status=exc.status_code)
        return response

    @app.exception_handler(PoolTimeout)
    async def overloaded(request: Request, exc: PoolTimeout) -> JSONResponse:
        # Every pooled connection stayed busy for the whole pool timeout: the request never
        # got a connection, so none of its work happened. Busy, not broken: say so (503,
        # Retry-After) instead of an unhandled 500.
        log.warning("db.pool_exhausted", detail=str(exc)[:200])
        busy = ApiError(503, "overloaded", "the settlement server is busy; retry shortly")
        response = _problem(busy, request)
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(LedgerError)
    async def ledger_error(request: Request, exc: LedgerError) -> JSONResponse:
        # A transfer the ledger refuses never half-happens: the transaction rolled back.
        log.warning("ledger.refused", detail=str(exc))
        return _problem(ApiError(409, "ledger_refused", str(exc)), request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        problem = ApiError(
            422,
            "validation_error",
            str(first.get("msg", "invalid request")),
            param=".".join(loc) or None,
        )
        log.info("http.invalid", errors=len(errors), param=problem.param)
        return _problem(problem, request)


def create_app(
    settings: Settings, *, security: Any = None, engine: Engine | None = None
) -> FastAPI:
    """Build the settlement FastAPI app from ``settings`` (see :mod:`.settings`)."""
    from webpurse.settlement import routes
    from webpurse.settlement.security_factory import open_security_module

    engine = engine or make_engine(
        settings.database_url, pool_size=settings.pool_size, max_overflow=settings.max_overflow
    )
    if settings.migrate:
        migrate(engine)
    session_factory = make_session_factory(engine)
    if security is None:
        security = open_security_module(settings, session_factory)
    app = FastAPI(
        title="webpurse settlement",
        version="1",
        description="Settlement server: card registry, payments, loads, refunds, ledger.",
        # The schema and its browser page only when configured (WEBPURSE_PUBLIC_DOCS=1, on
        # in the demo): a production server does not hand out its map of routes.
        docs_url="/docs" if settings.public_docs else None,
        openapi_url="/openapi.json" if settings.public_docs else None,
        redoc_url=None,
        lifespan=_lifespan,
    )
    metrics = _metrics()
    app.state.settlement = SettlementState(
        settings=settings,
        engine=engine,
        session_factory=session_factory,
        security=security,
        clock=settings.clock,
        metrics=metrics,
    )

    app.add_middleware(RequestContext, metrics=metrics)
    _add_problem_handlers(app, metrics)

    # Outermost of our middleware: a body over the limit is refused before the request
    # context, routing, authentication or any handler sees it (issue 19, finding 5).
    app.add_middleware(
        BodyLimit,
        limit=settings.max_body_bytes,
        overrides={"/v1/batch": settings.max_batch_body_bytes},
        refusal=_body_refusal,
    )
    routes.include(app)
    return app
