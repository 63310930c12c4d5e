"""The forged-EF15 attack of issue 13, end to end: real servers, a real WebSocket agent.

Settlement (``webpurse serve settlement``) and the shop (``webpurse serve merchant``) run as
uvicorn child processes; the shopper is an HTTP client of the shop; the attacker runs the
real ``TerminalAgent`` (the agent is the shopper's own program) over a reader that rewrites
the card's answers: EF 0x15 carries the victim's card number (printed on the card, shown
on receipts) and INITIALIZE FOR PURCHASE a balance of FFFFFFFF. Before the evidence rule,
settlement blocked the victim's card as a suspected clone; now the attacker's order is
declined, the victim's card stays ``active`` and the victim's next purchase at the same
shop succeeds. Row in the ``attacks_evidence`` proof table.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.proof.conftest import Proof
from tests.proof.harness import DEADLINE
from tests.proof.processes import Live, ShopProcess, live_settlement
from tests.reader.remote_support import ConsentRecorder
from tests.settlement.support import read_issuer
from webpurse.agent.terminal import TerminalAgent
from webpurse.card import CardApplet
from webpurse.protocol.commands import INS_INITIALIZE
from webpurse.protocol.records import IssuerData
from webpurse.reader.sim import SimReader
from webpurse.settlement.models import Card, CardObservation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SUITE = "attacks_evidence"
INS_READ_BINARY = 0xB0


class ForgingReader(SimReader):
    """The attacker's reader: its own card, answers rewritten on the way to the agent."""

    def __init__(self, card: CardApplet, victim_number: str) -> None:
        super().__init__(card)
        mine = IssuerData.from_bytes(read_issuer(card))
        self.ef15 = replace(mine, serial=bytes.fromhex(victim_number)).to_bytes()

    def _send(self, apdu: bytes) -> bytes:
        response = super()._send(apdu)
        if response[-2:] != b"\x90\x00":
            return response
        if apdu[1] == INS_READ_BINARY and len(response) - 2 == len(self.ef15):
            return self.ef15 + b"\x90\x00"
        if apdu[:3] == bytes([0x80, INS_INITIALIZE, 0x01]):  # INITIALIZE FOR PURCHASE
            return b"\xff\xff\xff\xff" + response[4:]
        return response


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_settlement("sqlite", tmp_path_factory.mktemp("settlement")) as server:
        yield server


async def _buy(shop: ShopProcess, sim: SimReader) -> dict[str, Any]:
    """A shopper buys tea at the shop and pays with the agent over ``sim``; the final status."""
    async with httpx.AsyncClient(base_url=shop.base_url, timeout=15) as browser:
        added = await browser.post("/cart/add", data={"product": "tea", "quantity": "1"})
        assert added.status_code == 303, added.text
        opened = await browser.post("/checkout")
        assert opened.status_code == 303, opened.text
        order_id = opened.headers["location"].split("/")[2]
        page = await browser.get(f"/orders/{order_id}/pay")
        token = re.search(r'data-token="([^"]+)"', page.text)
        assert token is not None, "the payment page has no pairing token"
        agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
        await agent.pair(f"{shop.base_url}/reader", token=token.group(1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        try:
            while True:  # bounded polling of the shop's status endpoint (what the page does)
                body: dict[str, Any] = (await browser.get(f"/orders/{order_id}/status")).json()
                if body["status"] in {"paid", "declined"} or loop.time() > deadline:
                    return body
                await asyncio.sleep(0.1)
        finally:
            await agent.close()


def _card(live: Live, number: str) -> Card:
    with live.factory() as session:
        row = session.scalars(select(Card).where(Card.card_number == number)).one()
        session.expunge(row)
        return row


async def test_a_forged_ef15_through_a_real_agent_does_not_freeze_the_victims_card(
    live: Live, tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "forged EF 0x15 (victim's card number) and INITIALIZE balance FFFFFFFF from the"
        " shopper's own agent, through the real shop and settlement processes",
        expected="attacker's order declined (balance_mismatch); the card check the shop relays"
        " is unverified; observations recorded; victim's card stays active, unflagged;"
        " victim's next purchase at the shop is paid",
    ) as row:
        victim = live.funded_card(10_000)
        attacker = live.funded_card(10_000)  # enough for its own INITIALIZE
        number = victim.state.issuer.card_number
        shop = ShopProcess(
            directory=tmp_path, settlement_url=live.server.base_url, api_key=live.merchant_key
        )
        shop.start()
        try:
            forged = await _buy(shop, ForgingReader(attacker, number))
            assert forged["status"] == "declined", forged
            card = _card(live, number)
            assert (card.status, card.flagged, card.shadow_balance) == ("active", False, 10_000)
            with live.factory() as session:
                seen = session.scalars(
                    select(CardObservation.kind).where(CardObservation.card_number == number)
                ).all()
            # The shop ran the card check the decline offered on the attacker's card: its MAC1
            # is not under the victim's keys, so it says nothing about the victim's card.
            assert sorted(seen) == ["balance_above", "check_unverified"]
            paid = await _buy(shop, SimReader(victim))
            assert paid["status"] == "paid", paid
        finally:
            shop.stop()
        card = _card(live, number)
        assert card.status == "active" and card.shadow_balance == victim.state.balance < 10_000
        row.observed = (
            f"attacker's order {forged['status']}; victim active, unflagged; victim's purchase"
            f" {paid['status']}, shadow {card.shadow_balance} = card"
        )
