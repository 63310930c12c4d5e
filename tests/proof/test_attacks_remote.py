"""Attacks on the remote-reader path: pairing tokens, the agent's loopback endpoint, frames.

Real components: the merchant's ``ReaderHub`` mounted in a FastAPI app served by uvicorn,
the agent's loopback pairing app (uvicorn), the ``TerminalAgent`` driving the card emulator
through a ``SimReader``, raw ``websockets`` clients and servers as the attacker. Each
attack must be refused with its code, logged, and leave the card, the pairing and the
live session as they were. Rows go to the ``attacks`` proof table.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.card.support import TERMINAL, make_card
from tests.proof.conftest import Proof
from tests.reader.remote_support import (
    ConsentRecorder,
    debit_step,
    load,
    merchant_app,
    purchase,
    select_read_initialize,
)
from tests.reader.remote_support import (
    serve as serve_app,
)
from webpurse.agent.pairing import create_pairing_app
from webpurse.agent.session import PairingRefused
from webpurse.agent.terminal import TerminalAgent
from webpurse.card.applet import CardApplet
from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import StatusWord
from webpurse.reader.base import BatchRefused
from webpurse.reader.messages import MAX_MESSAGE_BYTES, Outcome
from webpurse.reader.remote import ReaderHub
from webpurse.reader.sim import SimReader

SUITE = "attacks"


@dataclass
class Stack:
    hub: ReaderHub
    merchant: str
    card: CardApplet
    agent: TerminalAgent
    pairing_url: str
    client: httpx.AsyncClient
    agent_consent: ConsentRecorder

    @property
    def ws_url(self) -> str:
        return self.merchant.replace("http", "ws") + "/reader"


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    hub = ReaderHub(grace=5.0, batch_timeout=10.0)
    card = make_card()
    sim = SimReader(card)
    await load(sim, 5_000)
    consent = ConsentRecorder()
    agent = TerminalAgent(sim, consent=consent, show=lambda _: None)
    async with serve_app(merchant_app(hub)) as merchant:
        app = create_pairing_app(agent, allowed_origins=[merchant])
        async with serve_app(app) as pairing, httpx.AsyncClient(timeout=10) as client:
            try:
                yield Stack(hub, merchant, card, agent, pairing, client, consent)
            finally:
                await agent.close()
                await hub.close()


def purse(card: CardApplet) -> tuple[int, int, int, int]:
    s = card.state
    return s.balance, s.online_counter, s.offline_counter, len(s.log)


async def pair(stack: Stack, body: object, origin: str | None, **headers: str) -> httpx.Response:
    if origin is not None:
        headers["Origin"] = origin
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers.setdefault("Content-Type", "application/json")
    return await stack.client.post(f"{stack.pairing_url}/pair", content=content, headers=headers)


# --- the agent's loopback endpoint -------------------------------------------------------


async def test_a_wrong_origin_cannot_pair_the_agent(
    stack: Stack, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    pairing = stack.hub.issue("pay_origin")
    body = {"token": pairing.token, "server": f"{stack.merchant}/reader"}
    for origin in ("https://evil.example", "null", None, stack.merchant + ".evil.example"):
        with proof.row(
            SUITE,
            f"agent loopback /pair from Origin {origin!r}",
            expected="403 origin_not_allowed, no CORS, logged; token unspent, agent idle",
        ) as row:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="webpurse.agent.pairing"):
                answer = await pair(stack, body, origin)
            assert answer.status_code == 403 and answer.json()["code"] == "origin_not_allowed"
            assert "access-control-allow-origin" not in answer.headers
            assert "origin" in caplog.text and "not allowed" in caplog.text
            assert not stack.agent.busy and stack.hub.reader_for("pay_origin") is None
            row.observed = "403 origin_not_allowed; no ACAO; idle"
    with proof.row(
        SUITE,
        "agent loopback: after the refusals the right page pairs with the same token",
        expected="200 paired (the refused attempts spent nothing)",
    ) as row:
        answer = await pair(stack, body, stack.merchant)
        assert answer.status_code == 200, answer.text
        await stack.hub.wait_for_reader("pay_origin", 5)
        row.observed = "200 paired"


BAD_PAIR_REQUESTS: list[tuple[str, Any, dict[str, str], int, str]] = [
    ("DNS-rebound Host header", None, {"Host": "evil.example"}, 421, "bad_host"),
    ("5 KB body", {"token": "a" * 43, "server": "x" * 5000}, {}, 400, "bad_request"),
    ("not JSON", b"token=abc", {}, 400, "bad_request"),
    ("deeply nested JSON", b"[" * 50_000 + b"]" * 50_000, {}, 400, "bad_request"),
    ("token with spaces", {"token": "a b" * 20, "server": "SERVER"}, {}, 400, "bad_request"),
    (
        "server at another origin",
        {"token": "TOKEN", "server": "https://evil.example/reader"},
        {},
        400,
        "server_origin_mismatch",
    ),
]


async def test_malformed_pairing_requests_are_refused_and_logged(
    stack: Stack, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    pairing = stack.hub.issue("pay_bad")
    honest = {"token": pairing.token, "server": f"{stack.merchant}/reader"}
    for label, body, headers, status, code in BAD_PAIR_REQUESTS:
        with proof.row(
            SUITE,
            f"agent loopback /pair: {label}",
            expected=f"{status} {code}, logged; agent idle, token unspent",
        ) as row:
            if body is None:
                body = honest
            elif isinstance(body, dict):
                body = {
                    k: v.replace("TOKEN", pairing.token).replace(
                        "SERVER", f"{stack.merchant}/reader"
                    )
                    for k, v in body.items()
                }
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="webpurse.agent.pairing"):
                answer = await pair(stack, body, stack.merchant, **headers)
            assert answer.status_code == status and answer.json()["code"] == code, answer.text
            assert code in caplog.text, f"not logged: {caplog.text!r}"
            assert not stack.agent.busy and stack.hub.reader_for("pay_bad") is None
            row.observed = f"{status} {code}; logged"
    assert (await pair(stack, honest, stack.merchant)).status_code == 200


# --- pairing tokens ----------------------------------------------------------------------


async def test_a_stolen_token_used_by_a_second_agent_is_refused(
    stack: Stack, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    with proof.row(
        SUITE,
        "pairing token used by a second agent while the first is paired",
        expected="token_invalid, logged by the hub; the first session and card unharmed",
    ) as row:
        pairing = stack.hub.issue("pay_stolen")
        answer = await pair(
            stack, {"token": pairing.token, "server": f"{stack.merchant}/reader"}, stack.merchant
        )
        assert answer.status_code == 200
        remote = await stack.hub.wait_for_reader("pay_stolen", 5)
        thief_card = make_card()
        thief = TerminalAgent(SimReader(thief_card), consent=ConsentRecorder(), show=print)
        caplog.clear()
        try:
            with (
                caplog.at_level(logging.WARNING, logger="webpurse.reader.remote"),
                pytest.raises(PairingRefused) as refused,
            ):
                await thief.pair(stack.ws_url.replace("ws", "http", 1), token=pairing.token)
            assert refused.value.code == "token_invalid"
            assert "token_invalid" in caplog.text
            with pytest.raises(PairingRefused) as by_code:
                await thief.pair(stack.ws_url.replace("ws", "http", 1), code=pairing.code)
            assert by_code.value.code == "token_invalid"
        finally:
            await thief.close()
        assert stack.hub.reader_for("pay_stolen") is remote
        before = purse(stack.card)
        await purchase(remote, 1_000)  # the real shopper's session still works
        assert purse(stack.card)[0] == before[0] - 1_000
        row.observed = "token_invalid (token and code); logged; first session paid 10.00"


async def test_a_spent_token_is_refused(
    stack: Stack, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    with proof.row(
        SUITE,
        "pairing token replayed after its session ended",
        expected="403 token_invalid through the agent, logged; nothing bound",
    ) as row:
        pairing = stack.hub.issue("pay_spent")
        body = {"token": pairing.token, "server": f"{stack.merchant}/reader"}
        assert (await pair(stack, body, stack.merchant)).status_code == 200
        remote = await stack.hub.wait_for_reader("pay_spent", 5)
        await remote.end(Outcome.CANCELED, "bye")
        await asyncio.wait_for(stack.agent.wait_session(), 5)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="webpurse.reader.remote"):
            again = await pair(stack, body, stack.merchant)
        assert again.status_code == 403 and again.json()["code"] == "token_invalid"
        assert "token_invalid" in caplog.text
        assert not stack.agent.busy
        row.observed = "403 token_invalid; logged"


# --- a merchant that changes the amount after the shopper confirmed ----------------------


async def test_a_debit_for_another_amount_than_confirmed_never_reaches_the_card(
    stack: Stack, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    with proof.row(
        SUITE,
        "relay via the agent: shopper confirms 10.00; after a failed DEBIT the merchant"
        " re-INITIALIZEs for 20.00 and sends DEBIT",
        expected="the failed DEBIT spent the consent: the agent asks again, showing 20.00;"
        " the shopper says no → consent_refused (logged by the agent); card never sees it",
    ) as row:
        pairing = stack.hub.issue("pay_amount")
        body = {"token": pairing.token, "server": f"{stack.merchant}/reader"}
        assert (await pair(stack, body, stack.merchant)).status_code == 200
        remote = await stack.hub.wait_for_reader("pay_amount", 5)
        await remote.wait_for_card(5)
        first = await remote.transmit(
            select_read_initialize(cmd.InitializeForPurchase(1, 1_000, TERMINAL))
        )
        # A DEBIT whose MAC1 is for another amount: the card refuses it (9302).
        (failed,) = await remote.transmit([debit_step(999, first[2])])
        assert failed.sw == StatusWord.MAC_INVALID
        before = purse(stack.card)
        stack.agent_consent.answer = False  # the shopper expected 10.00, not 20.00
        caplog.clear()
        with caplog.at_level(logging.INFO):
            again = await remote.transmit(
                select_read_initialize(cmd.InitializeForPurchase(1, 2_000, TERMINAL))
            )
            with pytest.raises(BatchRefused) as refused:
                await remote.transmit([debit_step(2_000, again[2], seq=2)])
        assert refused.value.code == "consent_refused"
        refusers = {r.name for r in caplog.records if "consent_refused" in r.getMessage()}
        assert "webpurse.agent.session" in refusers, refusers
        assert purse(stack.card) == before
        asked = stack.agent_consent.asked
        assert [(r.kind.value, r.amount) for r in asked] == [
            ("purchase", 1_000),
            ("purchase", 2_000),
        ]
        row.observed = "asked again showing 20.00; shopper no → consent_refused; purse unchanged"


# --- frames at the merchant's hub --------------------------------------------------------


async def _reply(ws: Any) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 5))  # type: ignore[no-any-return]


async def test_hostile_frames_before_hello_are_refused_and_closed(
    stack: Stack, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    frames: list[tuple[str, str | bytes, str | None]] = [
        ("invalid JSON", "{not json", "malformed"),
        ("frame of 16 KiB + 1", "x" * (MAX_MESSAGE_BYTES + 1), "too_large"),
        ("a JSON array", "[1, 2, 3]", "malformed"),
        ("binary frame", b"\x00\x01\x02", None),
        (
            "hello with a 2 KB token",
            json.dumps(
                {
                    "type": "hello",
                    "versions": [1],
                    "agent": "a",
                    "reader": "r",
                    "card": {"present": True},
                    "token": "t" * 2000,
                }
            ),
            None,
        ),
        (
            "transmit sent by the agent",
            json.dumps(
                {"type": "transmit", "id": 1, "apdus": [{"apdu": "00A40400"}], "timeout_ms": 5}
            ),
            None,
        ),
    ]
    for label, frame, code in frames:
        with proof.row(
            SUITE,
            f"hub WebSocket, first frame: {label}",
            expected="error (code) then close 1008, logged; no session",
        ) as row:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="webpurse.reader.remote"):
                async with connect(stack.ws_url, max_size=None) as ws:
                    await ws.send(frame)
                    reply = await _reply(ws)
                    await asyncio.wait_for(ws.wait_closed(), 5)
            assert reply["type"] == "error" and (code is None or reply["code"] == code), reply
            assert ws.close_code == 1008
            assert "refused agent" in caplog.text
            row.observed = f"error {reply['code']}, close 1008"


async def test_a_frame_over_the_servers_limit_closes_only_that_socket(
    stack: Stack, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "hub WebSocket: a 4 MiB frame (beyond the server's frame limit)",
        expected="that connection closed (1009); the hub keeps serving: next agent pays",
    ) as row:
        async with connect(stack.ws_url, max_size=None) as ws:
            await ws.send("y" * (4 << 20))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
        code = ws.close_code
        pairing = stack.hub.issue("pay_after")
        body = {"token": pairing.token, "server": f"{stack.merchant}/reader"}
        assert (await pair(stack, body, stack.merchant)).status_code == 200
        remote = await stack.hub.wait_for_reader("pay_after", 5)
        await purchase(remote, 500)
        row.observed = f"closed {code}; next session paid 5.00"


async def test_a_flood_of_bad_frames_in_a_session_ends_that_connection_only(
    stack: Stack, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    with proof.row(
        SUITE,
        "hub WebSocket: malformed/oversized frames inside a session",
        expected="each refused with a code and logged; after 8 the socket is closed; no APDU sent",
    ) as row:
        pairing = stack.hub.issue("pay_flood")
        codes: list[str] = []
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="webpurse.reader.remote"):
            async with connect(stack.ws_url, max_size=None) as ws:
                await ws.send(
                    json.dumps(
                        {
                            "type": "hello",
                            "versions": [1],
                            "agent": "attacker",
                            "reader": "r",
                            "card": {"present": True},
                            "token": pairing.token,
                        }
                    )
                )
                assert (await _reply(ws))["type"] == "hello"
                bad = [
                    "{",
                    "z" * (MAX_MESSAGE_BYTES + 5),
                    '{"type":"result","id":7,"responses":["9000"],"complete":true}',
                    '{"type":"card","event":"melted"}',
                    '{"type":"result","id":"x","responses":[],"complete":1}',
                    '{"type":"launch","target":"card"}',
                    "null",
                    '{"type":"error","code":"' + "c" * 5000 + '"}',
                    '{"type":"ping","nonce":"' + "n" * 100 + '"}',
                ]
                try:
                    for frame in bad:
                        await ws.send(frame)
                        reply = await _reply(ws)
                        if reply["type"] == "error":
                            codes.append(str(reply["code"]))
                    await asyncio.wait_for(ws.wait_closed(), 5)
                except ConnectionClosed:
                    pass
        assert len(codes) >= 8 and set(codes) <= {
            "malformed",
            "too_large",
            "unknown_id",
            "unexpected",
        }
        assert ws.close_code is not None
        assert caplog.text.count("refused agent") >= len(codes)
        row.observed = (
            f"{len(codes)} refusals ({', '.join(sorted(set(codes)))}); closed {ws.close_code}"
        )


# --- frames at the agent ------------------------------------------------------------------


async def test_a_hostile_merchant_cannot_make_the_agent_send_anything(
    proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    with proof.row(
        SUITE,
        "hostile merchant → agent: oversized, malformed, VERIFY, DEBIT without INITIALIZE",
        expected="agent answers error codes, logs them; the card's purse unchanged",
    ) as row:
        card = make_card()
        sim = SimReader(card)
        await load(sim, 5_000)
        before = purse(card)
        welcome = json.dumps(
            {
                "type": "hello",
                "version": 1,
                "session": "ses_x",
                "resume_token": "r" * 43,
                "grace_ms": 0,
            }
        )
        debit = cmd.DebitForPurchase(1, *_when(), b"\0" * 4).to_apdu().to_bytes().hex()
        frames = [
            "q" * (MAX_MESSAGE_BYTES + 1),
            "{]",
            json.dumps(
                {
                    "type": "transmit",
                    "id": 1,
                    "apdus": [{"apdu": "0020000002123F"}],
                    "timeout_ms": 1000,
                }
            ),
            json.dumps(
                {"type": "transmit", "id": 2, "apdus": [{"apdu": debit}], "timeout_ms": 1000}
            ),
            json.dumps(
                {"type": "transmit", "id": 3, "apdus": [{"apdu": "zz"}], "timeout_ms": 1000}
            ),
        ]
        replies: list[dict[str, Any]] = []

        async def script(ws: ServerConnection) -> None:
            await ws.recv()
            await ws.send(welcome)
            for frame in frames:
                await ws.send(frame)
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
            await ws.send(json.dumps({"type": "end", "outcome": "canceled"}))

        agent = TerminalAgent(sim, consent=ConsentRecorder(), show=lambda _: None)
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="webpurse.agent"):
                async with serve(script, "127.0.0.1", 0) as server:
                    port = next(iter(server.sockets)).getsockname()[1]
                    await agent.pair(f"http://127.0.0.1:{port}/reader", token="t" * 43)
                    await asyncio.wait_for(agent.wait_session(), 10)
        finally:
            await agent.close()
        codes = [r.get("code") for r in replies]
        assert codes == ["too_large", "malformed", "apdu_not_allowed", "no_initialize", "malformed"]
        assert caplog.text.count("refused") >= 4
        assert purse(card) == before
        row.observed = f"{', '.join(str(c) for c in codes)}; purse unchanged"


def _when() -> tuple[Any, Any]:
    from tests.card.support import WHEN

    return WHEN


async def test_the_shops_own_reader_endpoint_refuses_hostile_frames(
    tmp_path: Any, proof: Proof
) -> None:
    from tests.merchant.fakes import FakeSettlement
    from webpurse.merchant.app import create_app
    from webpurse.merchant.settings import MerchantSettings

    with proof.row(
        SUITE,
        "the shop's /reader WebSocket (webpurse.merchant, uvicorn): bad JSON, 1 MiB, bad token",
        expected="error malformed / too_large / token_invalid, close 1008; the shop still serves",
    ) as row:
        settings = MerchantSettings(data_dir=tmp_path, cookie_secret=b"c" * 32)
        app = create_app(settings, settlement=FakeSettlement())
        codes: list[str] = []
        async with serve_app(app) as shop:
            url = shop.replace("http", "ws") + "/reader"
            hello = {
                "type": "hello",
                "versions": [1],
                "agent": "a",
                "reader": "r",
                "card": {"present": True},
                "token": "t" * 43,
            }
            for frame in ("{oops", "x" * (1 << 20), json.dumps(hello)):
                async with connect(url, max_size=None) as ws:
                    await ws.send(frame)
                    codes.append(str((await _reply(ws))["code"]))
                    await asyncio.wait_for(ws.wait_closed(), 5)
                    assert ws.close_code == 1008
            async with httpx.AsyncClient(base_url=shop) as http:
                assert (await http.get("/health")).status_code == 200
        await app.state.cashier.close()
        assert codes == ["malformed", "too_large", "token_invalid"]
        row.observed = f"{', '.join(codes)}; closed 1008 each; /health 200"
