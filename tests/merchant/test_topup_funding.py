"""The shopper's online top-up: a bank transfer bound to one card, loaded once funded.

Settlement is the in-memory fake (it issues a reference, keeps the load
``requires_funding`` until :meth:`FakeSettlement.fund`, and declines another card); the
card is the emulator in a SimReader behind a LocalBroker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.merchant.conftest import SERIAL, make_card
from tests.merchant.fakes import FakeSettlement
from webpurse.merchant.app import create_app
from webpurse.merchant.readers import LocalBroker
from webpurse.merchant.security import make_link
from webpurse.merchant.settings import MerchantSettings
from webpurse.reader.base import BatchRefused
from webpurse.reader.sim import SimReader

CARD = SERIAL.hex().upper()
SECRET = b"c" * 32


class Clock:
    """Wall-clock seconds, moved by hand (orders are dated by the real clock)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall() -> Clock:
    return Clock()


@pytest.fixture
async def shop(
    tmp_path: Path, settlement: FakeSettlement, wall: Clock
) -> AsyncIterator[tuple[httpx.AsyncClient, SimReader, Any]]:
    settings = MerchantSettings(data_dir=tmp_path, cookie_secret=SECRET)
    async with SimReader(make_card(balance=10_000)) as sim:
        app = create_app(settings, settlement=settlement, broker=LocalBroker(sim), wall_clock=wall)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
            yield client, sim, app
        await app.state.cashier.close()


async def wait_status(client: httpx.AsyncClient, order_id: str, want: set[str]) -> dict[str, Any]:
    for _ in range(300):
        body: dict[str, Any] = (await client.get(f"/orders/{order_id}/status")).json()
        if body["status"] in want:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"order stayed {body['status']}")


async def order_transfer(client: httpx.AsyncClient, card: str = CARD) -> str:
    r = await client.post(
        "/topup", data={"amount": "5000", "method": "bank_transfer", "card_number": card}
    )
    assert r.status_code == 303, r.text
    assert r.headers["location"].endswith("/transfer")
    return r.headers["location"].split("/")[2]


