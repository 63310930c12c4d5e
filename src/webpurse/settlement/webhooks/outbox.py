"""The outbox: events and their deliveries written in the caller's transaction, and pruned.

An event whose body the payment row renders again exactly — ``payment.succeeded``, the
purchase's own event, whose ``data`` is the payment as captured — is stored small: its
type, time and the payment's id, body NULL (:func:`event_fields`). Its deliveries and the
merchant's event list render the body from the payment as of the capture
(:func:`event_bytes`, :func:`~webpurse.settlement.views.payment_as_of`): the same bytes,
so the same signatures. Every other event stores its body, as do rows from before.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    delete,
    select,
)
from sqlalchemy.orm import Session

from webpurse.settlement.models import Payment
from webpurse.settlement.views import payment_as_of, renders_as_of
from webpurse.settlement.webhooks.bodies import EVENT_TYPE_RE, event_body, event_matches
from webpurse.settlement.webhooks.errors import WebhookError
from webpurse.settlement.webhooks.tables import (
    MessageStatus,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookEvent,
    WebhookMessage,
    _aware,
    _utcnow,
    new_id,
)

log = structlog.get_logger(__name__)

AS_OF_STEP = {"payment.succeeded": "capture"}
"""The events whose body is the payment as of a purchase step, and that step."""


def event_fields(
    event_id: str,
    event_type: str,
    created_at: datetime,
    data: Mapping[str, Any],
    payment: Payment | None = None,
) -> dict[str, Any]:
    """The stored columns of an event beyond its id, type and time: its body, or — if
    ``payment`` renders ``data`` again exactly as of the event's step — the payment's id."""
    step = AS_OF_STEP.get(event_type)
    if (
        step is not None
        and payment is not None
        and isinstance(data, dict)
        and renders_as_of(data, payment, step)
    ):
        return {"body": None, "object_id": payment.id}
    body = event_body(event_id, event_type, created_at, data)
    return {"body": body.decode("utf-8"), "object_id": None}


def event_bytes(session: Session, event: WebhookEvent) -> bytes:
    """The body every delivery of ``event`` carries: stored, or rendered from its payment."""
    if event.body is not None:
        return event.body.encode("utf-8")
    payment = session.get(Payment, event.object_id)
    if payment is None:  # payments are never deleted
        raise WebhookError(f"event {event.id}: payment {event.object_id} is gone")
    data = payment_as_of(payment, AS_OF_STEP[event.type])
    return event_body(event.id, event.type, _aware(event.created_at), data)


def enqueue_event(
    session: Session,
    merchant_id: str,
    event_type: str,
    data: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> str:
    """Record an event and queue one delivery per subscribed endpoint; return ``evt_…``.

    Runs in the caller's transaction (it flushes, never commits): the event exists exactly
    when the state change that caused it commits. ``data`` is the event's ``data`` member
    (see :func:`event_body`), e.g. ``{"object": payment_json}`` or the bare payment JSON.
    A payment's event that its row renders again is stored without its body
    (:func:`event_fields`).
    """
    if not EVENT_TYPE_RE.fullmatch(event_type):
        raise WebhookError(f"unknown event type {event_type!r}")
    created = _aware(now) if now is not None else _utcnow()
    event_id = new_id("evt")
    payment = None
    if event_type in AS_OF_STEP and data.get("object") == "payment":
        payment = session.get(Payment, data.get("id"))  # the caller's: no query
    fields = event_fields(event_id, event_type, created, data, payment)
    session.add(
        WebhookEvent(
            id=event_id, merchant_id=merchant_id, type=event_type, created_at=created, **fields
        )
    )
    endpoints = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.merchant_id == merchant_id, WebhookEndpoint.deleted_at.is_(None)
        )
    ).all()
    for endpoint in endpoints:
        if event_matches(list(endpoint.events), event_type):
            session.add(new_message(event_id, endpoint.id, created))
    session.flush()
    return event_id


def new_message(event_id: str, endpoint_id: str, now: datetime) -> WebhookMessage:
    return WebhookMessage(
        id=new_id("msg"),
        event_id=event_id,
        endpoint_id=endpoint_id,
        status=MessageStatus.PENDING.value,
        attempts=0,
        window_started_at=now,
        next_attempt_at=now,
        updated_at=now,
    )


DELIVERY_RETENTION = timedelta(days=30)
"""How long a delivered message and its attempt log are kept (docs/webhooks.md)."""
PRUNE_BATCH = 5000
"""At most this many delivered messages are pruned per sweep, so one sweep stays short."""


def prune_delivered(
    session: Session,
    now: datetime,
    *,
    retention: timedelta = DELIVERY_RETENTION,
    batch: int = PRUNE_BATCH,
) -> int:
    """Forget deliveries that succeeded more than ``retention`` ago; return how many.

    Runs in the caller's transaction (the periodic expiry sweep). Deletes the delivered
    messages' attempt log and the messages, and then each event older than ``retention``
    whose every delivery was one of them. Undelivered, failed and canceled deliveries and
    their events stay (the merchant may still list and redeliver them), and so do events
    that never had an endpoint (listed for polling).
    """
    cutoff = _aware(now) - retention
    doomed = list(
        session.scalars(
            select(WebhookMessage.id)
            .where(
                WebhookMessage.status == MessageStatus.SUCCEEDED.value,
                WebhookMessage.delivered_at < cutoff,
            )
            .order_by(WebhookMessage.delivered_at, WebhookMessage.id)
            .limit(batch)
        )
    )
    if not doomed:
        return 0
    touched = set(
        session.scalars(
            select(WebhookMessage.event_id).where(WebhookMessage.id.in_(doomed)).distinct()
        )
    )
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.message_id.in_(doomed)))
    session.execute(delete(WebhookMessage).where(WebhookMessage.id.in_(doomed)))
    remaining = set(
        session.scalars(
            select(WebhookMessage.event_id).where(WebhookMessage.event_id.in_(touched)).distinct()
        )
    )
    emptied = sorted(touched - remaining)
    if emptied:
        session.execute(
            delete(WebhookEvent).where(
                WebhookEvent.id.in_(emptied), WebhookEvent.created_at < cutoff
            )
        )
    log.info("webhooks.pruned", messages=len(doomed), events=len(emptied))
    return len(doomed)
