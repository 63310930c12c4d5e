"""Live progress of each order's payment, fanned out to the page's SSE streams.

In-process and per node: the node that holds the agent's socket runs the flow and
publishes here; the page's EventSource reconnects and first gets the latest event.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass


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
        return f"event: progress\ndata: {json.dumps(asdict(self))}\n\n"


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
