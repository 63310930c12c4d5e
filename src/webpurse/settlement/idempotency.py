"""``Idempotency-Key`` on every POST: run once, replay the stored answer after that.

The key row is inserted (``INSERT … ON CONFLICT DO NOTHING``) in the same transaction as
the work and its stored response: one commit per request, so no other request ever sees
the row before its answer is stored in it. A concurrent request with the same key waits on
the key's unique index (PostgreSQL; SQLite serialises writers, so it waits for the write
lock) until the first request's transaction ends; its insert then does nothing and it
replays the stored answer — or, if the first rolled back, its insert claims the key and it
runs. The same key with a different request gets 422 ``idempotency_key_reused``. Refusals
are stored and replayed too (a service's refusal that does not keep its changes,
:func:`~webpurse.settlement.problems.keeps_changes`, rolls the work back and stores only
the refusal; a ledger refusal is 409 ``ledger_refused``); a crash (5xx) rolls back the key
with the work, so the client can retry.

A purchase step's successful answer (a payment created, authorised, captured: the route
says which, ``as_of``) is stored as a reference instead — the payment's id and the step —
when :func:`~.views.renders_as_of` confirms that the payment row renders it again exactly
(:func:`~.views.payment_as_of`); a replay re-renders it, byte for byte the first answer
even after the payment moved on (captured, refunded). Every other answer is stored as is.

The ``in_flight`` state (409 ``idempotency_in_flight``, a key abandoned after 5 minutes)
is never committed by this version: a row is ``in_flight`` only inside its own uncommitted
transaction. Older versions committed the key row before the work, and one whose request
died left it ``in_flight``; the branch stays to answer such rows, and is harmless otherwise.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from collections.abc import Callable, Collection
from typing import Any

import orjson
import structlog
from fastapi import Request
from fastapi.responses import JSONResponse
from sqlalchemy import (
    Delete,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    literal_column,
    select,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnClause

from webpurse.settlement.auth import Principal
from webpurse.settlement.db import among, among_bound, among_values, insert_ignoring_conflicts
from webpurse.settlement.errors import SettlementError
from webpurse.settlement.ledger import LedgerError
from webpurse.settlement.models import IdempotencyRecord, Payment
from webpurse.settlement.problems import (
    PROBLEM_JSON,
    ApiError,
    bad_request,
    conflict,
    keeps_changes,
    ledger_refused,
    problem,
)
from webpurse.settlement.views import payment_as_of, renders_as_of

log = structlog.get_logger(__name__)

MAX_KEY_LENGTH = 255
# Only rows committed by older versions (key row before the work) can be seen "in flight":
# one still there after this long belongs to a request that died; the key runs afresh.
ABANDONED_AFTER = dt.timedelta(minutes=5)
# Keys are kept at least this long (payments-api.md: at least 24 hours).
KEEP_FOR = dt.timedelta(days=7)
# Keys forgotten per committed chunk of the sweep (:func:`purge`).
PURGE_CHUNK = 5000
_KEYS: Table = IdempotencyRecord.__table__  # type: ignore[assignment]
Handler = Callable[[], tuple[int, dict[str, Any]]]


def lookup(principal: str, keys: Collection[str], dialect: str = "postgresql") -> Select[Any]:
    """The stored rows of ``principal``'s ``keys``: the one statement both paths run.

    A request's replay (:func:`_replay`) and a batch's look-up of its items' keys
    (``batch._check_keys``) both use it, so the plan test
    (``tests/settlement/test_idempotency_plan.py``) explains exactly what they run. On
    PostgreSQL the keys are one bound array (``db.among``): the same statement text for
    any number of keys.
    """
    return select(_KEYS).where(among(dialect, _KEYS.c.key, keys), _KEYS.c.principal == principal)


@functools.cache
def lookup_bound(dialect: str) -> Select[Any]:
    """:func:`lookup` built once per dialect, its values bound when it runs
    (:func:`lookup_values`): the same SQL, without building and hashing a statement for
    every batch (issue 20, a batch's fixed cost)."""
    return select(_KEYS).where(
        among_bound(dialect, _KEYS.c.key, "keys"), _KEYS.c.principal == bindparam("principal")
    )


def lookup_values(principal: str, keys: Collection[str], dialect: str) -> dict[str, Any]:
    """The parameters of :func:`lookup_bound`. A key holding a NUL (which no PostgreSQL
    text can store, and which the routes refuse first) raises ``ValueError``."""
    return {"keys": among_values(dialect, keys), "principal": principal}


def fingerprint(method: str, path: str, payload: Any, *, plain: bool = False) -> str:
    """SHA-256 of the method, the path and the payload as canonical JSON (sorted keys, no
    spaces, ASCII with ``\\u`` escapes): stored with each key, so it never changes.

    Where both encoders write the same text (:func:`_plain` JSON, ASCII below DEL: json
    escapes the rest, and orjson refuses a lone surrogate) orjson writes it, ~10× faster;
    every item of a batch is fingerprinted (issue 20, the HTTP edge's share per item).
    ``plain``: the caller knows ``payload`` is :func:`_plain` (a validated model's fields,
    every one of a JSON-native annotation: batch's ``_NATIVE``), so it is not walked; an
    int past 64 bits, a lone surrogate and non-ASCII text still go the json way."""
    head = f"{method} {path}\n".encode()
    if plain or _plain(payload):
        try:
            canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # a lone surrogate, which UTF-8 cannot hold
            pass
        else:
            if canonical.isascii() and b"\x7f" not in canonical:
                return hashlib.sha256(head + canonical).hexdigest()
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(head + canonical).hexdigest()


_PLAIN_INT = 1 << 63


def _plain(value: Any) -> bool:
    """Whether ``value`` is JSON both encoders write alike: str keys, str, int within 64
    bits, bool, None, and dicts and lists of them (no floats, no subclasses)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-_PLAIN_INT <= value < _PLAIN_INT)
    if kind is dict:
        # One loop, recursing only into what is not a string (a body is mostly strings).
        for key, item in value.items():
            if type(key) is not str or (type(item) is not str and not _plain(item)):
                return False
        return True
    if kind is list:
        return all(_plain(item) for item in value)
    return False


def _problem(request: Request, refusal: SettlementError) -> tuple[int, dict[str, Any]]:
    error = problem(refusal)
    metrics = request.app.state.settlement.metrics
    if error.decline_code:
        metrics.declines.labels(error.decline_code).inc()
    log.info("http.problem", code=error.code, decline_code=error.decline_code, status=error.status)
    return error.status, error.body(getattr(request.state, "request_id", None))


def _respond(status: int, body: dict[str, Any], replayed: bool = False) -> JSONResponse:
    media = PROBLEM_JSON if status >= 400 else "application/json"
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return JSONResponse(body, status_code=status, media_type=media, headers=headers)


def _claim(session: Session, subject: str, key: str, print_: str, now: dt.datetime) -> bool:
    """Insert the key row in the request's transaction; False if the key exists.

    On PostgreSQL a concurrent request with the same key waits here on the unique index
    until the first request's transaction ends, then finds its stored answer (or, if that
    transaction rolled back, claims the key itself).
    """
    row = {
        "principal": subject,
        "key": key,
        "fingerprint": print_,
        "state": "in_flight",
        "created_at": now,
    }
    stmt = insert_ignoring_conflicts(session, _KEYS, [row]).returning(_KEYS.c.key)
    return session.execute(stmt).scalar_one_or_none() is not None


def _the_key(principal: str, key: str) -> Any:
    """The row of ``principal``'s ``key``: its primary key."""
    return and_(_KEYS.c.key == key, _KEYS.c.principal == principal)


