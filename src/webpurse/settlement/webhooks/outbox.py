"""The outbox: events and their deliveries written in the caller's transaction, and pruned."""

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
    """
    if not EVENT_TYPE_RE.fullmatch(event_type):
        raise WebhookError(f"unknown event type {event_type!r}")
    created = _aware(now) if now is not None else _utcnow()
    event_id = new_id("evt")
    body = event_body(event_id, event_type, created, data)
    session.add(
        WebhookEvent(
            id=event_id,
            merchant_id=merchant_id,
            type=event_type,
            created_at=created,
            body=body.decode("utf-8"),
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