async def test_a_transfer_shows_its_reference_and_loads_only_once_funded(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, app = shop
    order_id = await order_transfer(client, "0000 0000 0000 0000 a001")  # as printed
    page = (await client.get(f"/orders/{order_id}/transfer")).text
    status = (await client.get(f"/orders/{order_id}/status")).json()
    assert status["payment_reference"] in page and status["payment_reference"].startswith("RF")
    assert (status["funding"], status["settlement_status"]) == ("bank_transfer", "requires_funding")
    assert status["card_number"] == CARD
    assert "Waiting for your transfer" in page
    # Not funded: the payment page sends the shopper back to wait, and nothing runs.
    r = await client.get(f"/orders/{order_id}/pay")
    assert r.status_code == 303 and r.headers["location"].endswith("/transfer")
    assert (await client.post(f"/orders/{order_id}/pairing")).status_code == 409
    assert app.state.cashier.task(order_id) is None
    assert sim.card is not None and sim.card.state.balance == 10_000
    settlement.fund(status["settlement_id"])  # the operator imported the statement
    page = (await client.get(f"/orders/{order_id}/transfer")).text
    assert "Your money has arrived" in page and f"/orders/{order_id}/pay" in page
    assert (await client.get(f"/orders/{order_id}/pay")).status_code == 200
    body = await wait_status(client, order_id, {"loaded", "declined"})
    assert body["status"] == "loaded" and body["round_trips"] == 2
    assert sim.card.state.balance == 15_000
    creates = [c for c in settlement.calls if c.startswith("create")]
    assert creates == [f"create {status['settlement_id']}"]  # one load, never re-created


async def test_a_transfer_for_another_card_is_declined_and_loads_nothing(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, _ = shop
    order_id = await order_transfer(client, "1" * 20)
    settlement.fund((await client.get(f"/orders/{order_id}/status")).json()["settlement_id"])
    await client.get(f"/orders/{order_id}/pay")
    body = await wait_status(client, order_id, {"loaded", "declined"})
    assert (body["status"], body["decline_code"]) == ("declined", "wrong_card")
    assert sim.card is not None and sim.card.state.balance == 10_000
    assert [c for c in settlement.calls if c.startswith("create")] == [
        f"create {body['settlement_id']}"
    ]


@pytest.mark.parametrize(
    "data",
    [
        {"amount": "5000"},  # the old free top-up: no funding at all
        {"amount": "5000", "method": "cash"},  # cash is paid at the till, not online
        {"amount": "5000", "method": "merchant_float", "card_number": CARD},
        {"amount": "5000", "method": "bank_transfer", "card_number": "not a card"},
        {"amount": "5000", "method": "bank_transfer"},
        {"amount": "1", "method": "bank_transfer", "card_number": CARD},
    ],
)
async def test_a_top_up_without_a_way_to_pay_creates_nothing(
    shop: Any, settlement: FakeSettlement, data: dict[str, str]
) -> None:
    client, sim, app = shop
    r = await client.post("/topup", data=data)
    assert r.status_code in (303, 422)
    if r.status_code == 303:
        assert r.headers["location"] == "/topup?method=cash"
    assert settlement.records == {}
    assert app.state.orders.count() == 0
    assert sim.card is not None and sim.card.state.balance == 10_000


async def test_the_receipt_link_opens_the_top_up_in_another_browser(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, _, app = shop
    order_id = await order_transfer(client)
    page = (await client.get(f"/orders/{order_id}/transfer")).text
    link = page.split('data-testid="topup-link" class="link">')[1].split("<")[0]
    path = link.removeprefix("http://shop.test")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as other:
        assert (await other.get(f"/orders/{order_id}/transfer")).status_code == 404
        r = await other.get(path)
        assert r.status_code == 303 and r.headers["location"] == f"/orders/{order_id}/transfer"
        assert (await other.get(f"/orders/{order_id}/transfer")).status_code == 200
        assert (await other.get(f"/orders/{order_id}/status")).json()["id"] == order_id


async def test_a_forged_or_expired_link_is_refused_and_opens_nothing(
    shop: Any, settlement: FakeSettlement, wall: Clock
) -> None:
    client, _, app = shop
    order_id = await order_transfer(client)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as other:
        forged = make_link(b"x" * 32, order_id, int(wall.now) + 3600)
        r = await other.get(f"/topup/link/{forged}")
        assert r.status_code == 403 and "not valid" in r.text
        genuine = make_link(SECRET, order_id, int(wall.now) + 3600)
        tampered = genuine.replace(order_id, "ord_" + "A" * 16)
        assert (await other.get(f"/topup/link/{tampered}")).status_code == 403
        expired = make_link(SECRET, order_id, int(wall.now) - 1)
        r = await other.get(f"/topup/link/{expired}")
        assert r.status_code == 410 and "expired" in r.text
        assert "wp_grant" not in other.cookies
        assert (await other.get(f"/orders/{order_id}/status")).status_code == 404
        # A genuine link stops opening the order once it expires, cookie or not.
        assert (await other.get(f"/topup/link/{genuine}")).status_code == 303
        assert (await other.get(f"/orders/{order_id}/status")).status_code == 200
        wall.now += 3600
        assert (await other.get(f"/orders/{order_id}/status")).status_code == 404


async def test_an_unpaid_transfer_that_expires_is_canceled_with_nothing_loaded(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, _ = shop
    order_id = await order_transfer(client)
    load_id = (await client.get(f"/orders/{order_id}/status")).json()["settlement_id"]
    settlement.records[load_id].status = "expired"
    body = (await client.get(f"/orders/{order_id}/status")).json()
    assert (body["status"], body["decline_code"]) == ("canceled", "unpaid_expired")
    assert "expired unpaid" in (await client.get(f"/orders/{order_id}/transfer")).text
    assert sim.card is not None and sim.card.state.balance == 10_000


async def test_the_top_up_page_offers_both_ways_in_both_languages(shop: Any) -> None:
    client, _, _ = shop
    en = (await client.get("/topup?lang=en")).text
    assert "Bank transfer" in en and "Cash at the till" in en and "counter" in en
    zh = (await client.get("/topup?lang=zh")).text
    assert "银行转账" in zh and "柜台现金" in zh
    cash = (await client.get("/topup?method=cash&lang=en")).text
    assert 'value="cash" data-testid="method-cash" checked' in cash


class RefusingReader:
    """An agent whose holder says no before INITIALIZE (consent refused)."""

    def __init__(self, inner: SimReader) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return "refusing"

    async def wait_for_card(self, timeout: float) -> Any:
        return await self.inner.wait_for_card(timeout)

    async def wait_for_removal(self, timeout: float) -> None:
        await self.inner.wait_for_removal(timeout)

    async def transmit(self, batch: Any) -> Any:
        raise BatchRefused("consent_refused", "the holder said no")


async def test_saying_no_keeps_a_paid_transfer_for_the_next_try(
    tmp_path: Path, settlement: FakeSettlement, wall: Clock
) -> None:
    settings = MerchantSettings(data_dir=tmp_path, cookie_secret=SECRET)
    async with SimReader(make_card(balance=0)) as sim:
        broker = LocalBroker(RefusingReader(sim))  # type: ignore[arg-type]
        app = create_app(settings, settlement=settlement, broker=broker, wall_clock=wall)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
            order_id = await order_transfer(client)
            load_id = (await client.get(f"/orders/{order_id}/status")).json()["settlement_id"]
            settlement.fund(load_id)
            await client.get(f"/orders/{order_id}/pay")
            body = await wait_status(client, order_id, {"loaded", "declined"})
            assert body["decline_code"] == "consent_refused"
            assert settlement.records[load_id].status == "requires_card"  # not canceled
            assert f"cancel {load_id}" not in settlement.calls
            broker.attach(sim)  # this time the holder says yes
            await client.post(f"/orders/{order_id}/retry")
            await client.get(f"/orders/{order_id}/pay")
            body = await wait_status(client, order_id, {"loaded"})
            assert body["settlement_id"] == load_id and sim.card is not None
            assert sim.card.state.balance == 5000
        await app.state.cashier.close()


async def test_the_card_number_is_read_off_the_card_through_the_agent(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, app = shop
    started = (await client.post("/topup/card-reads")).json()
    assert started["id"].startswith("rd_") and started["token"]
    body: dict[str, Any] = {}
    for _ in range(200):
        body = (await client.get(f"/topup/card-reads/{started['id']}")).json()
        if body["status"] != "waiting":
            break
        await asyncio.sleep(0.02)
    assert body == {"status": "read", "card_number": CARD, "error": None}
    assert sim.card is not None and sim.card.state.balance == 10_000  # nothing changed
    assert settlement.records == {} and app.state.orders.count() == 0
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as other:
        assert (await other.get(f"/topup/card-reads/{started['id']}")).status_code == 404


async def test_card_reads_waiting_for_an_agent_are_bounded(
    tmp_path: Path, settlement: FakeSettlement, monkeypatch: pytest.MonkeyPatch
) -> None:
    from webpurse.merchant import cardread

    monkeypatch.setattr(cardread, "MAX_WAITING", 2)
    settings = MerchantSettings(data_dir=tmp_path, cookie_secret=SECRET)
    app = create_app(settings, settlement=settlement, broker=LocalBroker())  # no agent comes
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
        assert (await client.post("/topup/card-reads")).status_code == 200
        assert (await client.post("/topup/card-reads")).status_code == 200  # replaces its own
        await asyncio.sleep(0)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as other:
            assert (await other.post("/topup/card-reads")).status_code == 200
            async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as third:
                assert (await third.post("/topup/card-reads")).status_code == 503
    await app.state.cashier.close()
