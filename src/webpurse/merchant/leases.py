"""Which shop process drives an order's payment: one at a time, across processes.

Each shop process that serves the payment page starts the order's cashier task; with
several processes (behind a load balancer) two could start one for the same order. A lease
in the shop's Redis (``SET NX`` with a short lifetime, renewed while the task runs) lets
only one drive it; a process that dies stops renewing, and the lease lapses within
:data:`LEASE_SECONDS` so another can take the order over.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from webpurse.reader.remote.shared import SharedState

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class RedisFlowLeases:
    """Leases on orders, held by this process (its node id) in the shop's Redis."""

    def __init__(self, shared: SharedState, seconds: float = LEASE_SECONDS) -> None:
        self._shared = shared
        self._ms = int(seconds * 1000)

    def _key(self, order_id: str) -> str:
        return self._shared.key("flow", order_id)

    async def acquire(self, order_id: str) -> bool:
        """True if this process now drives ``order_id`` (raises ``SharedStateUnavailable``)."""
        with self._shared.guard("taking an order's lease"):
            taken = await self._shared.redis.set(
                self._key(order_id), self._shared.node, nx=True, px=self._ms
            )
        return bool(taken)

    async def keep(self, order_id: str) -> None:
        """Renew the lease until cancelled; a Redis away for a while is logged, not fatal
        (the flow on this process goes on; its reader is local or its batches fail)."""
        while True:
            await asyncio.sleep(self._ms / 3000)
            try:
                await self._shared.redis.eval(  # type: ignore[misc]
                    _RENEW, 1, self._key(order_id), self._shared.node, str(self._ms)
                )
            except (RedisError, OSError) as exc:
                log.warning("order %s: could not renew its lease: %s", order_id, exc)

    async def release(self, order_id: str) -> None:
        try:
            await self._shared.redis.eval(  # type: ignore[misc]
                _RELEASE, 1, self._key(order_id), self._shared.node
            )
        except (RedisError, OSError) as exc:
            log.warning("order %s: could not release its lease: %s", order_id, exc)
