"""Two shop apps (two processes' worth: each its own Redis pool and node id) on one Redis
and one order book: staff sign-in limits and staff sessions hold across them, and the
shop without Redis configured keeps everything in the process (the embedded default)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.merchant.conftest import SERIAL, make_card
from tests.merchant.fakes import FakeSettlement
from tests.merchant.test_till import FAST, PASSWORD, sign_in
from tests.reader.remote_support import ConsentRecorder, serve
from tests.redis_support import drop_prefix, redis_url, unique_prefix
from webpurse.agent.terminal import TerminalAgent
from webpurse.merchant.app import create_app
from webpurse.merchant.progress import ProgressBus, RedisProgressBus
from webpurse.merchant.security import RateLimiter, RedisRateLimiter
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.till import ACCOUNT_FAILURES
from webpurse.merchant.webhooks import RedisSeenEvents, SeenEvents
from webpurse.reader.sim import SimReader


@pytest.fixture
async def apps(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[list[Any]]:
    url = redis_url()
    prefix = unique_prefix(request.node.name)
    settings = MerchantSettings(
        data_dir=tmp_path, cookie_secret=b"c" * 32, redis_url=url, redis_prefix=prefix
    )
    async with AsyncExitStack() as stack:
        made = []
        for _ in range(2):
            app = create_app(settings, settlement=FakeSettlement(), password_hasher=FAST)
            await stack.enter_async_context(app.router.lifespan_context(app))
            made.append(app)
        made[0].state.till.staff.add("mei", PASSWORD)
        yield made
    drop_prefix(url, prefix)


def client(app: Any, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 123))
    return httpx.AsyncClient(transport=transport, base_url="http://shop.test")


async def test_failed_sign_ins_on_one_process_count_on_the_other(apps: list[Any]) -> None:
    a, b = apps
    assert isinstance(a.state.till.by_account, RedisRateLimiter)
    async with client(a, "192.0.2.10") as on_a, client(b, "192.0.2.10") as on_b:
        for _ in range(ACCOUNT_FAILURES):
            assert (await sign_in(on_a, "mei", "wrong password")).status_code == 401
        refused = await sign_in(on_b, "mei", PASSWORD)  # even the right password, on B
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0


async def test_a_staff_session_opened_on_one_process_works_on_the_other(
    apps: list[Any],
) -> None:
    a, b = apps
    async with client(a, "192.0.2.11") as on_a, client(b, "192.0.2.11") as on_b:
        signed = await sign_in(on_a)
        assert signed.status_code == 303, signed.text
        on_b.cookies.update(on_a.cookies)
        till = await on_b.get("/staff")
        assert till.status_code == 200 and "mei" in till.text


async def test_without_redis_the_shop_keeps_its_state_in_the_process(tmp_path: Path) -> None:
    settings = MerchantSettings(data_dir=tmp_path, cookie_secret=b"c" * 32)
    app = create_app(settings, settlement=FakeSettlement(), password_hasher=FAST)
    assert isinstance(app.state.till.by_account, RateLimiter)
    assert type(app.state.bus) is ProgressBus and not isinstance(app.state.bus, RedisProgressBus)
    assert isinstance(app.state.seen_events, SeenEvents)
    assert not isinstance(app.state.seen_events, RedisSeenEvents)
    assert app.state.shop.shared is None


async def test_a_card_read_started_on_one_process_reads_through_an_agent_on_another(
    apps: list[Any],
) -> None:
    a, b = apps
    card = make_card()
    agent = TerminalAgent(SimReader(card), consent=ConsentRecorder(), show=lambda _: None)
    try:
        async with (
            serve(a) as url_a,
            serve(b) as url_b,
            httpx.AsyncClient(base_url=url_a) as on_a,
            httpx.AsyncClient(base_url=url_b) as on_b,
        ):
            started = (await on_a.post("/topup/card-reads")).json()
            on_b.cookies.update(on_a.cookies)
            await agent.pair(f"{url_b}/reader", token=started["token"])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:  # bounded polling, as the top-up page does (on the other process)
                body = (await on_b.get(f"/topup/card-reads/{started['id']}")).json()
                if body["status"] != "waiting" or loop.time() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert body == {"status": "read", "card_number": SERIAL.hex().upper(), "error": None}
            async with httpx.AsyncClient(base_url=url_b) as stranger:
                refused = await stranger.get(f"/topup/card-reads/{started['id']}")
                assert refused.status_code == 404  # another browser session
    finally:
        await agent.close()


async def test_an_unreachable_redis_refuses_new_purchases_before_anything_is_created(
    tmp_path: Path,
) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = MerchantSettings(
        data_dir=tmp_path, cookie_secret=b"c" * 32, redis_url=f"redis://127.0.0.1:{port}/0"
    )
    settlement = FakeSettlement()
    app = create_app(settings, settlement=settlement, password_hasher=FAST)
    async with client(app, "192.0.2.12") as browser:
        added = await browser.post("/cart/add", data={"product": "tea", "quantity": "1"})
        assert added.status_code == 303
        refused = await browser.post("/checkout")
        assert refused.status_code == 503
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.headers["retry-after"]
        assert refused.json()["code"] == "shared_state_unavailable"
    assert settlement.records == {}  # no payment was opened at settlement
