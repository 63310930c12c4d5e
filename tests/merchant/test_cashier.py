"""The cashier's own robustness: every contact is a real tap, every session is ended, the
poller outlives a bad round, and nothing it keeps grows without bound.

The card is the emulator in a SimReader, settlement the in-memory fake; the cashier runs
its real background tasks. Synchronisation is on events the fakes set, never on sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.merchant.conftest import make_card
from tests.merchant.fakes import FakeSettlement, Record
from tests.reader.remote_support import ConsentRecorder, merchant_app, serve
from webpurse.agent.terminal import TerminalAgent
from webpurse.merchant import cashier as cashier_module
from webpurse.merchant.cashier import Cashier
from webpurse.merchant.orders import INTERRUPTED, PAID, PENDING, PURCHASE, OrderBook, make_engine
from webpurse.merchant.progress import OrderEvent, ProgressBus
from webpurse.merchant.readers import LocalBroker, RemoteBroker
from webpurse.merchant.settlement import Kind, SettlementObject
from webpurse.protocol.apdu import ResponseApdu
from webpurse.protocol.commands import INS_DEBIT_FOR_PURCHASE
from webpurse.reader.base import CardInfo, ReaderError, Step
from webpurse.reader.remote import ReaderHub
from webpurse.reader.sim import SimReader

DEADLINE = 5.0


class TapReader(SimReader):
    """A sim reader that counts batches and says when someone waits for the card to leave
    or to come back."""

    def __init__(self, balance: int = 10_000) -> None:
        super().__init__(make_card(balance=balance))
        self.batches = 0
        self.removal_wanted = asyncio.Event()
        self.card_wanted = asyncio.Event()

    async def wait_for_card(self, timeout: float) -> CardInfo:
        self.card_wanted.set()
        return await super().wait_for_card(timeout)

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        self.batches += 1
        return await super().transmit(batch)

    async def wait_for_removal(self, timeout: float) -> None:
        self.removal_wanted.set()
        await super().wait_for_removal(timeout)


class WrongKeySettlement(FakeSettlement):
    """Names a key index the card does not hold: the card refuses every INITIALIZE."""

    def _obj(self, r: Record) -> SettlementObject:
        return dataclasses.replace(super()._obj(r), key_index=7)


class UndecidedSettlement(FakeSettlement):
    """``resolve`` leaves the payment uncertain (settlement cannot decide yet)."""

    async def resolve(
        self, kind: Kind, object_id: str, *, initialize: bytes, prove: bytes | None
    ) -> SettlementObject:
        self.calls.append(f"resolve {object_id}")
        return await self.get(kind, object_id)


class RecordingBus(ProgressBus):
    def __init__(self) -> None:
        super().__init__()
        self.phases: dict[str, asyncio.Event] = {}
        self.published: list[str] = []
        self._published = asyncio.Event()

    def reached(self, phase: str) -> asyncio.Event:
        return self.phases.setdefault(phase, asyncio.Event())

    def publish(self, event: OrderEvent) -> None:
        super().publish(event)
        self.published.append(event.phase)
        self._published.set()
        self.reached(event.phase).set()

    async def until(self, phase: str, count: int) -> None:
        """Return once ``phase`` has been published ``count`` times (bounded)."""
        async with asyncio.timeout(DEADLINE):
            while self.published.count(phase) < count:
                self._published.clear()
                await self._published.wait()


@pytest.fixture
def orders(tmp_path: Path) -> OrderBook:
    return OrderBook(make_engine(f"sqlite:///{tmp_path / 'merchant.db'}"))


@pytest.fixture
async def tap() -> AsyncIterator[TapReader]:
    reader = TapReader()
    yield reader
    await reader.close()


def make_cashier(
    orders: OrderBook, settlement: FakeSettlement, broker: LocalBroker, bus: ProgressBus
) -> Cashier:
    return Cashier(orders, settlement, broker, bus, reader_timeout=DEADLINE, card_timeout=DEADLINE)


async def open_order(
    orders: OrderBook, settlement: FakeSettlement, status: str, amount: int = 1000
) -> str:
    """An order whose payment settlement holds in ``status`` (``uncertain``: DEBIT lost)."""
    order = orders.create(session_id="s" * 24, kind=PURCHASE, amount=amount)
    obj = await settlement.create(Kind.PAYMENT, amount, description="", reference=order.id)
    record = settlement.records[obj.id]
    record.status = status
    if status == "uncertain":
        record.card, record.counter = bytes.fromhex("0000000000000000A001"), 0
        orders.update(order.id, settlement_id=obj.id, status=INTERRUPTED, counter=0)
    else:
        orders.update(order.id, settlement_id=obj.id, status=PENDING)
    return order.id


async def first_of(*waitables: asyncio.Future[Any]) -> set[asyncio.Future[Any]]:
    done, _ = await asyncio.wait(
        set(waitables), timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED
    )
    return set(done)


# --- finding 1: a card that refuses recovery is asked again only on a new tap -------------


@pytest.mark.parametrize(
    ("settlement_type", "status"),
    [
        (WrongKeySettlement, "uncertain"),  # recover(): the card refuses INITIALIZE
        (WrongKeySettlement, "authorised"),  # reading the counter: the card refuses
        (UndecidedSettlement, "uncertain"),  # recovered, but settlement is not sure yet
    ],
)
async def test_each_recovery_attempt_is_a_new_tap(
    orders: OrderBook, tap: TapReader, settlement_type: type[FakeSettlement], status: str
) -> None:
    settlement = settlement_type()
    order_id = await open_order(orders, settlement, status)
    cashier = make_cashier(orders, settlement, LocalBroker(tap), RecordingBus())
    cashier.start(order_id)
    task = cashier.task(order_id)
    assert task is not None
    try:
        for tap_number in (1, 2, 3):
            tap.removal_wanted.clear()
            wanted = asyncio.ensure_future(tap.removal_wanted.wait())
            done = await first_of(wanted, task)
            assert wanted in done, "the cashier must wait for the card to leave"
            assert tap.batches == tap_number  # one batch per tap, not ten at once
            if tap_number == 3:
                break  # stop the cashier while it waits for the card to leave
            tap.card_wanted.clear()
            tap.remove()  # the shopper lifts the card, and presents it when asked
            wanted = asyncio.ensure_future(tap.card_wanted.wait())
            assert wanted in await first_of(wanted, task)
            tap.insert()
    finally:
        await cashier.close()
    order = orders.get(order_id)
    assert order is not None and order.status != PAID


# --- finding 3: the agent's session is ended on every path, and failures are logged ---------


class BrokenSettlement(FakeSettlement):
    async def get(self, kind: Kind, object_id: str) -> SettlementObject:
        raise RuntimeError("a bug in the settlement client")


async def test_a_failed_payment_task_still_ends_the_agents_session(
    orders: OrderBook, tap: TapReader, caplog: pytest.LogCaptureFixture
) -> None:
    settlement = BrokenSettlement()
    order_id = await open_order(orders, settlement, "requires_card")
    broker, bus = LocalBroker(tap), RecordingBus()
    cashier = make_cashier(orders, settlement, broker, bus)

    cashier.start(order_id)
    task = cashier.task(order_id)
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), DEADLINE)

    assert broker.finished == [(order_id, "failed")]
    assert bus.last(order_id) == OrderEvent(order_id, "failed", PENDING, "internal_error")
    assert any(r.exc_info and "payment task failed" in r.getMessage() for r in caplog.records)


class UnreachableAgentBroker(LocalBroker):
    async def finish(self, order_id: str, outcome: str, message: str, amount: int | None) -> None:
        await super().finish(order_id, outcome, message, amount)
        raise ConnectionError("the agent's socket is gone")


async def test_a_session_that_cannot_be_ended_is_logged_with_its_exception(
    orders: OrderBook, tap: TapReader, caplog: pytest.LogCaptureFixture
) -> None:
    settlement = FakeSettlement()
    order_id = await open_order(orders, settlement, "requires_card")
    broker = UnreachableAgentBroker(tap)
    cashier = make_cashier(orders, settlement, broker, RecordingBus())

    with caplog.at_level(logging.WARNING, logger="webpurse.merchant.cashier"):
        cashier.start(order_id)
        task = cashier.task(order_id)
        assert task is not None
        await asyncio.wait_for(asyncio.shield(task), DEADLINE)

    order = orders.get(order_id)
    assert order is not None and order.status == PAID
    assert broker.finished == [(order_id, "succeeded")]
    [record] = [r for r in caplog.records if "could not end the agent's session" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], ConnectionError)


# --- finding 4: one bad poll round does not end polling ----------------------------------


class FlakySettlement(FakeSettlement):
    """The first read fails with an unexpected error; later reads work."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, kind: Kind, object_id: str) -> SettlementObject:
        self.reads += 1
        if self.reads == 1:
            raise RuntimeError("unexpected answer")
        return await super().get(kind, object_id)


