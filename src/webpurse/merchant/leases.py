"""Which shop process drives an order's payment: one at a time, across processes.

Each shop process that serves the payment page starts the order's cashier task; with
several processes (behind a load balancer) two could start one for the same order. A lease
in the shop's Redis (``SET NX`` with a short lifetime, renewed while the task runs) lets
only one drive it; a process that dies stops renewing, and the lease lapses within
:data:`LEASE_SECONDS` so another can take the order over.

A shopper should not wait that long: while it holds a lease a process also keeps its node's
heartbeat (``node:<node>``, the key the reader hub's sessions live by, lifetime
:data:`~webpurse.reader.remote.routing.NODE_TTL`). A lease whose holder's heartbeat is gone
belongs to a dead process: :meth:`RedisFlowLeases.orphaned` finds such orders and
:meth:`RedisFlowLeases.clear_dead` frees the lease (only if that dead node still holds it),
so a surviving process's cashier takes the order over within seconds (recovery as after a
restart: the card's counter and settlement decide, nothing is sent to the card blindly).
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from webpurse.reader.remote.routing import NODE_TTL
from webpurse.reader.remote.shared import SharedState

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0

# KEYS[1] the lease flow:<order>, KEYS[2] the set ``flows`` of leased orders, ARGV[1] the
# node, ARGV[2] the order id.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SREM', KEYS[2], ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS[3] the dead node's heartbeat.
_CLEAR_DEAD = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SREM', KEYS[2], ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# A lease that lapsed with nobody to take it over leaves the set (not if taken meanwhile).
_FORGET_LAPSED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('SREM', KEYS[2], ARGV[2])
end
return 0
"""
# ARGV[3] the lease's lifetime in ms.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[2])
  return 1
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

    def _node_key(self, node: str) -> str:
        return self._shared.key("node", node)

    @property
    def _flows(self) -> str:
        return self._shared.key("flows")

    async def acquire(self, order_id: str) -> bool:
        """True if this process now drives ``order_id`` (raises ``SharedStateUnavailable``)."""
        with self._shared.guard("taking an order's lease"):
            async with self._shared.redis.pipeline(transaction=True) as pipe:
                pipe.set(self._node_key(self._shared.node), b"1", ex=NODE_TTL)
                pipe.set(self._key(order_id), self._shared.node, nx=True, px=self._ms)
                pipe.sadd(self._flows, order_id)  # already there if another holds it
                _, taken, _ = await pipe.execute()
        return bool(taken)

    async def keep(self, order_id: str) -> None:
        """Renew the lease and this node's heartbeat until cancelled; a Redis away for a
        while is logged, not fatal (the flow on this process goes on; its reader is local or
        its batches fail), and a lease gone meanwhile (a Redis restarted empty) is taken
        again. Returns only when another process holds the lease: it took the order over
        (this process looked dead), so this one must stop driving it."""
        interval = min(self._ms / 3000, NODE_TTL / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self._shared.redis.set(self._node_key(self._shared.node), b"1", ex=NODE_TTL)
                kept = await self._shared.redis.eval(  # type: ignore[misc]
                    _RENEW,
                    2,
                    self._key(order_id),
                    self._flows,
                    self._shared.node,
                    order_id,
                    str(self._ms),
                )
            except (RedisError, OSError) as exc:
                log.warning("order %s: could not renew its lease: %s", order_id, exc)
                continue
            if not kept:
                log.warning("order %s: another shop process took its lease over", order_id)
                return

    async def orphaned(self) -> dict[str, str]:
        """The leased orders whose holder is a node with no heartbeat (a dead process),
        each with that node (raises ``SharedStateUnavailable``). Only orders some process
        drives are looked at (the set ``flows``), not every open order."""
        redis = self._shared.redis
        with self._shared.guard("looking for orders of dead processes"):
            members = await redis.smembers(self._flows)  # type: ignore[misc]
            order_ids = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
            if not order_ids:
                return {}
            holders = await redis.mget([self._key(o) for o in order_ids])
            held: dict[str, str] = {}
            for order_id, holder in zip(order_ids, holders, strict=True):
                if holder is None:
                    await redis.eval(  # type: ignore[misc]
                        _FORGET_LAPSED, 2, self._key(order_id), self._flows, "", order_id
                    )
                else:
                    held[order_id] = holder.decode() if isinstance(holder, bytes) else str(holder)
            nodes = sorted(set(held.values()) - {self._shared.node})
            alive = {node: bool(await redis.exists(self._node_key(node))) for node in nodes}
        return {order_id: node for order_id, node in held.items() if alive.get(node) is False}

    async def clear_dead(self, order_id: str, node: str) -> bool:
        """Free ``order_id``'s lease if the dead ``node`` still holds it and still has no
        heartbeat (one survivor wins; raises ``SharedStateUnavailable``)."""
        with self._shared.guard("freeing a dead process's lease"):
            cleared = await self._shared.redis.eval(  # type: ignore[misc]
                _CLEAR_DEAD,
                3,
                self._key(order_id),
                self._flows,
                self._node_key(node),
                node,
                order_id,
            )
        return bool(cleared)

    async def release(self, order_id: str) -> None:
        try:
            await self._shared.redis.eval(  # type: ignore[misc]
                _RELEASE, 2, self._key(order_id), self._flows, self._shared.node, order_id
            )
        except (RedisError, OSError) as exc:
            log.warning("order %s: could not release its lease: %s", order_id, exc)
