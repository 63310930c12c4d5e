"""The shop and settlement as a cluster behind HAProxy, in a real browser (issue 17).

``webpurse.cluster.ClusterStack``: 2 shop and 2 settlement processes (``webpurse serve``),
each on its own port, behind Debian's HAProxy ending TLS with a certificate made at start;
settlement's and the shop's databases on one PostgreSQL; Redis for what shop processes
share. Chromium pays on ``https://`` (the page dials the agent's ``wss://``, cookies are
``Secure``); the agent and its card emulator run in this process.

- a purchase through the balancer, round-robin over both shop processes;
- SIGKILL of the shop process driving the purchase (holding its lease) and of a settlement
  process right after the card committed the DEBIT; the surviving shop process takes the
  order over once the dead one's heartbeat lapses (recovery reads the card's counter) and
  the order ends paid exactly once, or the shopper reloads the payment page and the agent
  pairs again through the survivors; then a new purchase pays through what is left; the
  ledger checks out.

Without chromium, haproxy, PostgreSQL or Redis the tests skip, unless CI=true (fail).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import uvicorn
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.e2e.conftest import ARTIFACTS, CHROMIUM, Shopper, _need
from tests.redis_support import drop_prefix, redis_url, unique_prefix
from webpurse.agent.consent import always_yes
from webpurse.agent.pairing import create_pairing_app
from webpurse.agent.terminal import TerminalAgent
from webpurse.balancer import haproxy_path
from webpurse.card.image import ImageFile
from webpurse.cluster import SHOP_BALANCE, ClusterStack, drop_database
from webpurse.demo import free_port
from webpurse.protocol.commands import INS_DEBIT_FOR_PURCHASE
from webpurse.reader.sim import ApduEvent, Phase, SimReader

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

PAY_TIMEOUT = 30_000  # ms
RECOVERY_SECONDS = 90.0  # a dead process's purchase is taken over once its lease lapses
POSTGRES = os.environ.get(
    "WEBPURSE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _listening(url: str, default_port: int) -> bool:
    netloc = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = netloc.partition(":")
    try:
        with socket.create_connection((host, int(port or default_port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    _need(CHROMIUM.exists(), f"chromium not found at {CHROMIUM}")
    _need(haproxy_path() is not None, "haproxy is not installed (apt-get install haproxy)")
    _need(_listening(POSTGRES, 5432), "PostgreSQL is not listening")
    redis = redis_url()
    prefix = unique_prefix("cluster")
    base = POSTGRES.split("?", 1)[0].rsplit("/", 1)[0]
    unique = f"webpurse_cluster_{secrets.token_hex(4)}"
    database = f"{base}/{unique}"
    stack = ClusterStack(
        tmp_path_factory.mktemp("cluster"),
        settlement_port=free_port(),
        merchant_port=free_port(),
        agent_port=free_port(),
        database_url=database,
        redis_url=redis,
        redis_prefix=prefix,
    )
    saved = os.environ.get("SSL_CERT_FILE")
    try:
        with stack.running():
            stack.setup_settlement()
            stack.start_settlement()
            stack.register_webhook()
            stack.start_merchant()
            assert stack.tls is not None
            # This process's clients (the load flow, the agent's wss://) trust the CA.
            os.environ["SSL_CERT_FILE"] = str(stack.tls.ca)
            yield stack
    finally:
        if saved is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = saved
        for url in (stack.database_url, stack.merchant_database_url):
            with contextlib.suppress(Exception):
                drop_database(url)
        drop_prefix(redis, prefix)


_cards = iter(range(1, 10_000))


@pytest.fixture
async def shopper(cluster: ClusterStack) -> AsyncIterator[Shopper]:
    image = cluster.data_dir / f"card-{next(_cards)}.json"
    cluster.issue_card(image)
    await cluster.load_card_async(image, 10_000)
    reader = SimReader.from_image(image)
    agent = TerminalAgent(reader, consent=always_yes(), show=lambda _text: None)
    config = uvicorn.Config(
        create_pairing_app(agent, allowed_origins=[cluster.merchant_url]),
        host="127.0.0.1",
        port=cluster.agent_port,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(300):
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "the agent's pairing server did not start"
    try:
        yield Shopper(reader, image, agent)
    finally:
        server.should_exit = True
        await task
        await agent.close()
        await reader.close()


async def new_page(browser: Browser) -> tuple[BrowserContext, Page]:
    # The demo's CA is not in Chromium's store: accept its certificate (HTTPS all the same).
    context = await browser.new_context(
        locale="en-GB", viewport={"width": 1100, "height": 900}, ignore_https_errors=True
    )
    return context, await context.new_page()


async def buy(page: Page, cluster: ClusterStack, product: str) -> None:
    await page.goto(f"{cluster.merchant_url}/")
    await page.click(f"[data-testid=add-{product}]")
    await expect(page.locator(f"[data-testid=line-{product}]")).to_be_visible()
    await page.click("[data-testid=checkout]")
    await expect(page.locator("#pay")).to_be_visible()


async def order_status(page: Page) -> dict[str, Any]:
    order_id = await page.get_attribute("#pay", "data-order")
    origin = "/".join(page.url.split("/")[:3])
    response = await page.request.get(f"{origin}/orders/{order_id}/status")
    body: dict[str, Any] = await response.json()
    return body


async def status_of(page: Page, cluster: ClusterStack, order_id: str | None) -> dict[str, Any]:
    assert order_id, "the payment page names no order"
    response = await page.request.get(f"{cluster.merchant_url}/orders/{order_id}/status")
    body: dict[str, Any] = await response.json()
    return body


async def wait_status(
    page: Page, cluster: ClusterStack, order_id: str | None, want: set[str]
) -> dict[str, Any]:
    """Poll the order's status (what the page does) until it is in ``want`` (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_SECONDS
    while True:
        status = await status_of(page, cluster, order_id)
        if status["status"] in want or loop.time() > deadline:
            return status
        await asyncio.sleep(0.2)