async def test_the_poller_logs_an_unexpected_error_and_keeps_polling(
    orders: OrderBook, tap: TapReader, caplog: pytest.LogCaptureFixture
) -> None:
    settlement = FlakySettlement()
    order_id = await open_order(orders, settlement, "requires_card")
    settlement.records[orders.get(order_id).settlement_id or ""].status = "succeeded"  # type: ignore[union-attr]
    bus = RecordingBus()
    cashier = make_cashier(orders, settlement, LocalBroker(tap), bus)

    poller = asyncio.create_task(cashier.poll(0.001))
    try:
        succeeded = asyncio.ensure_future(bus.reached("succeeded").wait())
        done = await first_of(succeeded, poller)
        assert succeeded in done and not poller.done()
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)

    order = orders.get(order_id)
    assert order is not None and order.status == PAID and settlement.reads >= 2
    assert any(r.exc_info and "poll failed" in r.getMessage() for r in caplog.records)


# --- finding 5: finished payment tasks are not kept forever ------------------------------


async def test_finished_tasks_leave_the_cashier_and_only_the_newest_are_kept(
    orders: OrderBook, tap: TapReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cashier_module, "RECENT_TASKS", 2)
    settlement = FakeSettlement()
    cashier = make_cashier(orders, settlement, LocalBroker(tap), RecordingBus())
    ids = []
    for _ in range(3):
        order_id = await open_order(orders, settlement, "succeeded")
        orders.update(order_id, status=PAID)
        cashier.start(order_id)
        task = cashier.task(order_id)
        assert task is not None
        await asyncio.wait_for(asyncio.shield(task), DEADLINE)
        ids.append(order_id)

    assert cashier._tasks == {}
    assert cashier.task(ids[0]) is None
    assert all(cashier.task(i) is not None for i in ids[1:])