def stored_fingerprint(print_: str) -> str:
    """:func:`fingerprint` as ``db.bulk_insert`` stores it: PostgreSQL's text of a bytea.

    The column holds the digest's 32 bytes (:class:`~.models.Digest`); the JSON rows of a
    bulk insert carry text, which PostgreSQL reads into a bytea as ``\\x`` and hex digits.
    """
    return "\\x" + print_


def reference(
    session: Session, status: int, body: dict[str, Any], as_of: str | None
) -> dict[str, Any] | None:
    """The reference (object id, step) to store instead of ``body``, if one re-renders it.

    ``as_of`` is the purchase step whose answer ``body`` is (None: not one); the payment
    is the one the session holds (the handler just changed it).
    """
    if as_of is None or not 200 <= status < 300 or body.get("object") != "payment":
        return None
    payment = session.get(Payment, body.get("id"))
    if payment is None or not renders_as_of(body, payment, as_of):
        return None
    return {"response_body": None, "object_id": payment.id, "step": as_of}


def replayed_body(session: Session, record: Any) -> dict[str, Any] | None:
    """A stored answer: its body, or re-rendered from its reference; None if it has neither."""
    if record.response_body is not None:
        body: dict[str, Any] = json.loads(record.response_body)
        return body
    if record.step is None or record.object_id is None:
        return None
    payment = session.get(Payment, record.object_id)
    if payment is None:  # payments are never deleted
        raise LookupError(f"idempotency key {record.key}: payment {record.object_id} is gone")
    return payment_as_of(payment, record.step)


def _store(
    session: Session,
    subject: str,
    key: str,
    status: int,
    body: dict[str, Any],
    as_of: str | None,
) -> None:
    answer = reference(session, status, body, as_of) or {"response_body": json.dumps(body)}
    session.execute(
        update(_KEYS)
        .where(_the_key(subject, key))
        .values(state="done", response_status=status, **answer)
    )


def _call(handler: Handler) -> tuple[int, dict[str, Any]]:
    """Run the handler; a transfer the ledger refuses is a refusal like any other (409)."""
    try:
        return handler()
    except LedgerError as exc:
        log.warning("ledger.refused", detail=str(exc))
        raise ledger_refused(str(exc)) from exc


