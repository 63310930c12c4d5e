"""End-to-end harness: real settlement and merchant (uvicorn processes), a real agent
(TerminalAgent + its loopback pairing server, in this process so the test can move the
emulated card and inject faults), and Debian's chromium driven by Playwright.

Without chromium the tests skip, unless CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from playwright.async_api import Browser, async_playwright

from webpurse.agent.consent import always_yes
from webpurse.agent.guard import ConsentRequest
from webpurse.agent.pairing import create_pairing_app
from webpurse.agent.terminal import TerminalAgent
from webpurse.demo import DemoStack, free_port
from webpurse.reader.sim import SimReader

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    _need(CHROMIUM.exists(), f"chromium not found at {CHROMIUM}")
    demo = DemoStack(
        tmp_path_factory.mktemp("e2e"),
        settlement_port=free_port(),
        merchant_port=free_port(),
        agent_port=free_port(),
    )
    with demo.running():
        demo.setup_settlement()
        demo.start_settlement()
        demo.register_webhook()
        demo.start_merchant()
        yield demo


@dataclass
class Shopper:
    """The shopper's device: the agent, its reader and the card image in that reader."""

    reader: SimReader
    image: Path
    agent: TerminalAgent


_cards = iter(range(1, 10_000))


@pytest.fixture
async def shopper(stack: DemoStack, request: pytest.FixtureRequest) -> AsyncIterator[Shopper]:
    """A freshly issued card loaded with ``@pytest.mark.balance(fen)`` (default ¥100)."""
    marker = request.node.get_closest_marker("balance")
    balance = marker.args[0] if marker else 10_000
    image = stack.data_dir / f"card-{next(_cards)}.json"
    stack.issue_card(image)
    if balance:
        await stack.load_card_async(image, balance)
    reader = SimReader.from_image(image)
    consent = always_yes()
    if request.node.get_closest_marker("refuse_consent"):

        async def refuse(_request: ConsentRequest) -> bool:
            return False

        consent = refuse
    agent = TerminalAgent(reader, consent=consent, show=lambda _text: None)
    if request.node.get_closest_marker("no_loopback"):
        # The page cannot reach this agent (another device): pairing by short code only.
        try:
            yield Shopper(reader, image, agent)
        finally:
            await agent.close()
            await reader.close()
        return
    config = uvicorn.Config(
        create_pairing_app(agent, allowed_origins=[stack.merchant_url]),
        host="127.0.0.1",
        port=stack.agent_port,
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


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    _need(CHROMIUM.exists(), f"chromium not found at {CHROMIUM}")
    ARTIFACTS.mkdir(exist_ok=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield launched
        finally:
            await launched.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "balance(fen): the shopper's card balance")
    config.addinivalue_line("markers", "no_loopback: the agent has no loopback pairing endpoint")
    config.addinivalue_line("markers", "refuse_consent: the shopper says no on the agent")
