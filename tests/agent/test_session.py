"""The agent facing a misbehaving merchant server (a real websockets server, scripted):
whatever arrives, the agent refuses what it cannot accept with an ``error`` and keeps
serving; it never lets a step run past the batch's deadline."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from tests.card.support import TERMINAL, make_card
from tests.reader.remote_support import ConsentRecorder, debit_step, select_read_initialize
from webpurse.agent.guard import ConsentRequest
from webpurse.agent.session import PairingRefused, target_for
from webpurse.agent.terminal import TerminalAgent
from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.base import Step
from webpurse.reader.messages import MAX_MESSAGE_BYTES, Outcome
from webpurse.reader.sim import SimReader

Script = Callable[[ServerConnection], Awaitable[Any]]

WELCOME = json.dumps(
    {"type": "hello", "version": 1, "session": "ses_t", "resume_token": "r" * 43, "grace_ms": 0}
)


@contextlib.asynccontextmanager
async def scripted_server(script: Script) -> AsyncIterator[tuple[str, asyncio.Future[Any]]]:
    """A merchant server that plays ``script`` against the first connection."""
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def handler(ws: ServerConnection) -> None:
        try:
            result = await script(ws)
        except Exception as exc:
            if not outcome.done():
                outcome.set_exception(exc)
            raise
        if not outcome.done():
            outcome.set_result(result)

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"http://127.0.0.1:{port}/reader", outcome


async def ask(ws: ServerConnection, frame: str | dict[str, Any]) -> dict[str, Any]:
    await ws.send(frame if isinstance(frame, str) else json.dumps(frame))
    return json.loads(await asyncio.wait_for(ws.recv(), 5))  # type: ignore[no-any-return]


def transmit(msg_id: int, steps: list[Step], timeout_ms: int = 5000) -> dict[str, Any]:
    return {
        "type": "transmit",
        "id": msg_id,
        "apdus": [{"apdu": s.apdu.hex(), "ok": ["9000"]} for s in steps],
        "timeout_ms": timeout_ms,
    }


@pytest.fixture
def sim() -> SimReader:
    return SimReader(make_card())


async def test_agent_refuses_bad_server_messages_and_keeps_serving(sim: SimReader) -> None:
    async def script(ws: ServerConnection) -> dict[str, Any]:
        hello = json.loads(await ws.recv())
        await ws.send(WELCOME)
        replies = {
            "garbage": await ask(ws, "{{{"),
            "oversized": await ask(ws, "z" * (MAX_MESSAGE_BYTES + 1)),
            "result": await ask(ws, {"type": "result", "id": 1, "responses": [], "complete": True}),
            "hello": await ask(ws, WELCOME),
            "long": await ask(ws, transmit(2, [Step(cmd.GetBalance().to_apdu().to_bytes())] * 17)),
            "verify": await ask(ws, transmit(3, [Step(bytes.fromhex("0020000002123F"))])),
            "balance": await ask(
                ws,
                transmit(
                    4,
                    [
                        Step(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes()),
                        Step(cmd.GetBalance().to_apdu().to_bytes()),
                    ],
                ),
            ),
            "ping": await ask(ws, {"type": "ping", "nonce": "p"}),
        }
        await ws.send(json.dumps({"type": "end", "outcome": "canceled", "message": "bye"}))
        return {"agent_hello": hello, **replies}

    agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
    async with scripted_server(script) as (url, outcome):
        await agent.pair(url, token="t" * 43)
        end = await asyncio.wait_for(agent.wait_session(), 10)
        seen = await outcome

    assert seen["agent_hello"]["token"] == "t" * 43 and seen["agent_hello"]["versions"] == [1]
    assert seen["agent_hello"]["card"]["present"] is True
    codes = {k: v.get("code") for k, v in seen.items() if v.get("type") == "error"}
    assert codes == {
        "garbage": "malformed",
        "oversized": "too_large",
        "result": "unexpected",
        "hello": "unexpected",
        "long": "batch_too_long",
        "verify": "apdu_not_allowed",
    }
    assert seen["long"]["id"] == 2 and seen["verify"]["id"] == 3
    assert seen["balance"] == {
        "type": "result",
        "id": 4,
        "responses": [seen["balance"]["responses"][0], "000000009000"],
        "complete": True,
    }
    assert seen["ping"] == {"type": "pong", "nonce": "p"}
    assert end is not None and end.outcome is Outcome.CANCELED


async def test_a_server_that_skips_hello_is_refused(sim: SimReader) -> None:
    async def script(ws: ServerConnection) -> None:
        await ws.recv()
        await ws.send(json.dumps(transmit(1, [Step(cmd.GetBalance().to_apdu().to_bytes())])))
        await ws.wait_closed()

    agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
    async with scripted_server(script) as (url, _):
        with pytest.raises(PairingRefused) as refused:
            await agent.pair(url, token="t" * 43)
    assert refused.value.code == "unexpected" and not agent.busy


class SlowShopper:
    """Consent that answers only when told to."""

    def __init__(self) -> None:
        self.asked: list[ConsentRequest] = []
        self.asked_event = asyncio.Event()
        self.answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    async def __call__(self, request: ConsentRequest) -> bool:
        self.asked.append(request)
        self.asked_event.set()
        return await self.answer


async def _fund_and_initialize(sim: SimReader, ws: ServerConnection) -> ResponseApdu:
    steps = select_read_initialize(cmd.InitializeForPurchase(1, 1000, TERMINAL))
    reply = await ask(ws, transmit(1, steps))
    assert reply["type"] == "result" and reply["complete"] is True, reply
    return ResponseApdu.from_bytes(bytes.fromhex(reply["responses"][2]))


async def test_no_step_runs_after_the_batch_deadline(sim: SimReader) -> None:
    from tests.reader.remote_support import load

    await load(sim, 5000)
    shopper = SlowShopper()

    async def script(ws: ServerConnection) -> dict[str, Any]:
        await ws.recv()
        await ws.send(WELCOME)
        init = await _fund_and_initialize(sim, ws)
        return await ask(ws, transmit(2, [debit_step(1000, init)], timeout_ms=100))

    agent = TerminalAgent(sim, consent=shopper, show=lambda _: None)
    async with scripted_server(script) as (url, outcome):
        await agent.pair(url, token="t" * 43)
        reply = await asyncio.wait_for(outcome, 10)
        await agent.close()

    assert reply["type"] == "error" and reply["code"] == "timeout" and reply["id"] == 2
    assert [r.amount for r in shopper.asked] == [1000]  # asked, but never answered in time
    assert sim.card is not None and sim.card.state.balance == 5000


async def test_a_second_transmit_while_one_runs_is_busy(sim: SimReader) -> None:
    from tests.reader.remote_support import load

    await load(sim, 5000)
    shopper = SlowShopper()

    async def script(ws: ServerConnection) -> tuple[dict[str, Any], dict[str, Any]]:
        await ws.recv()
        await ws.send(WELCOME)
        init = await _fund_and_initialize(sim, ws)
        await ws.send(json.dumps(transmit(2, [debit_step(1000, init)])))
        await shopper.asked_event.wait()
        busy = await ask(ws, transmit(3, [Step(cmd.GetBalance().to_apdu().to_bytes())]))
        shopper.answer.set_result(True)
        done = json.loads(await asyncio.wait_for(ws.recv(), 5))
        return busy, done

    agent = TerminalAgent(sim, consent=shopper, show=lambda _: None)
    async with scripted_server(script) as (url, outcome):
        await agent.pair(url, token="t" * 43)
        busy, done = await asyncio.wait_for(outcome, 10)
        await agent.close()

    assert busy == {"type": "error", "code": "busy", "message": busy["message"], "id": 3}
    assert done["type"] == "result" and done["id"] == 2 and done["complete"] is True
    assert sim.card is not None and sim.card.state.balance == 4000


async def test_a_consent_prompt_that_fails_refuses_the_debit_without_sending_it(
    sim: SimReader, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.reader.remote_support import load

    await load(sim, 5000)
    asked: list[ConsentRequest] = []

    async def broken_prompt(request: ConsentRequest) -> bool:
        asked.append(request)
        raise RuntimeError("the terminal went away")

    async def script(ws: ServerConnection) -> dict[str, Any]:
        await ws.recv()
        await ws.send(WELCOME)
        init = await _fund_and_initialize(sim, ws)
        return await ask(ws, transmit(2, [debit_step(1000, init)]))

    shown: list[str] = []
    agent = TerminalAgent(sim, consent=broken_prompt, show=shown.append)
    async with scripted_server(script) as (url, outcome):
        await agent.pair(url, token="t" * 43)
        reply = await asyncio.wait_for(outcome, 10)
        await agent.close()

    # A definite refusal (nothing reached the card), not silence the server reads as unknown.
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "consent_refused", 2)
    assert reply.get("responses", []) == []
    assert [r.amount for r in asked] == [1000]
    assert sim.card is not None and sim.card.state.balance == 5000
    [record] = [r for r in caplog.records if "consent prompt failed" in r.getMessage()]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert any("prompt failed" in line for line in shown)


def test_target_maps_http_to_ws_and_keeps_the_origin() -> None:
    assert target_for("https://Shop.Example:443/reader?x=1").ws_url == (
        "wss://Shop.Example:443/reader?x=1"
    )
    assert target_for("https://Shop.Example:443/reader").origin == "https://shop.example"
    assert target_for("http://127.0.0.1:8000").ws_url == "ws://127.0.0.1:8000/"
    with pytest.raises(ValueError):
        target_for("ftp://shop.example/")