def balance(shopper: Shopper) -> int:
    return ImageFile(shopper.image).load().balance


def driver_of_the_purchase(cluster: ClusterStack) -> str:
    """The shop process holding the one open order's lease (``flow:<order>``)."""
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        holders = [
            client.get(key) for key in client.scan_iter(match=f"{cluster.redis_prefix}:flow:*")
        ]
    finally:
        client.close()
    names = {bytes(h).decode().split("_", 1)[0] for h in holders if h is not None}
    assert len(names) == 1 and names <= set(cluster.named), names
    return names.pop()


def served(cluster: ClusterStack, backend: str) -> dict[str, int]:
    return {
        server: int(row["stot"])
        for (proxy, server), row in cluster.stats().items()
        if proxy == backend and server not in ("BACKEND", "FRONTEND")
    }


async def test_a_purchase_through_the_balancer_over_both_shop_processes(
    cluster: ClusterStack, shopper: Shopper, browser: Browser
) -> None:
    before = balance(shopper)
    shops_before = served(cluster, "shop")
    context, page = await new_page(browser)
    await buy(page, cluster, "tea")
    message = page.locator("[data-testid=pay-message]")
    await expect(message).to_have_text("Paid. Thank you!", timeout=PAY_TIMEOUT)
    await page.screenshot(path=ARTIFACTS / "e2e-cluster-paid.png", full_page=True)
    status = await order_status(page)
    assert status["status"] == "paid" and status["round_trips"] == 2
    assert balance(shopper) == before - status["amount"]
    # TLS all the way to the balancer: the page is https, its cookies Secure, the agent
    # dialled wss:// at the page's origin.
    assert page.url.startswith("https://")
    cookies = await context.cookies()
    assert cookies and all(cookie["secure"] for cookie in cookies), cookies
    assert shopper.agent.session is not None
    assert shopper.agent.session.target.ws_url.startswith("wss://")
    # The balancer spread the purchase's requests over the shop processes.
    shops = served(cluster, "shop")
    used = [name for name, total in shops.items() if total > shops_before.get(name, 0)]
    assert SHOP_BALANCE == "roundrobin"
    assert sorted(used) == ["shop1", "shop2"], shops
    assert all(total > 0 for total in served(cluster, "settlement").values())
    report = cluster.ledger_check()
    assert report["ok"], report["problems"]
    await context.close()


