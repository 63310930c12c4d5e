"""The in-process fault harness: a real settlement app, the merchant's cashier, a sim card.

- :class:`ShopperReader` is a :class:`SimReader` that says when the flow is waiting for the
  card (an event, not a sleep), so a test re-presents the card exactly when asked;
- :class:`FaultyTransport` wraps the ASGI transport to settlement and loses one request
  (it never arrives) or one response (settlement committed, the answer is lost);
- :class:`GatedSettlement` parks the cashier's flow at one step so that the merchant
  "process" can be killed there (its tasks cancelled) and a new one started;
- :class:`Shop` is the merchant's side: an order book on a SQLite file, a cashier, a
  settlement client — re-creatable over the same files, as after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from webpurse.card import CardApplet
from webpurse.merchant.cashier import Cashier
from webpurse.merchant.orders import PURCHASE, TOPUP, Order, OrderBook, make_engine
from webpurse.merchant.progress import OrderEvent, ProgressBus
from webpurse.merchant.readers import LocalBroker, ReaderBroker
from webpurse.merchant.settlement import (
    MERCHANT_FLOAT,
    FloatBalance,
    Kind,
    Settlement,
    SettlementClient,
    SettlementObject,
)
from webpurse.reader.base import CardInfo
from webpurse.reader.sim import SimReader

DEADLINE = 30.0  # seconds any single wait may take before the scenario fails


class ShopperReader(SimReader):
    """A sim reader whose ``card_wanted`` event is set while a flow waits for the card."""

    def __init__(self, card: CardApplet) -> None:
        super().__init__(card)
        self.card_wanted = asyncio.Event()

    async def wait_for_card(self, timeout: float) -> CardInfo:
        if not self.present:
            self.card_wanted.set()
        try:
            return await super().wait_for_card(timeout)
        finally:
            self.card_wanted.clear()

    async def present_again(self) -> None:
        """The shopper puts the card back once the flow asks for it."""
        await asyncio.wait_for(self.card_wanted.wait(), DEADLINE)
        self.insert()


@dataclass
class Loss:
    """Lose the ``occurrence``-th matching request (method, path end), and the ``times - 1``
    matching requests after it (a client's retries of it, say)."""

    method: str
    path_suffix: str
    after: bool  # True: settlement handled it, the answer is lost; False: it never arrived
    occurrence: int = 1
    times: int = 1
    seen: int = 0
    fired: bool = False
    lost: int = 0


class FaultyTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, loss: Loss | None = None) -> None:
        self.inner = inner
        self.loss = loss

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        loss = self.loss
        hit = (
            loss is not None
            and loss.lost < loss.times
            and request.method == loss.method
            and request.url.path.endswith(loss.path_suffix)
        )
        if hit:
            assert loss is not None
            loss.seen += 1
            hit = loss.seen >= loss.occurrence
        if hit and loss is not None and not loss.after:
            loss.fired, loss.lost = True, loss.lost + 1
            raise httpx.ConnectError("connection refused (injected)", request=request)
        response = await self.inner.handle_async_request(request)
        if hit and loss is not None:
            await response.aread()
            loss.fired, loss.lost = True, loss.lost + 1
            raise httpx.ReadError("connection reset before the answer (injected)", request=request)
        return response


@dataclass
class Gate:
    """Park the flow at ``call`` (``before`` it is sent, or after its answer came back)."""

    call: str  # create | authorise | finish | uncertain | resolve
    before: bool
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    # Instead of parking, run this at the gate and go on (e.g. SIGKILL settlement there).
    action: Callable[[], Awaitable[None]] | None = None


class GatedSettlement:
    """A :class:`Settlement` that stops forever at its gate (the merchant dies there)."""

    def __init__(self, inner: Settlement, gate: Gate) -> None:
        self.inner = inner
        self.gate = gate

    async def _pass(
        self, call: str, run: Callable[[], Awaitable[SettlementObject]]
    ) -> SettlementObject:
        park = call == self.gate.call and not self.gate.reached.is_set()  # the first one only
        if park and self.gate.before:
            await self._stop()
        result = await run()
        if park and not self.gate.before:
            await self._stop()
        return result

    async def _stop(self) -> None:
        self.gate.reached.set()
        if self.gate.action is not None:
            await self.gate.action()
            return
        await asyncio.Event().wait()  # parked until the task is cancelled

    async def create(
        self,
        kind: Kind,
        amount: int,
        *,
        description: str,
        reference: str,
        funding: str | None = None,
        card_number: str | None = None,
    ) -> SettlementObject:
        return await self.inner.create(
            kind,
            amount,
            description=description,
            reference=reference,
            funding=funding,
            card_number=card_number,
        )

    async def float_balance(self) -> FloatBalance:
        return await self.inner.float_balance()

    async def get(self, kind: Kind, object_id: str) -> SettlementObject:
        return await self.inner.get(kind, object_id)

    async def authorise(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes,
        initialize: bytes,
        terminal_id: bytes,
    ) -> SettlementObject:
        return await self._pass(
            "authorise",
            lambda: self.inner.authorise(
                kind,
                object_id,
                issuer_data=issuer_data,
                initialize=initialize,
                terminal_id=terminal_id,
            ),
        )

    async def finish(self, kind: Kind, object_id: str, card_response: bytes) -> SettlementObject:
        return await self._pass("finish", lambda: self.inner.finish(kind, object_id, card_response))

    async def uncertain(self, kind: Kind, object_id: str) -> SettlementObject:
        return await self._pass("uncertain", lambda: self.inner.uncertain(kind, object_id))

    async def resolve(
        self, kind: Kind, object_id: str, *, initialize: bytes, prove: bytes | None
    ) -> SettlementObject:
        return await self._pass(
            "resolve",
            lambda: self.inner.resolve(kind, object_id, initialize=initialize, prove=prove),
        )

    async def cancel(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes | None = None,
        status_word: int | None = None,
    ) -> SettlementObject:
        return await self.inner.cancel(
            kind, object_id, issuer_data=issuer_data, status_word=status_word
        )

    async def answer_card_check(self, check_id: str, initialize_response: bytes) -> str:
        return await self.inner.answer_card_check(check_id, initialize_response)


