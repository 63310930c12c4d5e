"""Fault: the shop cluster's Redis goes away mid-purchase (real processes, real Redis).

Two shop processes (``webpurse serve merchant``) share a ``redis-server`` of this test's
own (a free loopback port) and one order book; settlement is the real server. The cashier
runs on shop B (the payment page was served there) and the shopper's agent is connected
to shop A, so every batch crosses Redis. Redis is SIGKILLed right after the card committed
the DEBIT: its answer cannot get back to B. Then:

- the purchase in flight becomes recoverable as today: the order is ``interrupted``, the
  payment ``uncertain`` at settlement, nothing captured, nothing lost;
- a new purchase is refused before anything is created: 503 problem+json with the code
  ``shared_state_unavailable``;
- once Redis is back (empty: it kept nothing on disk), the shopper reloads the payment
  page and pairs again; recovery reads the card's counter and the order ends paid
  exactly once; every invariant holds.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.merchant.test_cluster_redis import RedisShop
from tests.proof.conftest import Proof
from tests.proof.harness import DEADLINE
from tests.proof.invariants import check_invariants
from tests.proof.processes import Live, live_settlement
from tests.reader.remote_support import ConsentRecorder
from tests.redis_support import OwnRedis
from webpurse.agent.terminal import TerminalAgent
from webpurse.protocol.commands import INS_DEBIT_FOR_PURCHASE
from webpurse.reader.sim import ApduEvent, Phase, SimReader

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SUITE = "faults_redis"
FUNDS = 10_000


@dataclass(kw_only=True)
class TakeoverShop(RedisShop):
    """A shop process that looks for dead processes' orders every half second."""

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "WEBPURSE_MERCHANT_TAKEOVER_INTERVAL": "0.5"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_settlement("sqlite", tmp_path_factory.mktemp("settlement")) as server:
        yield server


async def _open_purchase(browser: httpx.AsyncClient) -> httpx.Response:
    added = await browser.post("/cart/add", data={"product": "tea", "quantity": "1"})
    assert added.status_code == 303, added.text
    return await browser.post("/checkout")


async def _token(browser: httpx.AsyncClient, order_id: str) -> str:
    page = await browser.get(f"/orders/{order_id}/pay")
    assert page.status_code == 200, page.text
    token = re.search(r'data-token="([^"]+)"', page.text)
    assert token is not None, "the payment page has no pairing token"
    return token.group(1)


