"""Fault matrix over a PN532 serial line: the card leaves before or after each APDU.

The rows of ``test_faults_card.py``, with the reader swapped: the merchant's real cashier and
flows, against the real settlement app (in process, SQLite file), drive the card through the
``pn532`` backend → a pty → the simulated PN532 → the card emulator. The card leaves the
field before a command reaches it (the chip answers status ``01``, nothing ran) or after the
card processed and committed it (the answer is lost on its way back); the shopper presents
it again when the flow asks, and every invariant holds afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proof.conftest import Proof
from tests.proof.harness import DEADLINE, Shop, settlement_client
from tests.proof.invariants import check_invariants
from tests.proof.test_faults_card import CASES, FUNDS, PRICE, SUITE, TOPUP, _describe
from tests.settlement.support import World, database_url, make_world
from webpurse.card import CardApplet
from webpurse.card.pn532sim import ApduEvent, Phase, Pn532Chip, PtyServer
from webpurse.reader.base import CardInfo
from webpurse.reader.pn532 import Pn532Reader
from webpurse.reader.sim import Phase as SimPhase

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


class Pn532Shopper(Pn532Reader):
    """A PN532 reader whose ``card_wanted`` is set while a flow waits for the card."""

    def __init__(self, server: PtyServer) -> None:
        super().__init__(server.path, poll_interval=0.01)
        self.server = server
        self.chip = server.chip
        self.card_wanted = asyncio.Event()

    def inject(self, phase: Phase, ins: int) -> None:
        """One-shot: the card leaves at the first APDU with ``ins``, ``phase`` its processing."""

        def hook(event: ApduEvent) -> None:  # on the simulator's thread, under its lock
            if event.phase is phase and event.apdu[1] == ins:
                self.chip.remove_hook(hook)
                self.chip.remove()

        self.chip.add_hook(hook)

    async def wait_for_card(self, timeout: float) -> CardInfo:
        if not self.chip.present:
            self.card_wanted.set()
        try:
            return await super().wait_for_card(timeout)
        finally:
            self.card_wanted.clear()

    async def present_again(self) -> None:
        await asyncio.wait_for(self.card_wanted.wait(), DEADLINE)
        with self.server.lock:
            self.chip.insert()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with database_url("sqlite", tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


async def _run(world: World, tmp_path: Path, kind: str, phase: Phase, ins: int) -> str:
    card: CardApplet = world.funded_card(FUNDS) if kind == "purchase" else world.issue()
    with PtyServer(Pn532Chip(card)) as server:
        reader = Pn532Shopper(server)
        try:
            reader.inject(phase, ins)
            async with settlement_client(world.client.app, world.merchant_key) as client:
                shop = Shop(tmp_path, client, reader)  # type: ignore[arg-type]
                order = await (shop.purchase(PRICE) if kind == "purchase" else shop.topup(TOPUP))
                await reader.present_again()
                final = await shop.finished(order.id)
                pairs = shop.order_pairs()
                await shop.stop()
        finally:
            await reader.close()
    report = check_invariants(world.factory, world.url, [card], orders=pairs)
    assert final.status == ("paid" if kind == "purchase" else "loaded"), final.status
    assert card.state.balance == (FUNDS - PRICE if kind == "purchase" else TOPUP)
    objects = dict(report.payments if kind == "purchase" else report.loads)
    assert objects.get("succeeded", 0) == 1  # exactly once
    return f"{final.status} after 2 contacts over PN532; {report.summary()}"


@pytest.mark.parametrize(
    ("kind", "name", "ins", "phase"),
    CASES,
    ids=[f"{k}-{n.replace(' ', '_')}-{p.value}" for k, n, _, p in CASES],
)
async def test_card_leaves_at_every_step_over_pn532(
    world: World, tmp_path: Path, proof: Proof, kind: str, name: str, ins: int, phase: SimPhase
) -> None:
    done = "paid" if kind == "purchase" else "loaded"
    sim_phase = Phase(phase.value)  # the same two phases, as the PN532 simulator names them
    with proof.row(
        SUITE,
        f"{_describe(kind, name, phase)} (PN532 serial line)",
        expected=f"{done} exactly once at the next contact; invariants hold",
    ) as row:
        row.observed = await _run(world, tmp_path, kind, sim_phase, ins)
