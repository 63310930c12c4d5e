"""``webpurse agent`` as a shopper runs it: a real process beside a card image, paired by the
page through its loopback endpoint or by a typed code, driven by a real merchant server."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.card.support import make_state
from tests.reader.remote_support import load, merchant_app, purchase, serve
from webpurse.card.image import ImageFile
from webpurse.reader.messages import Outcome
from webpurse.reader.remote import ReaderHub

WEBPURSE = [str(Path(sys.executable).with_name("webpurse"))]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "card.json"
    ImageFile(path).create(make_state())
    return path


@pytest.fixture
async def merchant() -> AsyncIterator[tuple[ReaderHub, str]]:
    hub = ReaderHub()
    async with serve(merchant_app(hub)) as base:
        try:
            yield hub, base
        finally:
            await hub.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_agent(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *WEBPURSE,
        "agent",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )


async def finish(process: asyncio.subprocess.Process) -> str:
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 20)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return out.decode()


async def test_the_page_pairs_the_agent_process_and_the_merchant_runs_a_load_and_a_purchase(
    image: Path, merchant: tuple[ReaderHub, str]
) -> None:
    hub, base = merchant
    port = free_port()
    process = await run_agent(
        "--reader", f"sim:{image}", "--yes", "--allow-origin", base, "--port", str(port), "--once"
    )
    try:
        pairing = hub.issue("pay_cli", display="Order 7")
        async with httpx.AsyncClient(timeout=10) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while True:  # bounded wait until the agent process listens
                try:
                    status = await client.get(
                        f"http://127.0.0.1:{port}/status", headers={"Origin": base}
                    )
                    if status.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.returncode is None and loop.time() < deadline
                await asyncio.sleep(0.05)
            paired = await client.post(
                f"http://127.0.0.1:{port}/pair",
                json={"token": pairing.token, "server": f"{base}/reader"},
                headers={"Origin": base},
            )
        assert paired.status_code == 200, paired.text
        remote = await hub.wait_for_reader("pay_cli", 5)
        await remote.wait_for_card(5)
        await load(remote, 3000)
        await purchase(remote, 1000)
        await remote.end(Outcome.SUCCEEDED, "paid", 1000)
    finally:
        out = await finish(process)

    assert process.returncode == 0, out
    assert ImageFile(image).load().balance == 2000
    assert "¥30.00" in out and "¥10.00" in out and base in out and "Order 7" in out


async def test_the_shopper_types_a_code(image: Path, merchant: tuple[ReaderHub, str]) -> None:
    hub, base = merchant
    pairing = hub.issue("load_cli")
    process = await run_agent(
        "--reader",
        f"sim:{image}",
        "--yes",
        "--code",
        pairing.display_code,
        "--server",
        f"{base}/reader",
    )
    try:
        remote = await hub.wait_for_reader("load_cli", 15)
        await load(remote, 1500)
        await remote.end(Outcome.SUCCEEDED, "loaded", 1500)
    finally:
        out = await finish(process)
    assert process.returncode == 0, out
    assert ImageFile(image).load().balance == 1500


async def test_a_spent_code_is_a_clear_error(image: Path, merchant: tuple[ReaderHub, str]) -> None:
    hub, base = merchant
    pairing = hub.issue("pay_spent")
    hub.pairings.redeem(code=pairing.code)
    process = await run_agent(
        "--reader", f"sim:{image}", "--code", pairing.code, "--server", f"{base}/reader"
    )
    out = await finish(process)
    assert process.returncode == 2 and "token_invalid" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--reader", "sim:x", "--code", "ABCDEFGH"],
        ["--reader", "sim:x"],
        ["--reader", "sim:x", "--allow-origin", "not a url"],
    ],
)
async def test_bad_command_lines_fail_clearly(args: list[str]) -> None:
    process = await run_agent(*args)
    out = await finish(process)
    assert process.returncode == 2 and "error:" in out


async def test_consent_dialog_without_a_display_is_a_clear_error(image: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    process = await asyncio.create_subprocess_exec(
        *WEBPURSE,
        "agent",
        "--reader",
        f"sim:{image}",
        "--consent",
        "dialog",
        "--allow-origin",
        "http://shop.test",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**env, "COLUMNS": "200"},
    )
    out = await finish(process)
    assert process.returncode == 2 and "--consent dialog: no display" in out


async def test_the_merchants_words_reach_the_terminal_as_text(
    image: Path, merchant: tuple[ReaderHub, str]
) -> None:
    hub, base = merchant
    pairing = hub.issue("pay_words", display="[bold red]Tea[/] \x1b[2AHouse")
    process = await run_agent(
        "--reader", f"sim:{image}", "--yes", "--code", pairing.code, "--server", f"{base}/reader"
    )
    try:
        remote = await hub.wait_for_reader("pay_words", 15)
        await load(remote, 500)
        await remote.end(Outcome.SUCCEEDED, "[blink]loaded[/blink]\x1b[1A", 500)
    finally:
        out = await finish(process)
    assert process.returncode == 0, out
    assert r"The merchant says: [bold red]Tea[/] \x1b[2AHouse" in out
    assert r"succeeded ¥5.00: [blink]loaded[/blink]\x1b[1A" in out
    assert "\x1b[2A" not in out and "\x1b[1A" not in out
