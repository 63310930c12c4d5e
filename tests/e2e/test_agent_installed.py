"""The shopper's path end to end: the agent installed alone from its built wheel (``make
agent``) into an empty virtual environment, a card in a PC/SC reader, the shop in a real
browser, one payment (pytest -m browser; needs chromium, pcscd with vsmartcard vpcd, uv).

The card is the emulator served into pcscd's virtual reader (``webpurse card serve``, from
the repository's environment); the agent is a separate process from the other
environment, which has no card emulator, shop or settlement code at all.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, expect

from tests.agent.dist_support import Installed, build_and_install
from tests.e2e.conftest import ARTIFACTS
from tests.reader.vpcd_support import ServedCard, require_pcsc, vpcd_slot
from webpurse.card.image import ImageFile
from webpurse.demo import DemoStack

pytestmark = [pytest.mark.browser, pytest.mark.pcsc, pytest.mark.timeout(300)]

PAY_TIMEOUT = 30_000  # ms


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return build_and_install(tmp_path_factory.mktemp("agent-dist"))


async def wait_listening(process: asyncio.subprocess.Process, port: int, origin: str) -> None:
    """Until the agent's loopback endpoint answers (bounded; the process must stay up)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            try:
                status = await client.get(
                    f"http://127.0.0.1:{port}/status", headers={"Origin": origin}
                )
                if status.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert process.returncode is None, "the installed agent exited"
            assert loop.time() < deadline, "the installed agent did not listen in time"
            await asyncio.sleep(0.05)  # polling a port another process opens


async def test_the_agent_installed_alone_pays_once_in_the_browser(
    stack: DemoStack, browser: Browser, installed: Installed, tmp_path: Path
) -> None:
    require_pcsc()
    image = tmp_path / "card.json"
    stack.issue_card(image)
    await stack.load_card_async(image, 10_000)
    with vpcd_slot() as (port, reader_name):
        served = ServedCard(image, port, tmp_path / "serve.log")
        served.start()
        agent = await asyncio.create_subprocess_exec(
            str(installed.agent),
            "--reader",
            f"pcsc:{reader_name}",
            "--yes",
            "--allow-origin",
            stack.merchant_url,
            "--port",
            str(stack.agent_port),
            "--once",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
        try:
            await wait_listening(agent, stack.agent_port, stack.merchant_url)
            context = await browser.new_context(locale="en-GB")
            page = await context.new_page()
            await page.goto(f"{stack.merchant_url}/")
            await page.click("[data-testid=add-tea]")
            await page.click("[data-testid=checkout]")
            message = page.locator("[data-testid=pay-message]")
            await expect(message).to_have_text("Paid. Thank you!", timeout=PAY_TIMEOUT)
            await page.screenshot(path=ARTIFACTS / "e2e-installed-agent.png", full_page=True)
            out, _ = await asyncio.wait_for(agent.communicate(), 30)  # --once: it exits
        finally:
            if agent.returncode is None:
                agent.kill()
                await agent.wait()
            served.stop()
    text = out.decode()
    assert agent.returncode == 0, text
    assert "Pay: ¥38.00 (3800 fen CNY)" in text and stack.merchant_url in text
    assert ImageFile(image).load().balance == 10_000 - 3800
