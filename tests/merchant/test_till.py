"""The till: staff sign-in (Argon2id, session, CSRF, rate limits), cash top-ups funded by
the merchant's float, the shift report, the audit trail and the float.low warning."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from tests.merchant.conftest import make_card
from tests.merchant.fakes import FakeSettlement
from webpurse.merchant.app import create_app
from webpurse.merchant.orders import CANCELED, LOADED, Order
from webpurse.merchant.readers import LocalBroker
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.staff import StaffBook, StaffError, shift_report
from webpurse.reader.sim import SimReader

PASSWORD = "correct horse battery"
WEBHOOK = "whsec_" + base64.b64encode(b"w" * 24).decode()
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)  # tests only


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def shop(
    tmp_path: Path, settlement: FakeSettlement, clock: Clock
) -> AsyncIterator[tuple[httpx.AsyncClient, SimReader, Any]]:
    settings = MerchantSettings(data_dir=tmp_path, cookie_secret=b"c" * 32, webhook_secret=WEBHOOK)
    async with SimReader(make_card(balance=10_000)) as sim:
        app = create_app(
            settings,
            settlement=settlement,
            broker=LocalBroker(sim),
            password_hasher=FAST,
            clock=clock,
        )
        app.state.till.staff.add("mei", PASSWORD)
        app.state.till.staff.add("li.wei", PASSWORD)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
            yield client, sim, app
        await app.state.cashier.close()


def new_client(app: Any, address: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 123))
    return httpx.AsyncClient(transport=transport, base_url="http://shop.test")


def token(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the form has no CSRF token"
    return match.group(1)


async def sign_in(
    client: httpx.AsyncClient, name: str = "mei", password: str = PASSWORD
) -> httpx.Response:
    page = await client.get("/staff/signin")
    return await client.post(
        "/staff/signin", data={"name": name, "password": password, "csrf": token(page.text)}
    )


async def till_token(client: httpx.AsyncClient) -> str:
    return token((await client.get("/staff")).text)


async def wait_status(client: httpx.AsyncClient, order_id: str, want: set[str]) -> dict[str, Any]:
    for _ in range(300):
        body: dict[str, Any] = (await client.get(f"/orders/{order_id}/status")).json()
        if body["status"] in want:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"order stayed {body['status']}")


def audit(app: Any) -> list[tuple[str, str]]:
    return [(e.staff_name, e.action) for e in reversed(app.state.till.staff.audit_trail())]


async def test_passwords_are_argon2id_and_names_unique(tmp_path: Path) -> None:
    from webpurse.merchant.orders import make_engine

    book = StaffBook(make_engine(f"sqlite:///{tmp_path / 'm.db'}"), FAST)
    member = book.add("mei", PASSWORD)
    assert member.password_hash.startswith("$argon2id$") and PASSWORD not in member.password_hash
    assert book.authenticate("mei", PASSWORD) is not None
    assert book.authenticate("mei", PASSWORD + "!") is None
    assert book.authenticate("nobody", PASSWORD) is None
    with pytest.raises(StaffError):
        book.add("mei", "another long one")
    with pytest.raises(StaffError):
        book.add("Bad Name", PASSWORD)
    with pytest.raises(StaffError):
        book.add("short", "2short")


async def test_the_till_is_behind_sign_in_and_the_session_cookie_is_guarded(shop: Any) -> None:
    client, _, app = shop
    r = await client.get("/staff")
    assert r.status_code == 303 and r.headers["location"] == "/staff/signin"
    r = await sign_in(client)
    assert r.status_code == 303 and r.headers["location"] == "/staff"
    cookie = r.headers["set-cookie"]
    assert "wp_staff=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie
    page = (await client.get("/staff")).text
    assert 'data-testid="staff-who">mei<' in page and "¥10,000.00" in page  # the float
    # A cookie altered by one character is no session.
    value = client.cookies["wp_staff"]
    client.cookies.set("wp_staff", value[:-1] + ("A" if value[-1] != "A" else "B"))
    assert (await client.get("/staff")).status_code == 303
    assert ("mei", "signin") in audit(app)


async def test_secure_cookie_under_https(tmp_path: Path, settlement: FakeSettlement) -> None:
    settings = MerchantSettings(
        data_dir=tmp_path, cookie_secret=b"c" * 32, public_url="https://shop.example"
    )
    app = create_app(settings, settlement=settlement, password_hasher=FAST)
    app.state.till.staff.add("mei", PASSWORD)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://shop.test") as client:
        page = await client.get("/staff/signin")
        assert "Secure" in page.headers["set-cookie"]
        r = await sign_in(client)
        assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]


async def test_staff_posts_without_session_or_csrf_token_are_refused_and_change_nothing(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, _, app = shop
    # No session at all.
    r = await client.post("/staff/topups", data={"cash": "50", "csrf": "x"})
    assert r.status_code == 403
    # Signed in, but no token, or another session's token.
    await sign_in(client)
    assert (await client.post("/staff/topups", data={"cash": "50"})).status_code == 403
    async with new_client(app) as other:
        await sign_in(other, "li.wei")
        theirs = await till_token(other)
    r = await client.post("/staff/topups", data={"cash": "50", "csrf": theirs})
    assert r.status_code == 403
    # Sign-in itself needs the token of its own page.
    async with new_client(app) as fresh:
        r = await fresh.post("/staff/signin", data={"name": "mei", "password": PASSWORD})
        assert r.status_code == 403 and "wp_staff" not in fresh.cookies
    assert settlement.records == {} and app.state.orders.count() == 0
    assert ("mei", "csrf_refused") in audit(app)
    # Signing out needs the token too; after it the session is gone.
    assert (await client.post("/staff/signout")).status_code == 403
    r = await client.post("/staff/signout", data={"csrf": await till_token(client)})
    assert r.status_code == 303
    assert (await client.get("/staff")).status_code == 303


async def test_sign_in_attempts_are_limited_per_account(shop: Any, clock: Clock) -> None:
    client, _, app = shop
    for _ in range(5):
        assert (await sign_in(client, "mei", "wrong password")).status_code == 401
    r = await sign_in(client, "mei", PASSWORD)  # right, but too late
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    assert "wp_staff" not in client.cookies
    async with new_client(app, "10.0.0.9") as elsewhere:  # the account, from anywhere
        assert (await sign_in(elsewhere, "mei", PASSWORD)).status_code == 429
        assert (await sign_in(elsewhere, "li.wei", PASSWORD)).status_code == 303
    clock.now += 15 * 60
    assert (await sign_in(client, "mei", PASSWORD)).status_code == 303
    assert ("mei", "signin_limited") in audit(app)


async def test_sign_in_attempts_are_limited_per_client_address(shop: Any, clock: Clock) -> None:
    _, _, app = shop
    async with new_client(app, "10.0.0.66") as sprayer:
        for n in range(20):
            assert (await sign_in(sprayer, f"guess{n}", "wrong password")).status_code == 401
        assert (await sign_in(sprayer, "mei", PASSWORD)).status_code == 429
    async with new_client(app, "10.0.0.7") as other:
        assert (await sign_in(other, "mei", PASSWORD)).status_code == 303


async def test_cash_at_the_till_loads_the_card_from_the_float(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, app = shop
    await sign_in(client)
    r = await client.post("/staff/topups", data={"cash": "200", "csrf": await till_token(client)})
    assert r.status_code == 303 and r.headers["location"].endswith("/pay")
    order_id = r.headers["location"].split("/")[2]
    assert (await client.get(f"/orders/{order_id}/pay")).status_code == 200  # the till's agent
    body = await wait_status(client, order_id, {"loaded", "declined"})
    assert (body["status"], body["funding"]) == ("loaded", "merchant_float")
    assert sim.card is not None and sim.card.state.balance == 10_000 + 20_000
    assert settlement.float == 1_000_000 - 20_000
    assert ("mei", "cash_taken") in audit(app) and ("mei", "load_created") in audit(app)
    report = (await client.get("/staff/report")).text
    assert 'data-testid="cash-mei">¥200.00<' in report
    assert 'data-testid="loaded-mei">¥200.00<' in report


async def test_a_top_up_beyond_the_float_is_refused_clearly_and_loads_nothing(
    shop: Any, settlement: FakeSettlement
) -> None:
    client, sim, app = shop
    settlement.float = 5_000
    await sign_in(client)
    r = await client.post("/staff/topups", data={"cash": "50.01", "csrf": await till_token(client)})
    assert r.status_code == 409
    assert "The top-up float is too low for this amount: hand the cash back" in r.text
    assert 'data-testid="float-low"' in r.text  # ¥50 is below the ¥100 threshold
    assert settlement.float == 5_000 and settlement.records == {}
    assert sim.card is not None and sim.card.state.balance == 10_000
    (order,) = app.state.orders.till_orders(*_today())
    assert (order.status, order.decline_code) == (CANCELED, "insufficient_float")
    assert ("mei", "topup_refused") in audit(app)
    # The shift report counts no cash for it: none changed hands.
    report = (await client.get("/staff/report")).text
    assert 'data-testid="cash-mei">¥0.00<' in report


@pytest.mark.parametrize("cash", ["", "0", "-5", "abc", "1000.01", "12.345", "1e3"])
async def test_a_cash_amount_that_is_not_money_is_refused(
    shop: Any, settlement: FakeSettlement, cash: str
) -> None:
    client, _, app = shop
    await sign_in(client)
    r = await client.post("/staff/topups", data={"cash": cash, "csrf": await till_token(client)})
    assert r.status_code == 422
    assert settlement.records == {} and app.state.orders.count() == 0


def _today() -> tuple[Any, Any]:
    import datetime as dt

    start = dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(), tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def test_the_shift_report_sums_cash_against_loads_per_staff_member() -> None:
    def order(staff: str, cash: int, status: str, code: str | None = None) -> Order:
        return Order(
            id="o",
            staff_id=staff,
            amount=cash,
            cash_received=cash,
            status=status,
            decline_code=code,
        )

    rows = shift_report(
        [
            order("s1", 20_000, LOADED),
            order("s1", 5_000, "declined", "balance_limit"),
            order("s2", 10_000, LOADED),
            order("s2", 3_000, CANCELED, "insufficient_float"),
            Order(id="x", staff_id=None, amount=99, status=LOADED),
        ],
        {"s1": "mei", "s2": "li.wei"},
    )
    assert [(r.staff, r.topups, r.cash_taken, r.loads, r.loaded, r.not_loaded) for r in rows] == [
        ("li.wei", 1, 10_000, 1, 10_000, 0),
        ("mei", 2, 25_000, 1, 20_000, 5_000),
    ]


def _signed(body: bytes) -> dict[str, str]:
    msg_id, stamp = "msg_1", str(int(time.time()))
    key = base64.b64decode(WEBHOOK.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        "content-type": "application/json",
    }


async def test_float_low_webhook_shows_a_banner_at_the_till(
    shop: Any, settlement: FakeSettlement, caplog: pytest.LogCaptureFixture
) -> None:
    client, _, _ = shop
    await sign_in(client)
    assert 'data-testid="float-low"' not in (await client.get("/staff")).text
    event = {
        "id": "evt_1",
        "type": "float.low",
        "data": {"object": {"merchant": "mer_1", "balance": 9_000, "low_threshold": 10_000}},
    }
    body = json.dumps(event).encode()
    r = await client.post("/webhooks/settlement", content=body, headers=_signed(body))
    assert r.status_code == 204
    assert "float.low" in caplog.text
    settlement.float = 9_000
    assert 'data-testid="float-low"' in (await client.get("/staff")).text
    settlement.float = 500_000  # the office deposited more: the banner goes
    assert 'data-testid="float-low"' not in (await client.get("/staff")).text
