"""Three real shop processes (``webpurse serve merchant``) on one Redis and one order book.

Each role of a purchase lands on a different process, as round-robin balancing would put
them: the shopper's checkout and payment page (so the cashier task) on B, the agent's
WebSocket on A, the page's SSE stream on C, and the same webhook delivered to C and then A.
The purchase completes with two round trips of the agent, the SSE stream on C shows it
paid, and the webhook's dedupe is shared. Settlement is the real server (SQLite).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.proof.processes import Live, ShopProcess, live_settlement
from tests.reader.remote_support import ConsentRecorder
from tests.redis_support import drop_prefix, redis_url, unique_prefix
from webpurse.agent.terminal import TerminalAgent
from webpurse.reader.sim import SimReader

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FUNDS = 10_000
WEBHOOK_KEY = b"k" * 32
WEBHOOK_SECRET = "whsec_" + base64.b64encode(WEBHOOK_KEY).decode()
DEADLINE = 30.0


@dataclass(kw_only=True)
class RedisShop(ShopProcess):
    """A shop process with the cluster's shared state (``WEBPURSE_REDIS_URL``)."""

    redis_url: str
    redis_prefix: str

    def environment(self) -> dict[str, str]:
        return {
            **super().environment(),
            "WEBPURSE_REDIS_URL": self.redis_url,
            "WEBPURSE_REDIS_PREFIX": self.redis_prefix,
            "WEBPURSE_MERCHANT_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with live_settlement("sqlite", tmp_path_factory.mktemp("settlement")) as server:
        yield server


@pytest.fixture
def shops(live: Live, tmp_path: Path) -> Iterator[list[RedisShop]]:
    url = redis_url()
    prefix = unique_prefix("cluster")
    made = [
        RedisShop(
            directory=tmp_path,
            name=f"shop-{name}",
            settlement_url=live.server.base_url,
            api_key=live.merchant_key,
            redis_url=url,
            redis_prefix=prefix,
        )
        for name in "abc"
    ]
    try:
        for shop in made:
            shop.start()
        yield made
    finally:
        for shop in made:
            shop.stop()
        drop_prefix(url, prefix)


def signed(event: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event).encode()
    stamp = str(int(time.time()))
    mac = hmac.new(WEBHOOK_KEY, f"{event['id']}.{stamp}.".encode() + body, hashlib.sha256)
    headers = {
        "webhook-id": event["id"],
        "webhook-timestamp": stamp,
        "webhook-signature": "v1," + base64.b64encode(mac.digest()).decode(),
        "content-type": "application/json",
    }
    return body, headers


async def sse_events(client: httpx.AsyncClient, order_id: str, into: list[dict[str, Any]]) -> None:
    """Read the order's SSE stream until a final event."""
    async with client.stream("GET", f"/orders/{order_id}/events") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line.removeprefix("data: "))
                into.append(event)
                if event["final"]:
                    return


async def test_a_purchase_whose_page_agent_cashier_and_webhook_are_on_different_processes(
    live: Live, shops: list[RedisShop]
) -> None:
    a, b, c = shops
    card = live.funded_card(FUNDS)
    sim = SimReader(card)
    agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
    async with (
        httpx.AsyncClient(base_url=b.base_url, timeout=DEADLINE) as on_b,
        httpx.AsyncClient(base_url=c.base_url, timeout=DEADLINE) as on_c,
        httpx.AsyncClient(base_url=a.base_url, timeout=DEADLINE) as on_a,
    ):
        added = await on_b.post("/cart/add", data={"product": "tea", "quantity": "1"})
        assert added.status_code == 303, added.text
        opened = await on_b.post("/checkout")
        assert opened.status_code == 303, opened.text
        order_id = opened.headers["location"].split("/")[2]
        page = await on_b.get(f"/orders/{order_id}/pay")  # the cashier task starts on B
        assert page.status_code == 200, page.text
        token = re.search(r'data-token="([^"]+)"', page.text)
        assert token is not None

        for client in (on_c, on_a):  # the same browser, its requests balanced elsewhere
            client.cookies.update(on_b.cookies)
        events: list[dict[str, Any]] = []
        stream = asyncio.create_task(sse_events(on_c, order_id, events))
        try:
            await agent.pair(f"{a.base_url}/reader", token=token.group(1))
            await asyncio.wait_for(asyncio.shield(stream), DEADLINE)
        finally:
            stream.cancel()
            await agent.close()

        status = (await on_a.get(f"/orders/{order_id}/status")).json()
        assert status["status"] == "paid", status
        assert status["round_trips"] == 2
        assert events[-1]["status"] == "paid" and events[-1]["phase"] == "succeeded"
        assert card.state.balance == FUNDS - status["amount"]

        # Settlement's webhook for it, delivered to C, then again to A: handled once.
        event = {
            "id": f"evt_{order_id}",
            "type": "payment.succeeded",
            "data": {"object": {"id": status["settlement_id"]}},
        }
        body, headers = signed(event)
        first = await on_c.post("/webhooks/settlement", content=body, headers=headers)
        assert first.status_code == 204, first.text
        seen = redis.Redis.from_url(a.redis_url)
        try:
            assert seen.exists(f"{a.redis_prefix}:webhook-seen:{event['id']}")
        finally:
            seen.close()
        again = await on_a.post("/webhooks/settlement", content=body, headers=headers)
        assert again.status_code == 204, again.text