async def _status(browser: httpx.AsyncClient, order_id: str, want: set[str]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:  # bounded polling of the shop's status endpoint (what the page does)
        body: dict[str, Any] = (await browser.get(f"/orders/{order_id}/status")).json()
        if body["status"] in want or loop.time() > deadline:
            return body
        await asyncio.sleep(0.1)


async def _phase(browser: httpx.AsyncClient, order_id: str, want: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:  # bounded polling of the shop's status endpoint (what the page does)
        body: dict[str, Any] = (await browser.get(f"/orders/{order_id}/status")).json()
        if body["phase"] == want or loop.time() > deadline:
            return body
        await asyncio.sleep(0.1)


async def test_redis_goes_away_mid_purchase(live: Live, tmp_path: Path, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "shop cluster (2 processes, cashier on B, agent on A): Redis SIGKILLed right after "
        "the card committed the DEBIT; a new purchase tried; Redis restarted empty, page "
        "reloaded",
        expected="in-flight order interrupted (recoverable), new purchase refused 503 "
        "shared_state_unavailable; after restart paid exactly once; invariants hold",
    ) as row:
        server = OwnRedis(tmp_path)
        server.start()
        shops = [
            RedisShop(
                directory=tmp_path,
                name=f"shop-{name}",
                settlement_url=live.server.base_url,
                api_key=live.merchant_key,
                redis_url=server.url,
                redis_prefix="faults",
            )
            for name in "ab"
        ]
        card = live.funded_card(FUNDS)
        before = card.state.balance
        sim = SimReader(card)
        killed = asyncio.Event()

        def kill_redis(event: ApduEvent) -> None:
            committed = event.phase is Phase.AFTER and event.apdu[1] == INS_DEBIT_FOR_PURCHASE
            if committed and not killed.is_set():
                server.kill()  # the card committed; its answer has to cross Redis
                killed.set()

        sim.add_hook(kill_redis)
        try:
            for shop in shops:
                shop.start()
            a, b = shops
            async with (
                httpx.AsyncClient(base_url=b.base_url, timeout=DEADLINE) as on_b,
                httpx.AsyncClient(base_url=a.base_url, timeout=DEADLINE) as on_a,
            ):
                opened = await _open_purchase(on_b)
                assert opened.status_code == 303, opened.text
                order_id = opened.headers["location"].split("/")[2]
                on_a.cookies.update(on_b.cookies)
                agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
                await agent.pair(f"{a.base_url}/reader", token=await _token(on_b, order_id))
                await asyncio.wait_for(killed.wait(), DEADLINE)

                # The purchase in flight: its outcome is unknown to the shop, so it is
                # interrupted and the payment uncertain, as when the agent's link drops.
                stuck = await _status(on_b, order_id, {"interrupted", "paid"})
                assert stuck["status"] == "interrupted", stuck
                assert stuck["settlement_status"] == "uncertain", stuck

                # A new purchase, on either process: refused before anything is created.
                refused = await _open_purchase(on_a)
                assert refused.status_code == 503, refused.text
                assert refused.headers["content-type"].startswith("application/problem+json")
                problem = refused.json()
                assert problem["code"] == "shared_state_unavailable", problem
                assert (await on_a.get("/orders")).text.count("/orders/ord_") <= 1

                # The page says the attempt is over (no reader while Redis is away).
                gave_up = await _phase(on_b, order_id, "failed")
                assert gave_up["status"] == "interrupted", gave_up

                # Redis back (empty); the shopper reloads the page; recovery finishes it.
                server.start()
                await agent.close()
                agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
                await agent.pair(f"{a.base_url}/reader", token=await _token(on_b, order_id))
                status = await _status(on_b, order_id, {"paid", "declined"})
                await agent.close()
        finally:
            for shop in shops:
                shop.stop()
            server.stop()
        report = check_invariants(
            live.factory,
            live.server.url,
            [card],
            orders=[(status["status"], status["settlement_id"])],
        )
        assert status["status"] == "paid", status
        delta = card.state.balance - before
        assert delta == -status["amount"]
        row.observed = (
            f"interrupted/uncertain while Redis was down; new purchase 503 "
            f"{problem['code']}; paid after restart ({delta:+d} fen on the card); "
            f"{report.summary()}"
        )


async def test_the_shop_process_driving_a_purchase_is_killed_and_a_survivor_takes_over(
    live: Live, tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "shop cluster (2 processes, cashier on B, agent on A): B SIGKILLed right after the "
        "card committed the DEBIT; nobody reloads the page",
        expected="A takes the order over once B's heartbeat lapses: recovery reads the "
        "card's counter, paid exactly once, the agent's session ended; invariants hold",
    ) as row:
        server = OwnRedis(tmp_path)
        server.start()
        shops = [
            TakeoverShop(
                directory=tmp_path,
                name=f"shop-{name}",
                settlement_url=live.server.base_url,
                api_key=live.merchant_key,
                redis_url=server.url,
                redis_prefix="takeover",
            )
            for name in "ab"
        ]
        a, b = shops
        card = live.funded_card(FUNDS)
        before = card.state.balance
        sim = SimReader(card)
        debits: list[float] = []

        def kill_the_driver(event: ApduEvent) -> None:
            committed = event.phase is Phase.AFTER and event.apdu[1] == INS_DEBIT_FOR_PURCHASE
            if committed and not debits:
                b.kill()  # the card committed; the cashier that asked for it is gone
                debits.append(asyncio.get_running_loop().time())

        sim.add_hook(kill_the_driver)
        try:
            for shop in shops:
                shop.start()
            async with (
                httpx.AsyncClient(base_url=b.base_url, timeout=DEADLINE) as on_b,
                httpx.AsyncClient(base_url=a.base_url, timeout=DEADLINE) as on_a,
            ):
                opened = await _open_purchase(on_b)
                assert opened.status_code == 303, opened.text
                order_id = opened.headers["location"].split("/")[2]
                on_a.cookies.update(on_b.cookies)
                token = await _token(on_b, order_id)  # the cashier task starts on B
                agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
                await agent.pair(f"{a.base_url}/reader", token=token)
                status = await _status(on_a, order_id, {"paid", "declined"})
                took = asyncio.get_running_loop().time() - debits[0]
                # The survivor ended the agent's session: the page could pair again.
                await asyncio.wait_for(agent.wait_ended(), DEADLINE)
                await agent.close()
        finally:
            for shop in shops:
                shop.stop()
            server.stop()
        report = check_invariants(
            live.factory,
            live.server.url,
            [card],
            orders=[(status["status"], status["settlement_id"])],
        )
        assert debits, "the purchase never reached the DEBIT"
        assert status["status"] == "paid", status
        delta = card.state.balance - before
        assert delta == -status["amount"]  # debited once, not twice
        row.observed = (
            f"paid {took:.1f} s after the SIGKILL, taken over by A ({delta:+d} fen on the "
            f"card); {report.summary()}"
        )
