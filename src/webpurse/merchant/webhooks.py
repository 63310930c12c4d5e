"""Verifying settlement's webhooks (Standard Webhooks; docs/team/contracts.md).

The shop's own verifier: it talks to settlement over HTTP only and imports nothing from
``webpurse.settlement`` (the import contracts, docs/architecture.md). HMAC-SHA256 over
``id.timestamp.body`` with the base64 secret after ``whsec_``, compared in constant time,
timestamps at most 5 minutes off — the Standard Webhooks check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from webpurse.reader.remote.shared import SharedState

TOLERANCE = 300
SEEN_EVENTS = 10_000
"""Event ids :class:`SeenEvents` remembers at most."""
SEEN_EVENT_AGE = 3600.0
"""Seconds :class:`SeenEvents` remembers an event id after its last delivery."""


class WebhookRejected(Exception):
    """The delivery is not genuine (or too old): refuse it with 400 and change nothing."""


def _local_verify(secret: str, headers: Mapping[str, str], body: bytes, now: float) -> None:
    lowered = {key.lower(): value for key, value in headers.items()}
    msg_id = lowered.get("webhook-id", "").strip()
    stamp = lowered.get("webhook-timestamp", "").strip()
    signatures = lowered.get("webhook-signature", "").strip()
    if not (msg_id and stamp and signatures):
        raise WebhookRejected("missing webhook headers")
    if not stamp.isdigit() or len(stamp) > 12:
        raise WebhookRejected("webhook-timestamp is not unix seconds")
    if abs(now - int(stamp)) > TOLERANCE:
        raise WebhookRejected("webhook-timestamp too far from now")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError as exc:
        raise WebhookRejected("webhook secret is not base64") from exc
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = ("v1," + base64.b64encode(digest).decode("ascii")).encode("ascii")
    matched = False
    for candidate in signatures.split():
        matched |= hmac.compare_digest(candidate.encode("utf-8", "replace"), expected)
    if not matched:
        raise WebhookRejected("no webhook-signature matches the body")


def verify_delivery(
    secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> None:
    """Raise :class:`WebhookRejected` unless the delivery is genuine and fresh."""
    when = time.time() if now is None else now
    _local_verify(secret, headers, body, when)


class SeenEvents:
    """Webhook event ids already handled, so a redelivery is answered without work.

    Settlement delivers at least once, so the same event can come again; handling one
    only re-fetches the object from settlement, so a duplicate that slips past this set
    is harmless, and the set can be small. A bounded LRU: at most ``max_size`` ids (the
    least recently delivered is forgotten first), none kept ``max_age`` seconds after its
    last delivery. ``clock`` is monotonic seconds, injected for tests.
    """

    def __init__(
        self,
        max_size: int = SEEN_EVENTS,
        max_age: float = SEEN_EVENT_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_size = max_size
        self._max_age = max_age
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # id → last delivery, oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def _expire(self, now: float) -> None:
        while self._seen:
            oldest, when = next(iter(self._seen.items()))
            if now - when < self._max_age:
                break
            del self._seen[oldest]

    def __contains__(self, event_id: object) -> bool:
        """Seen (and not yet forgotten)? A hit counts as a delivery: it stays longer."""
        now = self._clock()
        self._expire(now)
        if not isinstance(event_id, str) or event_id not in self._seen:
            return False
        self._seen[event_id] = now
        self._seen.move_to_end(event_id)
        return True

    def add(self, event_id: str) -> None:
        now = self._clock()
        self._expire(now)
        self._seen[event_id] = now
        self._seen.move_to_end(event_id)
        while len(self._seen) > self._max_size:
            self._seen.popitem(last=False)

    async def seen(self, event_id: str) -> bool:
        """``event_id in self``, the way every process's dedupe set is asked."""
        return event_id in self

    async def remember(self, event_id: str) -> None:
        """:meth:`add`, the way every process's dedupe set is told."""
        self.add(event_id)


class RedisSeenEvents:
    """Webhook event ids already handled, shared by every shop process (the shop's Redis).

    One key per event id, set once it was handled (``SET NX`` with ``max_age`` as its
    lifetime; Redis forgets it then); a redelivery to any process is answered without work.
    """

    def __init__(self, shared: SharedState, max_age: float = SEEN_EVENT_AGE) -> None:
        self._shared = shared
        self._max_age = max_age

    def _key(self, event_id: str) -> str:
        return self._shared.key("webhook-seen", event_id)

    async def seen(self, event_id: str) -> bool:
        with self._shared.guard("checking a webhook event"):
            return bool(await self._shared.redis.exists(self._key(event_id)))

    async def remember(self, event_id: str) -> None:
        with self._shared.guard("remembering a webhook event"):
            await self._shared.redis.set(
                self._key(event_id), b"1", nx=True, ex=max(1, int(self._max_age))
            )
