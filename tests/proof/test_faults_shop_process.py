"""Fault matrix, real processes: the merchant's shop server is SIGKILLed mid-payment.

Everything is real: settlement (``webpurse serve settlement``) and the shop (``webpurse
serve merchant``) run as uvicorn child processes; the shopper is an HTTP client of the
shop (cart, checkout or top-up, payment page); the terminal agent pairs with the token
from the payment page and drives the card emulator over the shop's WebSocket. The shop
gets SIGKILL as a command reaches the card: as batch 1's INITIALIZE runs (nothing was
authorised yet), or right after the card committed the DEBIT/CREDIT (authorised at
settlement, debited on the card, never captured). The shop starts again on the same data
directory; the shopper reloads the payment page and pairs the agent with the new token.
Then the order ends paid (loaded) exactly once and every invariant holds.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from tests.proof.conftest import Proof
from tests.proof.harness import DEADLINE
from tests.proof.invariants import check_invariants
from tests.proof.processes import Live, ShopProcess, live_settlement
from tests.reader.remote_support import ConsentRecorder
from webpurse.agent.terminal import TerminalAgent
from webpurse.merchant.orders import make_engine
from webpurse.merchant.staff import StaffBook
from webpurse.protocol.commands import INS_CREDIT_FOR_LOAD, INS_DEBIT_FOR_PURCHASE, INS_INITIALIZE
from webpurse.reader.sim import ApduEvent, Phase, SimReader

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SUITE = "faults"
FUNDS = 10_000
TOPUP_AMOUNT = 5_000
STAFF, PASSWORD = "till", "till password 1"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_settlement("sqlite", tmp_path_factory.mktemp("settlement")) as server:
        yield server


async def _open_order(browser: httpx.AsyncClient, kind: str) -> str:
    if kind == "purchase":
        added = await browser.post("/cart/add", data={"product": "tea", "quantity": "1"})
        assert added.status_code == 303, added.text
        opened = await browser.post("/checkout")
    else:  # cash at the till: staff sign in and record it; the float pays for the load
        page = await browser.get("/staff/signin")
        signed = await browser.post(
            "/staff/signin",
            data={"name": STAFF, "password": PASSWORD, "csrf": _csrf(page.text)},
        )
        assert signed.status_code == 303, signed.text
        till = await browser.get("/staff")
        opened = await browser.post(
            "/staff/topups", data={"cash": str(TOPUP_AMOUNT // 100), "csrf": _csrf(till.text)}
        )
    assert opened.status_code == 303, opened.text
    return opened.headers["location"].split("/")[2]


def _csrf(page: str) -> str:
    token = re.search(r'name="csrf" value="([^"]+)"', page)
    assert token is not None, "the staff form has no CSRF token"
    return token.group(1)


def _add_staff(directory: Path) -> None:
    """The till's staff account, in the shop's database before the shop starts."""
    engine = make_engine(f"sqlite:///{directory / 'shop' / 'merchant.db'}")
    try:
        StaffBook(engine, PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)).add(
            STAFF, PASSWORD
        )
    finally:
        engine.dispose()


async def _pair(
    browser: httpx.AsyncClient, shop: ShopProcess, order_id: str, sim: SimReader
) -> TerminalAgent:
    page = await browser.get(f"/orders/{order_id}/pay")
    assert page.status_code == 200, page.text
    token = re.search(r'data-token="([^"]+)"', page.text)
    assert token is not None, "the payment page has no pairing token"
    agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
    await agent.pair(f"{shop.base_url}/reader", token=token.group(1))
    return agent


async def _status(browser: httpx.AsyncClient, order_id: str, want: set[str]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:  # bounded polling of the shop's status endpoint (what the page does)
        body: dict[str, Any] = (await browser.get(f"/orders/{order_id}/status")).json()
        if body["status"] in want or loop.time() > deadline:
            return body
        await asyncio.sleep(0.1)


CASES = [
    (kind, point)
    for kind in ("purchase", "load")
    for point in ("batch 1's INITIALIZE runs", "the card committed the {step}")
]


@pytest.mark.parametrize(
    ("kind", "point"),
    CASES,
    ids=[f"{k}-{'initialize' if 'INIT' in p else 'committed'}" for k, p in CASES],
)
async def test_the_shop_is_killed_mid_payment_and_restarted(
    live: Live, tmp_path: Path, proof: Proof, kind: str, point: str
) -> None:
    step = "DEBIT" if kind == "purchase" else "CREDIT"
    done = "paid" if kind == "purchase" else "loaded"
    where = point.format(step=step)
    with proof.row(
        SUITE,
        f"{kind}: the shop process (uvicorn) SIGKILLed as {where}; restarted, page reloaded, "
        "agent paired again",
        expected=f"{done} exactly once; invariants hold",
    ) as row:
        card = live.funded_card(FUNDS) if kind == "purchase" else live.issue()
        before = card.state.balance
        sim = SimReader(card)
        shop = ShopProcess(
            directory=tmp_path, settlement_url=live.server.base_url, api_key=live.merchant_key
        )
        if kind == "load":
            (tmp_path / "shop").mkdir(exist_ok=True)
            _add_staff(tmp_path)
        shop.start()
        if "INITIALIZE" in point:
            ins, phase = INS_INITIALIZE, Phase.BEFORE
        else:
            ins = INS_DEBIT_FOR_PURCHASE if kind == "purchase" else INS_CREDIT_FOR_LOAD
            phase = Phase.AFTER

        def kill_shop(event: ApduEvent) -> None:
            if event.phase is phase and event.apdu[1] == ins and not shop.kills:
                shop.kill()  # the card still runs this command; its answer has nowhere to go

        sim.add_hook(kill_shop)
        try:
            async with httpx.AsyncClient(base_url=shop.base_url, timeout=15) as browser:
                order_id = await _open_order(browser, kind)
                agent = await _pair(browser, shop, order_id, sim)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + DEADLINE
                while not shop.kills:  # bounded wait for the kill point
                    assert loop.time() < deadline, "the flow never reached the kill point"
                    await asyncio.sleep(0.05)
                shop.start()  # same data dir, same port
                # The agent's resume reaches the new process, which refuses it (its sessions
                # died with the old one): that session is over; pair again from the page.
                await asyncio.wait_for(agent.wait_ended(), DEADLINE)
                await agent.close()
                agent = await _pair(browser, shop, order_id, sim)
                status = await _status(browser, order_id, {done, "declined"})
                await agent.close()
        finally:
            shop.stop()
        report = check_invariants(
            live.factory,
            live.server.url,
            [card],
            orders=[(status["status"], status["settlement_id"])],
        )
        assert status["status"] == done, status
        delta = card.state.balance - before
        assert delta == (-status["amount"] if kind == "purchase" else TOPUP_AMOUNT)
        row.observed = (
            f"{status['status']} after SIGKILL and restart ({delta:+d} fen on the card); "
            f"{report.summary()}"
        )
