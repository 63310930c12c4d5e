"""HTTP route for batches (merchant key): POST /v1/batch — see :mod:`.batch`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import orjson
import structlog
from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from webpurse.settlement import batch
from webpurse.settlement.auth import MerchantPrincipal
from webpurse.settlement.deps import PROBLEMS, make_ctx
from webpurse.settlement.problems import ApiError
from webpurse.settlement.schemas import BatchIn, BatchOut
from webpurse.settlement.sessions import get_session

log = structlog.get_logger(__name__)
router = APIRouter(prefix="/v1/batch", tags=["batch"])

ATTEMPTS = 3


def _sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None)


SessionDep = Annotated[Session, Depends(get_session)]


@router.post("", response_model=BatchOut, responses=PROBLEMS)
def run_batch(
    request: Request, body: BatchIn, principal: MerchantPrincipal, session: SessionDep
) -> Response:
    """Many payment requests in one transaction and one commit (group commit).

    Each item is answered as its single endpoint would answer it (status and body), with
    its own idempotency key; items are independent and answered in order. A batch the
    database aborts to break a deadlock, or whose idempotency key a concurrent duplicate
    stored first, is run again (up to three times).
    """
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
