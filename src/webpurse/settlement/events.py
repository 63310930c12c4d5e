"""The hook through which state changes merchants care about reach the webhook outbox.

Call :func:`emit` inside the same database transaction as the change, so the event exists
exactly when the change does. :func:`webpurse.settlement.webhooks.enqueue_event` persists it
in the outbox; imported directly, so a broken webhooks module fails at start-up instead of
dropping events.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.orm import Session

from webpurse.settlement.event_types import EVENT_TYPES
from webpurse.settlement.webhooks import enqueue_event

__all__ = ["EVENT_TYPES", "emit"]


def emit(
    session: Session,
    merchant_id: str | None,
    event_type: str,
    data: dict[str, Any],
    *,
    now: dt.datetime | None = None,
) -> None:
    """Queue ``event_type`` with ``data`` (the object, as the API shows it) for the merchant.

    ``now`` is the operation's (injected) clock: the event's time and first delivery time.
    """
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    if merchant_id is None:  # operator-initiated loads have no merchant to tell
        return
    enqueue_event(session, merchant_id, event_type, data, now=now)