def run(
    request: Request,
    session: Session,
    principal: Principal,
    key: str | None,
    payload: Any,
    handler: Handler,
    *,
    as_of: str | None = None,
) -> JSONResponse:
    """Run ``handler`` (which works in ``session``) at most once per idempotency key.

    The key row, the work and the stored response are one transaction and one commit
    (payments-api.md: local work runs in one transaction with the key row). A refusal
    that must not keep the work's changes (:func:`~.problems.keeps_changes`) rolls the work back
    and stores the refusal under the key in a second, short transaction. Any other
    exception rolls everything back, the key included, so the client can retry; a
    :class:`~webpurse.settlement.ledger.LedgerError` is the refusal 409 ``ledger_refused``.
    ``as_of``: the purchase step the handler's payment answer is, stored as a reference.
    """
    if key is None:
        try:
            status, body = _call(handler)
        except SettlementError as error:
            if not keeps_changes(error):
                session.rollback()
            status, body = _problem(request, error)
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
    try:
        if not _claim(session, principal.subject, key, print_, now):
            return _replay(request, session, principal, key, payload, handler, print_, now, as_of)
        try:
            status, body = _call(handler)
        except SettlementError as error:
            status, body = _problem(request, error)
            if not keeps_changes(error):
                session.rollback()
                if not _claim(session, principal.subject, key, print_, now):
                    # another request took the key meanwhile
                    session.commit()
                    return _respond(status, body)
        _store(session, principal.subject, key, status, body, as_of)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return _respond(status, body)


def _replay(
    request: Request,
    session: Session,
    principal: Principal,
    key: str,
    payload: Any,
    handler: Handler,
    print_: str,
    now: dt.datetime,
    as_of: str | None,
) -> JSONResponse:
    """The key exists: replay its answer, refuse a different request, or 409 in flight.

    ``in_flight`` here is a row an older version committed before its work (see the module
    docstring); this version's key rows are committed only with their answer.
    """
    existing = session.execute(
        lookup(principal.subject, [key], session.get_bind().dialect.name)
    ).one_or_none()
    if existing is None:
        # The purge forgot the key (older than KEEP_FOR) after the claim found it: on
        # PostgreSQL each statement sees what committed before it. It runs afresh.
        session.rollback()
        return run(request, session, principal, key, payload, handler, as_of=as_of)
    body = replayed_body(session, existing) if existing.state == "done" else None
    session.rollback()
    if existing.fingerprint != print_:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was used with different request parameters",
            param="Idempotency-Key",
        )
    if existing.state != "done" and existing.created_at < now - ABANDONED_AFTER:
        log.warning("idempotency.abandoned", key=key)
        session.execute(delete(_KEYS).where(_the_key(principal.subject, key)))
        session.commit()
        return run(request, session, principal, key, payload, handler, as_of=as_of)
    if body is None:
        raise conflict(
            "idempotency_in_flight", "a request with this Idempotency-Key is still running"
        )
    log.info("idempotency.replay", key=key)
    return _respond(existing.response_status or 200, body, replayed=True)


def purge(session: Session, now: dt.datetime, *, limit: int | None = None) -> int:
    """Forget at most ``limit`` keys older than :data:`KEEP_FOR`, oldest first; how many.

    Bounded so that one pass never deletes a whole backlog in one transaction (at 750
    purchases/s a sweep interval of 30 s leaves ~67,000 keys to forget): the expiry sweep
    calls it in committed chunks until a chunk finds fewer (``expiry.sweep``). The oldest
    rows are found on ``ix_idempotency_keys_created_at`` and deleted where they lie
    (:func:`oldest_keys`; ``tests/settlement/test_idempotency_plan.py`` checks its plan).
    A key younger than ``KEEP_FOR`` is never touched, so a retry within the documented
    window is always replayed.
    """
    limit = PURGE_CHUNK if limit is None else limit
    if limit < 1:
        raise ValueError("a purge chunk forgets at least one key")
    result = session.execute(oldest_keys(now, limit, session.get_bind().dialect.name))
    return int(getattr(result, "rowcount", 0) or 0)


def oldest_keys(now: dt.datetime, limit: int, dialect: str = "postgresql") -> Delete:
    """:func:`purge`'s statement: the ``limit`` oldest keys, deleted by where the rows lie.

    The rows are named by their place in the table (PostgreSQL's ``ctid``, SQLite's
    ``rowid``), so the delete goes straight to them: by their primary key it would descend
    the (key, principal) index once per key, in random order, ~5× the time of a chunk on
    PostgreSQL (there is no surrogate id any more, migration 0016). A ``ctid`` names a row
    only until it is updated; a key row older than :data:`KEEP_FOR` never is.
    """
    place: ColumnClause[Any] = literal_column("ctid" if dialect == "postgresql" else "rowid")
    oldest = (
        select(place)
        .select_from(_KEYS)
        .where(_KEYS.c.created_at < now - KEEP_FOR)
        .order_by(_KEYS.c.created_at)
        .limit(limit)
    )
    return delete(_KEYS).where(place.in_(oldest))