async def test_a_shop_and_a_settlement_process_killed_mid_purchase(
    cluster: ClusterStack, shopper: Shopper, browser: Browser
) -> None:
    before = balance(shopper)
    killed: list[str] = []

    def kill_after_the_debit(event: ApduEvent) -> None:
        if event.phase is Phase.AFTER and event.apdu[1] == INS_DEBIT_FOR_PURCHASE and not killed:
            # The shop process driving the purchase: it holds the order's lease in Redis,
            # its node id starts with its name (shop1_…). Its answer has nowhere to go.
            for name in (driver_of_the_purchase(cluster), "settlement1"):
                cluster.kill(name)
                killed.append(name)

    shopper.reader.add_hook(kill_after_the_debit)
    context, page = await new_page(browser)
    await buy(page, cluster, "umbrella")
    order_id = await page.get_attribute("#pay", "data-order")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PAY_TIMEOUT / 1000
    while not killed:  # bounded wait for the kill point
        assert loop.time() < deadline, "the purchase never reached the DEBIT"
        await asyncio.sleep(0.05)
    assert balance(shopper) < before  # the card committed the DEBIT
    # The surviving shop process takes the purchase over once the killed one's heartbeat
    # lapses: recovery reads the card's counter (the order is ``interrupted`` meanwhile),
    # settlement decides, and the agent's session ends. If the agent's session died with
    # the killed process, recovery waits for a new one: the shopper reloads the page,
    # which pairs the agent again through the survivors. Paid once.
    status = await wait_status(page, cluster, order_id, {"paid", "interrupted", "declined"})
    message = page.locator("[data-testid=pay-message]")
    if status["status"] != "paid":
        while shopper.agent.busy:  # bounded: the session is recovering or closing
            assert loop.time() < deadline + RECOVERY_SECONDS, "the agent's session never ended"
            await asyncio.sleep(0.05)
        status = await status_of(page, cluster, order_id)  # recovery may have finished it
    if status["status"] != "paid":
        await page.reload()
        await expect(message).to_have_text("Paid. Thank you!", timeout=PAY_TIMEOUT)
        status = await status_of(page, cluster, order_id)
    else:  # the page, on a survivor's progress events, says so too
        await expect(message).to_have_text("Paid. Thank you!", timeout=PAY_TIMEOUT)
    await page.screenshot(path=ARTIFACTS / "e2e-cluster-recovered.png", full_page=True)
    assert status["status"] == "paid", status
    assert balance(shopper) == before - status["amount"]  # debited once, not twice
    with cluster.settlement_client() as client:
        payment = client.get(f"/v1/payments/{status['settlement_id']}").json()
    assert payment["status"] == "succeeded", payment
    # A new purchase pays through what is left of the cluster.
    paid_before = balance(shopper)
    await buy(page, cluster, "tea")
    message = page.locator("[data-testid=pay-message]")
    await expect(message).to_have_text("Paid. Thank you!", timeout=PAY_TIMEOUT)
    again = await order_status(page)
    assert again["status"] == "paid"
    assert balance(shopper) == paid_before - again["amount"]
    report = cluster.ledger_check()
    assert report["ok"], report["problems"]
    # The killed processes come back on their ports and the balancer uses them again.
    for name in killed:
        cluster.start_named(name)
    await context.close()
