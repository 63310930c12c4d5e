"""Fault matrix, remote reader: the agent's WebSocket drops at each step of the flow.

Real components: the merchant's cashier drives a ``RemoteReader`` from the ``ReaderHub``
mounted in a real uvicorn server; the terminal agent dials it over a real WebSocket through
a TCP proxy that the test cuts (no close handshake: a broken network path) as a given APDU
reaches the card, or while settlement authorises between the two batches; the card is the
emulator in a sim reader beside the agent. The agent resumes over a new connection; the
shopper lifts the card and puts it back when the page asks. Then every invariant holds and
the order is paid (loaded) exactly once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.proof.conftest import Proof
from tests.proof.harness import DEADLINE, Shop, settlement_client
from tests.proof.invariants import check_invariants
from tests.reader.remote_support import ConsentRecorder, TcpProxy, merchant_app, serve
from tests.settlement.support import World, database_url, make_world
from webpurse.agent.terminal import TerminalAgent
from webpurse.merchant.orders import PURCHASE, TOPUP
from webpurse.merchant.readers import RemoteBroker
from webpurse.merchant.settlement import Kind, Settlement, SettlementObject
from webpurse.protocol.commands import (
    INS_CREDIT_FOR_LOAD,
    INS_DEBIT_FOR_PURCHASE,
    INS_INITIALIZE,
    INS_SELECT,
)
from webpurse.reader.remote import ReaderHub
from webpurse.reader.sim import ApduEvent, Phase, SimReader

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SUITE = "faults"
FUNDS = 10_000
PRICE = 1_250
TOPUP_AMOUNT = 5_000


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with database_url("sqlite", tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


@pytest.fixture
async def hub() -> AsyncIterator[ReaderHub]:
    hub = ReaderHub(grace=15.0, batch_timeout=10.0)
    yield hub
    await hub.close()


class CutWhileAuthorising:
    """Settlement as the cashier sees it, but the agent's link breaks as authorise is sent."""

    def __init__(self, inner: Settlement, proxy: TcpProxy) -> None:
        self.inner = inner
        self.proxy = proxy
        self.cut = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def authorise(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes,
        initialize: bytes,
        terminal_id: bytes,
    ) -> SettlementObject:
        if not self.cut:
            self.cut = True
            self.proxy.cut()
        return await self.inner.authorise(
            kind, object_id, issuer_data=issuer_data, initialize=initialize, terminal_id=terminal_id
        )


async def _shopper(shop: Shop, sim: SimReader, order_id: str) -> int:
    """Lift the card and put it back whenever the page says the payment was interrupted."""
    task = shop.cashier.task(order_id)
    assert task is not None
    bus = shop.bus
    handled = lifts = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not task.done():
        if bus.phases.count("interrupted") > handled:
            sim.remove()  # the page says: take the card away and present it again
            lifts += 1
            handled = bus.phases.count("interrupted") + 1
            await bus.wait_for("interrupted", handled)
            sim.insert()
            continue
        assert loop.time() < deadline, f"the flow neither ended nor asked: {bus.phases}"
        bus.changed.clear()
        changed: asyncio.Future[object] = asyncio.ensure_future(bus.changed.wait())
        ended: asyncio.Future[object] = asyncio.ensure_future(asyncio.shield(task))
        await asyncio.wait({changed, ended}, timeout=DEADLINE, return_when="FIRST_COMPLETED")
        changed.cancel()
    return lifts


POINTS = [
    ("during SELECT", INS_SELECT),
    ("during INITIALIZE", INS_INITIALIZE),
    ("between the batches, while settlement authorises", None),
    ("during {last}", -1),
]
CASES = [(kind, label, ins) for kind in ("purchase", "load") for label, ins in POINTS]


@pytest.mark.parametrize(
    ("kind", "label", "ins"),
    CASES,
    ids=[f"{k}-{(lbl.split()[1]).strip(',')}" for k, lbl, _ in CASES],
)
async def test_the_agents_socket_drops(
    world: World,
    tmp_path: Path,
    hub: ReaderHub,
    proof: Proof,
    kind: str,
    label: str,
    ins: int | None,
) -> None:
    last = "DEBIT" if kind == "purchase" else "CREDIT"
    if ins == -1:
        ins = INS_DEBIT_FOR_PURCHASE if kind == "purchase" else INS_CREDIT_FOR_LOAD
    done = "paid" if kind == "purchase" else "loaded"
    with proof.row(
        SUITE,
        f"{kind}: the agent's WebSocket drops {label.format(last=last)}",
        expected=f"agent resumes; {done} exactly once; invariants hold",
    ) as row:
        card = world.funded_card(FUNDS) if kind == "purchase" else world.issue()
        sim = SimReader(card)
        shown: list[str] = []
        agent = TerminalAgent(sim, consent=ConsentRecorder(), show=shown.append)
        async with (
            serve(merchant_app(hub)) as base,
            TcpProxy(int(base.rsplit(":", 1)[1])) as proxy,
            settlement_client(world.client.app, world.merchant_key) as client,
        ):
            settlement: Settlement = client
            if ins is None:
                settlement = CutWhileAuthorising(client, proxy)  # type: ignore[assignment]
            else:
                fired: list[bool] = []

                def cut(event: ApduEvent) -> None:
                    if event.phase is Phase.BEFORE and event.apdu[1] == ins and not fired:
                        fired.append(True)
                        proxy.cut()  # the network fails as this command reaches the card

                sim.add_hook(cut)
            broker = RemoteBroker(hub)
            shop = Shop(tmp_path, settlement, broker=broker)
            amount = PRICE if kind == "purchase" else TOPUP_AMOUNT
            order = shop.orders.create(
                session_id="s" * 20,
                kind=PURCHASE if kind == "purchase" else TOPUP,
                amount=amount,
                funding=None if kind == "purchase" else "merchant_float",
            )
            order = await shop.cashier.open_settlement(order, f"proof {kind}")
            pairing = await broker.pair(order.id, amount=amount, description="proof")
            shop.cashier.start(order.id)
            await agent.pair(f"http://127.0.0.1:{proxy.port}/reader", token=pairing.token)
            lifts = await _shopper(shop, sim, order.id)
            final = await shop.finished(order.id)
            pairs = shop.order_pairs()
            await shop.stop()
            await agent.close()
            connections = proxy.connections
        report = check_invariants(world.factory, world.url, [card], orders=pairs)
        assert final.status == done, final.status
        assert connections >= 2, "the agent never had to resume"
        assert card.state.balance == (FUNDS - PRICE if kind == "purchase" else TOPUP_AMOUNT)
        row.observed = (
            f"{final.status}; agent connected {connections}x; card lifted {lifts}x; "
            f"{report.summary()}"
        )
