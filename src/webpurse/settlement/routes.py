"""Public and operator-wide routes (health, metrics) and the list of routers to mount."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from webpurse.settlement import (
    routes_admin,
    routes_batch,
    routes_card_checks,
    routes_clearing,
    routes_funding,
    routes_holds,
    routes_loads,
    routes_payments,
    routes_refunds,
    routes_webhooks,
)
from webpurse.settlement.auth import OperatorPrincipal

router = APIRouter()


@router.get("/health", tags=["meta"])
def health(request: Request) -> dict[str, str]:
    """Liveness and database reachability; public."""
    engine = request.app.state.settlement.engine
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get("/metrics", tags=["meta"], response_class=Response)
def metrics(request: Request, _principal: OperatorPrincipal) -> Response:
    """Prometheus metrics; operator key."""
    registry = request.app.state.settlement.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def include(app: FastAPI) -> None:
    """Mount every router, in order. Each is imported explicitly (no optional modules): a
    router that fails to import fails the start-up, never a silently missing API."""
    app.include_router(router)
    for module in (
        routes_payments,
        routes_batch,
        routes_loads,
        routes_refunds,
        routes_card_checks,
        routes_funding,
        routes_admin,
        routes_holds,
        routes_webhooks,
        routes_clearing,
    ):
        app.include_router(module.router)
