"""The event types settlement tells merchants about (docs/webhooks.md).

Its own module so that both :mod:`.events` (which checks what it emits) and
:mod:`.webhooks` (which lists them) use it without importing each other.
"""

from __future__ import annotations

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
