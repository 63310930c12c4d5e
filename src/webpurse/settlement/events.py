"""The hook through which state changes merchants care about reach the webhook outbox.

Call :func:`emit` inside the same database transaction as the change, so the event exists
exactly when the change does. ``webpurse.settlement.webhooks.enqueue_event`` (owned by the
webhooks work) persists it; until that module exists, events are dropped here.
"""

from __future__ import annotations

import datetime as dt
import importlib
from typing import Any

from sqlalchemy.orm import Session

EVENT_TYPES = frozenset(
    {
        "payment.succeeded",
        "payment.failed",
        "payment.uncertain",
        "payment.canceled",
        "payment.expired",
        "refund.created",
        "refund.succeeded",
        "refund.failed",
        "load.succeeded",
        "load.failed",
        "load.uncertain",
        "load.funded",
        "float.low",
    }
)


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
    try:
        webhooks = importlib.import_module("webpurse.settlement.webhooks")
    except ModuleNotFoundError as exc:
        if exc.name != "webpurse.settlement.webhooks":
            raise
        return
    webhooks.enqueue_event(session, merchant_id, event_type, data, now=now)
