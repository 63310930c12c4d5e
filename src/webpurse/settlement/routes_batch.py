"""HTTP route for batches (merchant key): POST /v1/batch — see :mod:`.batch`."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from webpurse.settlement import batch
from webpurse.settlement.auth import Principal, merchant_only, principal_of
from webpurse.settlement.deps import PROBLEMS, make_ctx
from webpurse.settlement.problems import ApiError
from webpurse.settlement.schemas import BatchIn, BatchOut
from webpurse.settlement.sessions import get_session

log = structlog.get_logger(__name__)

_BATCH_IN: TypeAdapter[BatchIn] = TypeAdapter(BatchIn)
_PARSED = "webpurse.batch_parsed"
"""Scope key: FastAPI asked for the body as JSON and got a valid ``BatchIn``."""


class _BatchRequest(Request):
    """A batch request whose JSON body is parsed and validated in one pass from the bytes.

    FastAPI parses a JSON body with the standard library (``Request.json``), then
    validates the objects it made: two walks of a ~30-70 KB body, about a quarter of a
    batch's CPU outside :func:`batch.run` (issue 20). pydantic's parser does both at
    once from the bytes (~35 % less) and FastAPI's validation passes the ``BatchIn`` it
    made through as it is. A body it refuses goes the standard library's way, as before,
    so every refusal is what it was; it accepts nothing the standard library refuses, and
    what both accept comes out the same (the standard library accepts more: lone
    surrogates, a BOM, UTF-16, nesting past 200 levels, still parsed the old way).
    FastAPI asks for JSON only when the content type says JSON, as before.
    """

    async def json(self) -> Any:
        try:
            parsed = _BATCH_IN.validate_json(await self.body())
        except ValidationError:
            return await super().json()
        self.scope[_PARSED] = True
        return parsed


class _BatchRoute(APIRoute):
    """The batch route: its handler gets a :class:`_BatchRequest` (the route's signature,
    and so the OpenAPI document, stay what they were)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def batch_request(request: Request) -> Response:
            return await handler(_BatchRequest(request.scope, request.receive))

        return batch_request


router = APIRouter(prefix="/v1/batch", tags=["batch"], route_class=_BatchRoute)

ATTEMPTS = 3


def _sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None)


SessionDep = Annotated[Session, Depends(get_session)]


async def _merchant_unless_parsed(request: Request, session: SessionDep) -> Principal | None:
    """The merchant calling, checked in a worker thread before FastAPI validates the body,
    as on every route — unless the body is a valid ``BatchIn`` already: then nothing else
    can refuse the request first, and :func:`run_batch` checks the key in its own thread,
    first thing (one thread hop less per batch, ~10 % of a batch's CPU outside
    :func:`batch.run`, issue 20). Either way the key is looked up on every request."""
    if request.scope.get(_PARSED):
        return None
    return merchant_only(await run_in_threadpool(principal_of, request, session))


MerchantUnlessParsed = Annotated[Principal | None, Depends(_merchant_unless_parsed)]


@router.post("", response_model=BatchOut, responses=PROBLEMS)
def run_batch(
    request: Request, body: BatchIn, checked: MerchantUnlessParsed, session: SessionDep
) -> Response:
    """Many payment requests in one transaction and one commit (group commit).

    Each item is answered as its single endpoint would answer it (status and body), with
    its own idempotency key; items are independent and answered in order. A batch the
    database aborts to break a deadlock, or whose idempotency key a concurrent duplicate
    stored first, is run again (up to three times).
    """
    principal = checked if checked is not None else merchant_only(principal_of(request, session))
    request_id = getattr(request.state, "request_id", None)
    for attempt in range(1, ATTEMPTS + 1):
        ctx = make_ctx(request, session, principal)
        try:
            outcome = batch.run(ctx, body.requests, request_id)
            session.commit()
            break
        except DBAPIError as error:
            session.rollback()
            if attempt == ATTEMPTS or not batch.transient(error):
                raise
            # The whole transaction rolled back (keys included), so running it again is safe.
            log.warning("batch.retry", attempt=attempt, sqlstate=_sqlstate(error))
        except batch.KeyRace as race:
            session.rollback()  # a duplicate of an item won: run again, its answer replays
            if attempt == ATTEMPTS:
                raise ApiError(
                    409, "idempotency_in_flight", "requests with these keys are still running"
                ) from race
            log.warning("batch.retry", attempt=attempt, reason=str(race))
        except BaseException:
            session.rollback()
            raise
    metrics = request.app.state.settlement.metrics
    for problem in outcome.problems:
        if problem.decline_code:
            metrics.declines.labels(problem.decline_code).inc()
    return Response(encode_responses(outcome.answers), media_type="application/json")


def encode_responses(
    answers: Iterable[tuple[int, dict[str, Any] | orjson.Fragment, bool]],
) -> bytes:
    """The batch's response body, encoded once: a body with JSON text already (stored, or
    a replay of a stored one: :attr:`batch.Item.sent`) goes in as that text, the rest as
    dicts, written as ``orjson.dumps`` of each alone would write them."""
    responses = [
        {"status": status, "body": body, "replayed": replayed} for status, body, replayed in answers
    ]
    return orjson.dumps({"object": "batch", "responses": responses})