# --- finding 6: the agent's reader failing during the DEBIT is an unknown outcome --------


class JammingReader(TapReader):
    """The agent's reader: the DEBIT reaches the card, then the reader fails (once)."""

    def __init__(self) -> None:
        super().__init__()
        self.jam = True

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        responses = await super().transmit(batch)
        if self.jam and batch[0].apdu[1] == INS_DEBIT_FOR_PURCHASE:
            self.jam = False
            raise ReaderError("the reader stopped answering")
        return responses


async def test_a_reader_failure_during_the_debit_is_recovered_from_the_cards_counter(
    orders: OrderBook,
) -> None:
    settlement = FakeSettlement()
    order_id = await open_order(orders, settlement, "requires_card", amount=1000)
    hub = ReaderHub(grace=5.0, batch_timeout=DEADLINE)
    bus = RecordingBus()
    cashier = Cashier(orders, settlement, RemoteBroker(hub), bus, card_timeout=DEADLINE)
    shopper = JammingReader()
    agent = TerminalAgent(shopper, consent=ConsentRecorder(), show=lambda _: None)
    try:
        async with serve(merchant_app(hub)) as base:
            await agent.pair(f"{base}/reader", token=hub.issue(order_id).token, origin=base)
            cashier.start(order_id)
            task = cashier.task(order_id)
            assert task is not None
            # Outcome unknown: the payment is uncertain and the page asks for the card again.
            await bus.until("interrupted", 2)
            payment = orders.get(order_id).settlement_id  # type: ignore[union-attr]
            assert settlement.records[payment or ""].status == "uncertain"
            shopper.remove()
            await bus.until("interrupted", 3)  # recovery waits for the card
            shopper.insert()
            await asyncio.wait_for(asyncio.shield(task), DEADLINE)
    finally:
        await cashier.close()
        await agent.close()
        await hub.close()

    order = orders.get(order_id)
    assert order is not None and order.status == PAID
    assert [c.split()[0] for c in settlement.calls] == [
        "create",
        "authorise",
        "uncertain",
        "resolve",
    ]
    assert shopper.card is not None and shopper.card.state.balance == 10_000 - 1000  # once
