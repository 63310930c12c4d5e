"""``Idempotency-Key`` on every POST: run once, replay the stored answer after that.

The key row is committed as ``in_flight`` before the work starts (so a concurrent request
with the same key gets 409 ``idempotency_in_flight``), and the response is stored in the
same transaction as the work it describes. The same key with a different request gets
422 ``idempotency_key_reused``. Refusals are stored and replayed too; a crash (5xx)
deletes the key so the client can retry.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from typing import Any

import structlog
from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from webpurse.settlement.auth import Principal
from webpurse.settlement.models import IdempotencyRecord
from webpurse.settlement.problems import PROBLEM_JSON, ApiError, bad_request, conflict

log = structlog.get_logger(__name__)

MAX_KEY_LENGTH = 255
# A key still "in flight" after this long belongs to a request that died with its process
# (its transaction rolled back): the next request with the key runs afresh.
ABANDONED_AFTER = dt.timedelta(minutes=5)
# Keys are kept at least this long (payments-api.md: at least 24 hours).
KEEP_FOR = dt.timedelta(days=7)
Handler = Callable[[], tuple[int, dict[str, Any]]]


def fingerprint(method: str, path: str, payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()


def _problem(request: Request, error: ApiError) -> tuple[int, dict[str, Any]]:
    metrics = request.app.state.settlement.metrics
    if error.decline_code:
        metrics.declines.labels(error.decline_code).inc()
    log.info("http.problem", code=error.code, decline_code=error.decline_code, status=error.status)
    return error.status, error.body(getattr(request.state, "request_id", None))


def _respond(status: int, body: dict[str, Any], replayed: bool = False) -> JSONResponse:
    media = PROBLEM_JSON if status >= 400 else "application/json"
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSONResponse(body, status_code=status, media_type=media, headers=headers)


def _execute(request: Request, session: Session, handler: Handler) -> tuple[int, dict[str, Any]]:
    """Run the handler; keep its changes unless it raised a non-committing ApiError."""
    try:
        return handler()
    except ApiError as error:
        if not error.commit:
            session.rollback()
        return _problem(request, error)


def run(
    request: Request,
    session: Session,
    principal: Principal,
    key: str | None,
    payload: Any,
    handler: Handler,
) -> JSONResponse:
    """Run ``handler`` (which works in ``session``) at most once per idempotency key."""
    if key is None:
        status, body = _execute(request, session, handler)
        session.commit()
        return _respond(status, body)
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key must be 1 to 255 characters",
            "Idempotency-Key",
        )
    print_ = fingerprint(request.method, request.url.path, payload)
    now = request.app.state.settlement.clock()
    record = IdempotencyRecord(
        principal=principal.subject, key=key, fingerprint=print_, state="in_flight", created_at=now
    )
    session.add(record)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        existing = session.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.principal == principal.subject, IdempotencyRecord.key == key
            )
        ).one()
        if existing.fingerprint != print_:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with different request parameters",
                param="Idempotency-Key",
            ) from None
        if existing.state != "done" and existing.created_at < now - ABANDONED_AFTER:
            log.warning("idempotency.abandoned", key=key)
            session.delete(existing)
            session.commit()
            return run(request, session, principal, key, payload, handler)
        if existing.state != "done" or existing.response_body is None:
            raise conflict(
                "idempotency_in_flight", "a request with this Idempotency-Key is still running"
            ) from None
        log.info("idempotency.replay", key=key)
        return _respond(
            existing.response_status or 200, json.loads(existing.response_body), replayed=True
        )
    try:
        status, body = _execute(request, session, handler)
        record = session.merge(record)
        record.state = "done"
        record.response_status = status
        record.response_body = json.dumps(body)
        session.commit()
    except BaseException:
        session.rollback()
        session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.id == record.id))
        session.commit()
        raise
    return _respond(status, body)


def purge(session: Session, now: dt.datetime) -> int:
    """Forget keys older than :data:`KEEP_FOR`; returns how many."""
    result = session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.created_at < now - KEEP_FOR)
    )
    return int(getattr(result, "rowcount", 0) or 0)
