"""The shop through its HTTP interface: pages, cart, checkout, paying with a sim reader."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.merchant.conftest import make_card
from tests.merchant.fakes import FakeSettlement
from webpurse.merchant.app import create_app
from webpurse.merchant.readers import LocalBroker
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.webhooks import SeenEvents
from webpurse.protocol.commands import INS_DEBIT_FOR_PURCHASE
from webpurse.reader.sim import Fault, SimReader

SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()


@pytest.fixture
async def shop(
    tmp_path: Path, settlement: FakeSettlement
) -> AsyncIterator[tuple[httpx.AsyncClient, SimReader, Any]]:
    settings = MerchantSettings(data_dir=tmp_path, cookie_secret=b"c" * 32, webhook_secret=SECRET)
    async with SimReader(make_card(balance=10_000)) as sim:
        app = create_app(settings, settlement=settlement, broker=LocalBroker(sim))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
            yield client, sim, app
        await app.state.cashier.close()


async def wait_status(client: httpx.AsyncClient, order_id: str, want: set[str]) -> dict[str, Any]:
    for _ in range(200):
        body: dict[str, Any] = (await client.get(f"/orders/{order_id}/status")).json()
        if body["status"] in want:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"order stayed {body['status']}")


async def checkout(client: httpx.AsyncClient, *items: str) -> str:
    for item in items:
        r = await client.post("/cart/add", data={"product": item, "quantity": "1"})
        assert r.status_code == 303
    r = await client.post("/checkout")
    assert r.status_code == 303
    location = r.headers["location"]
    assert location.endswith("/pay")
    return location.split("/")[2]


async def test_catalogue_lists_a_dozen_products_with_prices(shop: Any) -> None:
    client, _, _ = shop
    page = (await client.get("/", headers={"Accept-Language": "en-GB,en;q=0.9"})).text
    assert page.count('class="product"') == 12
    assert "¥38.00" in page and "Green tea" in page
    assert "/static/img/tea.svg" in page
    assert (await client.get("/static/img/tea.svg")).status_code == 200


async def test_language_from_accept_language_and_switch(shop: Any) -> None:
    client, _, _ = shop
    zh = (await client.get("/", headers={"Accept-Language": "zh-CN,zh;q=0.9,en;q=0.5"})).text
    assert "绿茶" in zh and 'lang="zh-CN"' in zh
    switched = await client.get("/?lang=en", headers={"Accept-Language": "zh-CN"})
    assert "Green tea" in switched.text and switched.cookies.get("wp_lang") == "en"
    again = await client.get("/", headers={"Accept-Language": "zh-CN"})
    assert "Green tea" in again.text


async def test_purchase_end_to_end_marks_the_order_paid_only_from_settlement(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, _ = shop
    order_id = await checkout(client, "tea", "bun")
    cart = await client.get("/cart")
    assert "tea" not in cart.text.split("<main>")[1].split("</main>")[0] or "empty" in cart.text
    pay = await client.get(f"/orders/{order_id}/pay")
    assert pay.status_code == 200 and "¥41.50" in pay.text
    body = await wait_status(client, order_id, {"paid", "declined"})
    assert body["status"] == "paid"
    assert body["round_trips"] == 2
    assert (body["balance_before"], body["balance_after"]) == (10_000, 10_000 - 4150)
    assert settlement.records[body["settlement_id"]].status == "succeeded"
    assert sim.card is not None and sim.card.state.balance == 5850
    history = (await client.get("/orders")).text
    assert order_id in history
    receipt = (await client.get(f"/orders/{order_id}")).text
    assert body["tac"] in receipt


async def test_insufficient_funds_shows_declined_with_the_reason(shop: Any) -> None:
    client, sim, _ = shop
    for _ in range(3):
        await client.post("/cart/add", data={"product": "kite", "quantity": "20"})
    order_id = (await client.post("/checkout")).headers["location"].split("/")[2]
    await client.get(f"/orders/{order_id}/pay")
    body = await wait_status(client, order_id, {"declined", "paid"})
    assert (body["status"], body["decline_code"]) == ("declined", "insufficient_funds")
    assert sim.card is not None and sim.card.state.balance == 10_000
    page = (await client.get(f"/orders/{order_id}")).text
    assert "insufficient funds" in page


async def test_bad_input_is_refused_and_changes_nothing(shop: Any) -> None:
    client, _, _ = shop
    assert (await client.post("/cart/add", data={"product": "caviar"})).status_code == 422
    assert (await client.post("/topup", data={"amount": "1"})).status_code == 422
    client.cookies.set("wp_cart", "eyJ0ZWEiOjV9.AAAA")
    assert "empty" in (await client.get("/cart")).text
    assert (await client.get("/orders/ord_nope/status")).status_code == 404


async def test_another_browser_cannot_see_an_order(shop: Any) -> None:
    client, _, app = shop
    order_id = await checkout(client, "mug")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as other:
        assert (await other.get(f"/orders/{order_id}")).status_code == 404


async def test_a_session_id_the_client_chose_is_never_adopted(shop: Any) -> None:
    """Session fixation: an attacker plants a well-formed ``wp_sid`` in the victim's browser,
    the victim checks out, and the attacker reads the victim's order with the same id."""
    client, _, app = shop
    planted = "attacker-chosen-session-id-0001"
    client.cookies.set("wp_sid", planted)
    order_id = await checkout(client, "mug")
    issued = [c.value for c in client.cookies.jar if c.name == "wp_sid" and c.value != planted]
    assert issued and not issued[0].startswith(planted)
    client.cookies.delete("wp_sid", domain="")  # the browser keeps the one the shop set
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as attacker:
        attacker.cookies.set("wp_sid", planted)
        assert (await attacker.get(f"/orders/{order_id}")).status_code == 404
        assert order_id not in (await attacker.get("/orders")).text
        # A forged signature on a token of its choosing is refused too.
        attacker.cookies.set("wp_sid", planted + ".AAAA")
        assert (await attacker.get(f"/orders/{order_id}")).status_code == 404
    assert (await client.get(f"/orders/{order_id}")).status_code == 200  # the victim's is


