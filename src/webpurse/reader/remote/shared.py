"""The shop's shared state: one Redis (redis-py's asyncio client) for every shop process.

With it, the page's SSE, the agent's WebSocket, the cashier that drives the card and the
webhook may each land on a different shop process (``docs/architecture.md``). Without it
(``WEBPURSE_REDIS_URL`` unset) everything stays in the one process, as before.

Every key starts with ``prefix`` (``WEBPURSE_REDIS_PREFIX``), so several shops (or tests)
can share one Redis. A Redis that cannot be reached raises :class:`SharedStateUnavailable`:
the shop refuses new payments with a 503 problem (code ``shared_state_unavailable``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

UNAVAILABLE = "shared_state_unavailable"
"""The problem code the shop answers with when its Redis cannot be reached."""


class SharedStateUnavailable(Exception):
    """The shop's Redis cannot be reached: nothing was changed by the refused call."""

    code = UNAVAILABLE


class SharedState:
    """A Redis connection pool, the key prefix, and this process's node id."""

    def __init__(self, redis: Redis, *, prefix: str = "webpurse", node: str | None = None) -> None:
        self.redis = redis
        self.prefix = prefix
        self.node = node or "node_" + secrets.token_hex(6)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "webpurse", name: str = "node") -> SharedState:
        """``name`` starts this process's node id (made unique by a random tail): logs and
        the operator see which process holds a session or an order's lease."""
        # Reads time out after 30 s (every BLPOP here blocks at most a few seconds; pub/sub
        # reads pass their own timeout); a dead server closes the socket (ConnectionError),
        # and connecting to none fails within 2 s. A broken
        # connection is retried twice, quickly (a restarted Redis is used again at once; a
        # dead one is reported within a second). A retried RPUSH of a batch request may
        # land twice: the node runs each request id once (RpcServer).
        redis = Redis.from_url(
            url,
            socket_connect_timeout=2.0,
            socket_timeout=30.0,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), 2),
        )
        return cls(redis, prefix=prefix, node=f"{name}_{secrets.token_hex(6)}")

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Redis errors (and sockets that fail) become :class:`SharedStateUnavailable`."""
        try:
            yield
        except (RedisError, OSError) as exc:
            log.warning("shared state (Redis) unavailable while %s: %s", what, exc)
            raise SharedStateUnavailable(
                f"the shop's shared state is unavailable ({what})"
            ) from exc

    async def ping(self) -> None:
        with self.guard("checking the connection"):
            await self.redis.ping()

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.aclose()
