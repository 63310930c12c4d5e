"""What every settlement route depends on: its session, the idempotency key, its context.

The routes' shared dependencies in one place (they were in ``routes_payments``, which
made it the helper module of its siblings). A POST that runs at most once per
``Idempotency-Key`` takes one :data:`WriteDep` for its request, session and key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
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


@dataclass(frozen=True)
class Write:
    """What an idempotent POST needs besides its caller and its body: the request, its
    session and its ``Idempotency-Key`` header (one dependency, :data:`WriteDep`)."""

    request: Request
    session: Session
    key: str | None

    def run(
        self,
        principal: Principal,
        payload: BaseModel | dict[str, Any],
        handler: Callable[[], tuple[int, dict[str, Any]]],
        *,
        as_of: str | None = None,
    ) -> JSONResponse:
        """:func:`~webpurse.settlement.idempotency.run`: ``handler`` (its status and answer)
        at most once per key, which fingerprints ``payload``; ``as_of`` names the purchase
        step whose payment answer is stored as a reference."""
        if isinstance(payload, BaseModel):
            payload = payload.model_dump(mode="json")
        return idempotency.run(
            self.request, self.session, principal, self.key, payload, handler, as_of=as_of
        )

    def once(
        self,
        principal: Principal,
        payload: BaseModel | dict[str, Any],
        work: Callable[[Ctx], dict[str, Any]],
        *,
        status: int = 200,
        as_of: str | None = None,
    ) -> JSONResponse:
        """Run ``work`` in the request's context at most once per key (its answer ``status``)."""
        ctx = make_ctx(self.request, self.session, principal)
        return self.run(principal, payload, lambda: (status, work(ctx)), as_of=as_of)


async def _write(
    request: Request, session: SessionDep, idempotency_key: IdempotencyKey = None
) -> Write:
    return Write(request, session, idempotency_key)


WriteDep = Annotated[Write, Depends(_write)]
