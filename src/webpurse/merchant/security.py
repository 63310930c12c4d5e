"""The shop's small security primitives, sans I/O: signed values, top-up links, rate limits.

- :func:`sign` / :func:`unsign`: a value with an HMAC-SHA256 tag (the staff session cookie
  carries its id this way, so a guessed or altered cookie is refused before any lookup);
- :func:`make_link` / :func:`open_link`: the signed, expiring link to one top-up order (the
  receipt link of an online top-up); a forged one is refused, an expired one too;
- :class:`RateLimiter`: failures per key in a sliding window (sign-in attempts per account
  and per client address);
- :func:`parse_yuan`: ``"200"`` / ``"200.5"`` / ``"200.50"`` → 20050 fen, integers only.

Every comparison of a secret is constant-time; the clock is injected.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from webpurse.reader.remote.shared import SharedState


def _tag(secret: bytes, purpose: str, value: str) -> str:
    digest = hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def sign(secret: bytes, purpose: str, value: str) -> str:
    """``value.tag``: the tag binds the value to ``purpose`` (a cookie is no link)."""
    return f"{value}.{_tag(secret, purpose, value)}"


def unsign(secret: bytes, purpose: str, signed: str | None) -> str | None:
    """The value when the tag is genuine, else None (compared in constant time)."""
    if not signed or len(signed) > 512 or "." not in signed:
        return None
    value, _, tag = signed.rpartition(".")
    expected = _tag(secret, purpose, value)
    if not hmac.compare_digest(tag.encode("ascii", "replace"), expected.encode("ascii")):
        return None
    return value


class LinkRefused(Exception):
    """A top-up link that is malformed, forged (``forged``) or past its time (``expired``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


LINK_PURPOSE = "topup-link"
_ORDER_ID = re.compile(r"^ord_[A-Za-z0-9]{8,36}$")


def make_link(secret: bytes, order_id: str, expires_at: int) -> str:
    """The token of ``/topup/link/<token>``: the order id and its expiry (unix s), signed."""
    return sign(secret, LINK_PURPOSE, f"{order_id}.{expires_at}")


def open_link(secret: bytes, token: str, now: float) -> str:
    """The order id of a genuine, unexpired link; else :class:`LinkRefused`."""
    value = unsign(secret, LINK_PURPOSE, token)
    if value is None:
        raise LinkRefused("forged")
    order_id, _, expires = value.partition(".")
    if not _ORDER_ID.fullmatch(order_id) or not expires.isdigit():
        raise LinkRefused("malformed")
    if now >= int(expires):
        raise LinkRefused("expired")
    return order_id


@dataclass
class RateLimiter:
    """At most ``limit`` failures per key within ``window`` seconds; then refused until the
    oldest failure leaves the window. A success does not erase earlier failures of an
    address (an attacker's one good guess elsewhere must not reset its count); visible
    reset an account's count on its own successful sign-in."""

    limit: int
    window: float
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str) -> deque[float]:
        now = self.clock()
        failures = self._failures.get(key)
        if failures is None:
            return deque()
        while failures and now - failures[0] >= self.window:
            failures.popleft()
        if not failures:
            del self._failures[key]
        return failures

    def allowed(self, key: str) -> bool:
        return len(self._recent(key)) < self.limit

    def retry_after(self, key: str) -> int:
        """Seconds until one more attempt is allowed (0 when allowed now)."""
        failures = self._recent(key)
        if len(failures) < self.limit:
            return 0
        return max(1, int(failures[0] + self.window - self.clock()) + 1)

    def failed(self, key: str) -> None:
        self._recent(key)
        self._failures.setdefault(key, deque()).append(self.clock())
        if len(self._failures) > 100_000:  # bounded memory under a spray of keys
            oldest = next(iter(self._failures))
            del self._failures[oldest]

    def reset(self, key: str) -> None:
        self._failures.pop(key, None)

    # The interface every limiter has (the shared one asks Redis):

    async def refused_for(self, key: str) -> int:
        """0 when ``key`` may try now, else the seconds until it may."""
        return 0 if self.allowed(key) else self.retry_after(key)

    async def record_failure(self, key: str) -> None:
        self.failed(key)

    async def clear(self, key: str) -> None:
        self.reset(key)


class RedisRateLimiter:
    """:class:`RateLimiter` shared by every shop process (the shop's Redis): a sorted set
    of failure times (wall clock) per key, expiring with the window."""

    def __init__(
        self,
        shared: SharedState,
        name: str,
        limit: int,
        window: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._shared = shared
        self._name = name
        self.limit = limit
        self.window = window
        self._clock = clock

    def _key(self, key: str) -> str:
        return self._shared.key("limit", self._name, key)

    async def refused_for(self, key: str) -> int:
        now = self._clock()
        redis_key = self._key(key)
        with self._shared.guard("checking a sign-in limit"):
            await self._shared.redis.zremrangebyscore(redis_key, "-inf", now - self.window)
            if int(await self._shared.redis.zcard(redis_key)) < self.limit:
                return 0
            oldest = await self._shared.redis.zrange(redis_key, 0, 0, withscores=True)
        first = float(oldest[0][1]) if oldest else now
        return max(1, int(first + self.window - now) + 1)

    async def record_failure(self, key: str) -> None:
        now = self._clock()
        redis_key = self._key(key)
        with self._shared.guard("counting a failed sign-in"):
            async with self._shared.redis.pipeline(transaction=True) as pipe:
                pipe.zadd(redis_key, {f"{now:.6f}:{secrets.token_hex(4)}": now})
                pipe.zremrangebyrank(redis_key, 0, -self.limit - 1)
                pipe.pexpire(redis_key, int(self.window * 1000))
                await pipe.execute()

    async def clear(self, key: str) -> None:
        with self._shared.guard("clearing a sign-in limit"):
            await self._shared.redis.delete(self._key(key))


_YUAN = re.compile(r"^\s*¥?\s*(\d{1,7})(?:\.(\d{1,2}))?\s*$")


def parse_yuan(text: str) -> int | None:
    """Yuan as typed at the till (``200``, ``200.5``, ``¥200.50``) in fen; None if not money."""
    match = _YUAN.fullmatch(text or "")
    if match is None:
        return None
    whole, cents = match.group(1), (match.group(2) or "").ljust(2, "0")
    return int(whole) * 100 + int(cents)


_CARD = re.compile(r"^[0-9A-F]{20}$")


def normalise_card_number(text: str) -> str | None:
    """The 20 hex digits printed on the card (spaces and dashes allowed), upper case."""
    compact = re.sub(r"[\s-]", "", text or "").upper()
    return compact if _CARD.fullmatch(compact) else None
