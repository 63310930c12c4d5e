"""Live progress of each order's payment, fanned out to the page's SSE streams.

:class:`ProgressBus` is in-process (one shop process); :class:`RedisProgressBus` carries
the events over the shop's Redis (pub/sub, and the latest event per order under a key), so
the cashier publishing may run on one shop process and the page's SSE stream on another.
The page's EventSource reconnects and first gets the latest event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from redis.exceptions import RedisError

from webpurse.reader.remote.shared import SharedState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OrderEvent:
    """What the payment page shows: the flow's phase, a detail (decline code), the status."""

    order_id: str
    phase: str
    status: str
    detail: str = ""
    balance_after: int | None = None
    final: bool = False

    def to_sse(self) -> str:
        return f"event: progress\ndata: {self.to_json()}\n\n"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> OrderEvent:
        return cls(**json.loads(raw))


class ProgressBus:
    """The latest event of the most recent ``keep`` orders, and the live subscribers.

    Older orders are forgotten here (their pages read the order's status from the order
    book), so a long-running shop does not grow without bound.
    """

    KEEP = 10_000

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._last: OrderedDict[str, OrderEvent] = OrderedDict()
        self._queues: dict[str, set[asyncio.Queue[OrderEvent]]] = defaultdict(set)

    def last(self, order_id: str) -> OrderEvent | None:
        return self._last.get(order_id)

    async def latest(self, order_id: str) -> OrderEvent | None:
        """:meth:`last`, the way every bus is asked (a shared one asks Redis)."""
        return self.last(order_id)

    def publish(self, event: OrderEvent) -> None:
        self._last[event.order_id] = event
        self._last.move_to_end(event.order_id)
        while len(self._last) > self._keep:
            self._last.popitem(last=False)
        for queue in list(self._queues.get(event.order_id, ())):
            queue.put_nowait(event)

    async def subscribe(
        self, order_id: str, heartbeat: float = 15.0
    ) -> AsyncIterator[OrderEvent | None]:
        """Yield events for the order as they come; ``None`` every ``heartbeat`` seconds."""
        queue: asyncio.Queue[OrderEvent] = asyncio.Queue()
        self._queues[order_id].add(queue)
        try:
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), heartbeat)
                except TimeoutError:
                    yield None
        finally:
            self._queues[order_id].discard(queue)
            if not self._queues[order_id]:
                del self._queues[order_id]


LAST_EVENT_TTL = 24 * 3600
"""Seconds Redis keeps an order's latest event (the page then reads the order's status)."""


class RedisProgressBus(ProgressBus):
    """The progress bus over the shop's Redis: any process publishes, any process streams.

    ``publish`` is called from the flows without awaiting: events go out in order through
    one writer task. A Redis that is down loses live events only (logged); the page still
    reads each order's status from the order book.
    """

    def __init__(self, shared: SharedState, keep: int = ProgressBus.KEEP) -> None:
        super().__init__(keep)
        self._shared = shared
        self._outbox: asyncio.Queue[OrderEvent] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None

    def _channel(self, order_id: str) -> str:
        return self._shared.key("progress", order_id)

    def _last_key(self, order_id: str) -> str:
        return self._shared.key("progress-last", order_id)

    def publish(self, event: OrderEvent) -> None:
        super().publish(event)  # this process's own latest, should Redis be away
        self._outbox.put_nowait(event)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while not self._outbox.empty():
            event = self._outbox.get_nowait()
            data = event.to_json()
            try:
                async with self._shared.redis.pipeline(transaction=True) as pipe:
                    pipe.set(self._last_key(event.order_id), data, ex=LAST_EVENT_TTL)
                    pipe.publish(self._channel(event.order_id), data)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("order %s: progress event not shared: %s", event.order_id, exc)

    async def flush(self) -> None:
        """Wait until every event published so far went out (shutdown, tests)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._writer

    async def latest(self, order_id: str) -> OrderEvent | None:
        try:
            raw = await self._shared.redis.get(self._last_key(order_id))
        except (RedisError, OSError) as exc:
            log.warning("order %s: latest progress event unavailable: %s", order_id, exc)
            return self.last(order_id)
        return OrderEvent.from_json(raw) if raw is not None else self.last(order_id)

    async def subscribe(
        self, order_id: str, heartbeat: float = 15.0
    ) -> AsyncIterator[OrderEvent | None]:
        """Events for the order from every shop process; ``None`` every ``heartbeat`` s.
        Ends when Redis goes away (the page's EventSource reconnects)."""
        try:
            async with self._shared.redis.pubsub() as pubsub:
                await pubsub.subscribe(self._channel(order_id))
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=heartbeat
                    )
                    if message is None:
                        yield None
                    elif message.get("type") == "message":
                        yield OrderEvent.from_json(message["data"])
        except (RedisError, OSError) as exc:
            log.warning("order %s: progress stream ended: %s", order_id, exc)
