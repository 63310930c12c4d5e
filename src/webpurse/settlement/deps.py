"""What every settlement route depends on: its session, the idempotency key, its context.

The routes' shared dependencies in one place (they were in ``routes_payments``, which
made it the helper module of its siblings).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from webpurse.settlement import idempotency
from webpurse.settlement.auth import Principal
from webpurse.settlement.problems import PROBLEM_JSON
from webpurse.settlement.service import Ctx
from webpurse.settlement.sessions import SessionDep as SessionDep

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]

_problem = {"content": {PROBLEM_JSON: {}}, "description": "problem details (RFC 9457)"}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: _problem for status in (400, 401, 402, 403, 404, 409, 422)
}


def make_ctx(request: Request, session: Session, principal: Principal) -> Ctx:
    """The service context of one request: its session, the keys, the clock, the caller."""
    state = request.app.state.settlement
    return Ctx(
        session,
        state.security,
        state.clock(),
        principal,
        max_open_orders=state.settings.max_open_orders,
    )


def idempotent(
    request: Request,
    session: Session,
    principal: Principal,
    key: str | None,
    payload: BaseModel | dict[str, Any],
    work: Callable[[Ctx], dict[str, Any]],
    *,
    status: int = 200,
    as_of: str | None = None,
) -> JSONResponse:
    """Run ``work`` in the request's context at most once per ``key`` (its answer ``status``):
    :func:`~webpurse.settlement.idempotency.run`, which fingerprints ``payload``; ``as_of``
    names the purchase step whose payment answer is stored as a reference."""
    ctx = make_ctx(request, session, principal)
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    return idempotency.run(
        request, session, principal, key, payload, lambda: (status, work(ctx)), as_of=as_of
    )
