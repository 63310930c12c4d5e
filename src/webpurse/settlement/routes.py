"""Public and operator-wide routes (health, metrics) and the list of routers to mount."""

from __future__ import annotations

import importlib

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from webpurse.settlement.auth import OperatorPrincipal

router = APIRouter()

# Modules (in this package) whose ``router`` the app mounts, in order.
ROUTERS = (
    "routes",
    "routes_payments",
    "routes_batch",
    "routes_loads",
    "routes_refunds",
    "routes_card_checks",
    "routes_funding",
    "routes_admin",
    "routes_holds",
)


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
    for name in ROUTERS:
        try:
            module = importlib.import_module(f"webpurse.settlement.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"webpurse.settlement.{name}":
                raise
            continue
        app.include_router(module.router)
