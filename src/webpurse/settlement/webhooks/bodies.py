"""Event types and the JSON body every delivery of an event carries (pure)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from webpurse.settlement.event_types import EVENT_TYPES as _EVENT_TYPES

_RESOURCES = ("payment", "refund", "load")
EVENT_TYPE_RE = re.compile(r"(payment|refund|load|float)\.[a-z][a-z_]{0,40}")
EVENT_FILTER_RE = re.compile(r"\*|(payment|refund|load|float)\.(\*|[a-z][a-z_]{0,40})")

EVENT_TYPES: tuple[str, ...] = tuple(sorted(_EVENT_TYPES))
"""The event types settlement emits today (others of the same families may be added)."""


def event_matches(filters: list[str], event_type: str) -> bool:
    """Whether an endpoint subscribed to ``filters`` (``*``, ``payment.*``, exact) wants it."""
    family = event_type.split(".", 1)[0]
    return any(f in ("*", event_type, f"{family}.*") for f in filters)


def event_body(
    event_id: str, event_type: str, created_at: datetime, data: Mapping[str, Any]
) -> bytes:
    """The JSON body every delivery of an event carries, byte for byte.

    ``data`` becomes the event's ``data`` member; a ``data`` without an ``object`` member
    that is itself an object (e.g. a bare Payment, whose ``object`` is ``"payment"``) is
    wrapped as ``{"object": data}``, so the body is always ``{id, type, created_at,
    data: {object: …}}``.
    """
    wrapped = dict(data) if isinstance(data.get("object"), dict) else {"object": dict(data)}
    document = {
        "id": event_id,
        "type": event_type,
        "created_at": _iso(created_at),
        "data": wrapped,
    }
    return json.dumps(document, separators=(",", ":"), default=_json_default).encode("utf-8")


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, bytes):
        return value.hex().upper()
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        return isoformat()
    raise TypeError(f"cannot put {type(value).__name__} into a webhook event")