@pytest.mark.parametrize(("scheme", "secure"), [("http", False), ("https", True)])
async def test_session_and_cart_cookies_are_httponly_lax_and_secure_over_https(
    tmp_path: Path, settlement: FakeSettlement, scheme: str, secure: bool
) -> None:
    settings = MerchantSettings(data_dir=tmp_path, cookie_secret=b"c" * 32, webhook_secret=SECRET)
    app = create_app(settings, settlement=settlement, broker=LocalBroker(SimReader()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=f"{scheme}://shop.test") as client:
        added = await client.post("/cart/add", data={"product": "tea", "quantity": "1"})
        opened = await client.post("/checkout")
    await app.state.cashier.close()
    cookies = added.headers.get_list("set-cookie") + opened.headers.get_list("set-cookie")
    by_name = {c.split("=", 1)[0]: c.lower() for c in cookies}
    assert {"wp_sid", "wp_cart"} <= set(by_name)
    for name in ("wp_sid", "wp_cart"):
        assert "httponly" in by_name[name] and "samesite=lax" in by_name[name]
        assert ("; secure" in by_name[name]) is secure


def _signed(body: bytes, secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    key = base64.b64decode(secret.removeprefix("whsec_"))
    sig = base64.b64encode(hmac.new(key, f"evt_1.{ts}.".encode() + body, hashlib.sha256).digest())
    return {
        "webhook-id": "evt_1",
        "webhook-timestamp": str(ts),
        "webhook-signature": f"v1,{sig.decode()}",
    }


async def test_webhook_signature_is_verified(shop: Any) -> None:
    client, _, _ = shop
    body = json.dumps(
        {"id": "evt_1", "type": "payment.succeeded", "data": {"object": {"id": "pay_x"}}}
    ).encode()
    assert (
        await client.post("/webhooks/settlement", content=body, headers=_signed(body))
    ).status_code == 204
    forged = _signed(body, secret="whsec_" + base64.b64encode(b"x" * 24).decode())
    assert (
        await client.post("/webhooks/settlement", content=body, headers=forged)
    ).status_code == 400
    stale = _signed(body, ts=int(time.time()) - 3600)
    assert (
        await client.post("/webhooks/settlement", content=body, headers=stale)
    ).status_code == 400


async def test_interrupted_payment_asks_for_the_card_again_then_ends_paid_once(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, _ = shop
    sim.inject(Fault.after(INS_DEBIT_FOR_PURCHASE))
    order_id = await checkout(client, "fan")
    await client.get(f"/orders/{order_id}/pay")
    body = await wait_status(client, order_id, {"interrupted"})
    assert body["phase"] == "interrupted"
    assert settlement.records[body["settlement_id"]].status == "uncertain"
    sim.insert()
    body = await wait_status(client, order_id, {"paid"})
    assert sim.card is not None and sim.card.state.balance == 10_000 - 2450
    assert settlement.records[body["settlement_id"]].status == "succeeded"


async def test_a_verified_webhook_marks_the_order_paid_from_settlement(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, _, app = shop
    order_id = await checkout(client, "kite")
    order = app.state.orders.get(order_id)
    assert order.status == "pending" and order.settlement_id is not None
    settlement.records[order.settlement_id].status = "succeeded"  # settled elsewhere
    event = {
        "id": "evt_1",
        "type": "payment.succeeded",
        "data": {"object": {"id": order.settlement_id}},
    }
    body = json.dumps(event).encode()
    forged = _signed(body, secret="whsec_" + base64.b64encode(b"x" * 24).decode())
    assert (
        await client.post("/webhooks/settlement", content=body, headers=forged)
    ).status_code == 400
    assert app.state.orders.get(order_id).status == "pending"
    assert (
        await client.post("/webhooks/settlement", content=body, headers=_signed(body))
    ).status_code == 204
    assert app.state.orders.get(order_id).status == "paid"


async def test_polling_settles_an_order_when_no_webhook_comes(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, _, app = shop
    order_id = await checkout(client, "orange")
    order = app.state.orders.get(order_id)
    settlement.records[order.settlement_id].status = "succeeded"
    poller = asyncio.create_task(app.state.cashier.poll(0.01))
    try:
        for _ in range(200):
            if app.state.orders.get(order_id).status == "paid":
                break
            await asyncio.sleep(0.01)
        assert app.state.orders.get(order_id).status == "paid"
    finally:
        poller.cancel()


async def test_a_debit_lost_before_the_card_is_released_and_paid_afresh(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, app = shop
    sim.inject(Fault.before(INS_DEBIT_FOR_PURCHASE))
    order_id = await checkout(client, "chopsticks")
    await client.get(f"/orders/{order_id}/pay")
    first = await wait_status(client, order_id, {"interrupted"})
    sim.insert()
    body = await wait_status(client, order_id, {"paid"})
    assert settlement.records[first["settlement_id"]].status == "canceled"
    assert body["settlement_id"] != first["settlement_id"]
    assert settlement.records[body["settlement_id"]].status == "succeeded"
    assert sim.card is not None and sim.card.state.balance == 10_000 - 990
    assert (order_id, "canceled") in app.state.cashier.broker.finished  # the agent re-pairs


async def test_webhook_event_ids_are_remembered_in_a_bounded_set_once_handled(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, _, app = shop
    order_id = await checkout(client, "kite")
    order = app.state.orders.get(order_id)
    settlement.records[order.settlement_id].status = "succeeded"
    event = {
        "id": "evt_1",
        "type": "payment.succeeded",
        "data": {"object": {"id": order.settlement_id}},
    }
    body = json.dumps(event).encode()

    seen = app.state.seen_events
    assert isinstance(seen, SeenEvents) and len(seen) == 0
    response = await client.post("/webhooks/settlement", content=body, headers=_signed(body))
    assert response.status_code == 204 and app.state.orders.get(order_id).status == "paid"
    assert "evt_1" in seen and len(seen) == 1
    again = await client.post("/webhooks/settlement", content=body, headers=_signed(body))
    assert again.status_code == 204 and len(seen) == 1