class RecordingBus(ProgressBus):
    """The progress bus, remembering every phase published (tests wait on phases)."""

    def __init__(self) -> None:
        super().__init__()
        self.phases: list[str] = []
        self.changed = asyncio.Event()

    def publish(self, event: OrderEvent) -> None:
        super().publish(event)
        self.phases.append(event.phase)
        self.changed.set()

    async def wait_for(self, phase: str, count: int = 1) -> None:
        """Return once ``phase`` has been published ``count`` times (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while self.phases.count(phase) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{phase} x{count} never published: {self.phases}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


class Shop:
    """The merchant process: orders on ``tmp/orders.db``, a cashier, a settlement client."""

    def __init__(
        self,
        directory: Path,
        settlement: Settlement,
        reader: ShopperReader | None = None,
        broker: ReaderBroker | None = None,
    ) -> None:
        self.orders = OrderBook(make_engine(f"sqlite:///{directory / 'orders.db'}"))
        self.bus = RecordingBus()
        self.cashier = Cashier(
            self.orders,
            settlement,
            broker or LocalBroker(reader),
            self.bus,
            reader_timeout=DEADLINE,
            card_timeout=DEADLINE,
        )

    async def open_order(self, kind: str, amount: int) -> Order:
        order = self.orders.create(
            session_id="s" * 20,
            kind=kind,
            amount=amount,
            funding=MERCHANT_FLOAT if kind == TOPUP else None,
        )
        order = await self.cashier.open_settlement(order, f"proof {kind}")
        self.cashier.start(order.id)
        return order

    async def purchase(self, amount: int) -> Order:
        return await self.open_order(PURCHASE, amount)

    async def topup(self, amount: int) -> Order:
        return await self.open_order(TOPUP, amount)

    async def finished(self, order_id: str) -> Order:
        """Wait (bounded) for the order's payment task to end; return the order."""
        task = self.cashier.task(order_id)
        assert task is not None
        await asyncio.wait_for(asyncio.shield(task), DEADLINE)
        order = self.orders.get(order_id)
        assert order is not None
        return order

    def order_pairs(self) -> list[tuple[str, str | None]]:
        with self.orders._sessions() as session:
            return [(o.status, o.settlement_id) for o in session.query(Order).all()]

    async def stop(self) -> None:
        """The merchant process dies: every running flow is cancelled where it stands."""
        await self.cashier.close()
        self.orders.engine.dispose()


async def shop_until_final(shop: Shop, reader: ShopperReader, order_id: str) -> tuple[Order, int]:
    """Present the card when asked, reload the page when the flow gave up; until final."""
    reloads = 0
    for _ in range(12):
        order = shop.orders.get(order_id)
        assert order is not None
        if order.is_final:
            return order, reloads
        task = shop.cashier.task(order_id)
        assert task is not None
        wanted: asyncio.Future[object] = asyncio.ensure_future(reader.card_wanted.wait())
        ended: asyncio.Future[object] = asyncio.ensure_future(asyncio.shield(task))
        done, _ = await asyncio.wait(
            {wanted, ended},
            timeout=DEADLINE,
            return_when=asyncio.FIRST_COMPLETED,
        )
        wanted.cancel()
        assert done, "neither the flow ended nor did it ask for the card"
        if reader.card_wanted.is_set():
            reader.insert()
        elif task.done():
            await shop.cashier.refresh(order_id)  # the order page re-reads settlement
            order = shop.orders.get(order_id)
            assert order is not None
            if not order.is_final:
                reloads += 1
                shop.cashier.start(order_id)  # the shopper reloads the payment page
    raise AssertionError(f"order {order_id} not final after the shopper's patience ran out")


@contextlib.asynccontextmanager
async def settlement_client(
    app: Any, api_key: str, loss: Loss | None = None
) -> AsyncIterator[SettlementClient]:
    transport = FaultyTransport(httpx.ASGITransport(app=app), loss)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        yield SettlementClient(http, api_key)
