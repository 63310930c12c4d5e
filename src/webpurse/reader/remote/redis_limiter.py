"""The short-code limiter in Redis: a code guessed wrong on one shop process counts on all.

Same limits as :class:`~webpurse.reader.remote.limiter.CodeLimiter` (per IPv4 address or
IPv6 /64, and per IPv6 /48, within the window), kept as one sorted set of failure times per
network that expires with the window, so Redis forgets idle networks by itself (no
``max_clients`` table to fill). The count of every wrong code (for
:data:`~webpurse.reader.remote.limiter.CODE_GUESS_BUDGET`) is one shared counter.
"""

from __future__ import annotations

import datetime as dt
import secrets

from webpurse.reader.remote.limiter import CODE_ATTEMPTS, CODE_SITE_ATTEMPTS, client_network
from webpurse.reader.remote.pairing import PAIRING_LIFETIME, Clock, utc_now
from webpurse.reader.remote.shared import SharedState


class RedisCodeLimiter:
    """Wrong short-code guesses per client network, shared by every shop process."""

    def __init__(
        self,
        shared: SharedState,
        *,
        clock: Clock = utc_now,
        window: dt.timedelta = PAIRING_LIFETIME,
        attempts: int = CODE_ATTEMPTS,
        wide_attempts: int = CODE_SITE_ATTEMPTS,
    ) -> None:
        self._shared = shared
        self._clock = clock
        self._window = window
        self._attempts = attempts
        self._wide_attempts = wide_attempts

    def _key(self, kind: str, network: str) -> str:
        return self._shared.key("codes", kind, network)

    async def _count(self, key: str, now: float) -> int:
        redis = self._shared.redis
        await redis.zremrangebyscore(key, "-inf", now - self._window.total_seconds())
        return int(await redis.zcard(key))

    async def allows(self, client: str) -> bool:
        """May ``client`` (its address) try a code now?"""
        now = self._clock().timestamp()
        narrow, wide = client_network(client)
        with self._shared.guard("checking the code limit"):
            if (
                narrow != wide
                and await self._count(self._key("wide", wide), now) >= self._wide_attempts
            ):
                return False
            return await self._count(self._key("net", narrow), now) < self._attempts

    async def _record(self, key: str, now: float, keep: int) -> None:
        async with self._shared.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {f"{now:.6f}:{secrets.token_hex(4)}": now})
            pipe.zremrangebyrank(key, 0, -keep - 1)
            pipe.pexpire(key, int(self._window.total_seconds() * 1000))
            await pipe.execute()

    async def failed(self, client: str) -> None:
        """``client`` (its address) tried a wrong code."""
        now = self._clock().timestamp()
        narrow, wide = client_network(client)
        with self._shared.guard("counting a wrong code"):
            await self._shared.redis.incr(self._shared.key("codes", "wrong"))
            await self._record(self._key("net", narrow), now, self._attempts)
            if narrow != wide:
                await self._record(self._key("wide", wide), now, self._wide_attempts)

    async def wrong_codes(self) -> int:
        """Every wrong code any shop process has seen."""
        with self._shared.guard("reading the wrong-code count"):
            value = await self._shared.redis.get(self._shared.key("codes", "wrong"))
        return int(value or 0)
