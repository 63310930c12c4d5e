"""What every settlement route depends on: its session, the idempotency key, its context.

The routes' shared dependencies in one place (they were in ``routes_payments``, which
made it the helper module of its siblings).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Header, Request
from sqlalchemy.orm import Session

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
