"""The agent's loopback pairing endpoint, served by real uvicorn, paired with a real merchant
server (the hub mounted in a FastAPI app, also on uvicorn)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from tests.card.support import make_card
from tests.reader.remote_support import ConsentRecorder, merchant_app, serve
from webpurse.agent.pairing import create_pairing_app
from webpurse.agent.terminal import TerminalAgent
from webpurse.reader.messages import Outcome
from webpurse.reader.remote import ReaderHub
from webpurse.reader.sim import SimReader


@dataclass
class Stack:
    hub: ReaderHub
    merchant: str  # the merchant's origin, e.g. http://127.0.0.1:1234
    agent: TerminalAgent
    pairing_url: str
    client: httpx.AsyncClient


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    hub = ReaderHub()
    agent = TerminalAgent(SimReader(make_card()), consent=ConsentRecorder(), show=lambda _: None)
    async with serve(merchant_app(hub)) as merchant:
        app = create_pairing_app(agent, allowed_origins=[merchant + "/"])
        async with serve(app) as pairing, httpx.AsyncClient(timeout=10) as client:
            try:
                yield Stack(hub, merchant, agent, pairing, client)
            finally:
                await agent.close()
                await hub.close()


async def _pair(stack: Stack, body: object, origin: str | None, **headers: str) -> httpx.Response:
    if origin is not None:
        headers["Origin"] = origin
    return await stack.client.post(f"{stack.pairing_url}/pair", json=body, headers=headers)


async def test_the_page_pairs_the_agent_with_its_own_origin(stack: Stack) -> None:
    pairing = stack.hub.issue("pay_1", display="Order 42")
    body = {"token": pairing.token, "server": f"{stack.merchant}/reader"}

    response = await _pair(stack, body, stack.merchant)

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "paired" and response.json()["merchant"] == "Order 42"
    assert response.headers["access-control-allow-origin"] == stack.merchant
    reader = await stack.hub.wait_for_reader("pay_1", 5)
    assert response.json()["session"] == reader.session
    await reader.wait_for_card(5)


async def test_a_reused_token_is_refused_through_the_agent(stack: Stack) -> None:
    pairing = stack.hub.issue("pay_2")
    body = {"token": pairing.token, "server": f"{stack.merchant}/reader"}
    assert (await _pair(stack, body, stack.merchant)).status_code == 200
    reader = await stack.hub.wait_for_reader("pay_2", 5)
    await reader.end(Outcome.CANCELED)
    await stack.agent.wait_session()

    again = await _pair(stack, body, stack.merchant)

    assert again.status_code == 403 and again.json()["code"] == "token_invalid"
    assert again.headers["content-type"] == "application/problem+json"


async def test_a_wrong_or_missing_origin_is_refused_without_cors(stack: Stack) -> None:
    pairing = stack.hub.issue("pay_3")
    body = {"token": pairing.token, "server": f"{stack.merchant}/reader"}
    for origin in ("https://evil.example", "null", None, stack.merchant + ".evil.example"):
        response = await _pair(stack, body, origin)
        assert response.status_code == 403 and response.json()["code"] == "origin_not_allowed"
        assert "access-control-allow-origin" not in response.headers
    # The token was never used: the right page can still pair with it.
    assert (await _pair(stack, body, stack.merchant)).status_code == 200


async def test_the_agent_dials_only_the_pages_origin(stack: Stack) -> None:
    pairing = stack.hub.issue("pay_4")
    for server in ("https://elsewhere.example/reader", stack.merchant.replace("http", "https")):
        response = await _pair(stack, {"token": pairing.token, "server": server}, stack.merchant)
        assert response.status_code == 400 and response.json()["code"] == "server_origin_mismatch"
    assert stack.hub.reader_for("pay_4") is None


async def test_preflight_answers_only_allowed_origins(stack: Stack) -> None:
    headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
        "Access-Control-Request-Private-Network": "true",
    }
    ok = await stack.client.options(
        f"{stack.pairing_url}/pair", headers=headers | {"Origin": stack.merchant}
    )
    bad = await stack.client.options(
        f"{stack.pairing_url}/pair", headers=headers | {"Origin": "https://evil.example"}
    )
    assert ok.status_code == 204
    assert ok.headers["access-control-allow-origin"] == stack.merchant
    assert ok.headers["access-control-allow-private-network"] == "true"
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        {"token": "short", "server": "http://x"},
        {"token": "a" * 43},
        {"token": "a" * 43, "server": "ftp://127.0.0.1/reader"},
        {"token": "a b" * 20, "server": "http://127.0.0.1/reader"},
        {"token": "a" * 43, "server": "http://127.0.0.1/" + "x" * 5000},
    ],
)
async def test_bad_requests_are_refused(stack: Stack, body: object) -> None:
    response = await _pair(stack, body, stack.merchant)
    assert response.status_code == 400 and response.json()["code"] == "bad_request"
    assert not stack.agent.busy


async def test_a_dns_rebound_host_is_refused(stack: Stack) -> None:
    pairing = stack.hub.issue("pay_5")
    body = {"token": pairing.token, "server": f"{stack.merchant}/reader"}
    response = await _pair(stack, body, stack.merchant, Host="evil.example")
    assert response.status_code == 421 and response.json()["code"] == "bad_host"


async def test_one_session_at_a_time(stack: Stack) -> None:
    first, second = stack.hub.issue("pay_6"), stack.hub.issue("pay_7")
    server = f"{stack.merchant}/reader"
    assert (await _pair(stack, {"token": first.token, "server": server}, stack.merchant)).is_success
    busy = await _pair(stack, {"token": second.token, "server": server}, stack.merchant)
    assert busy.status_code == 409 and busy.json()["code"] == "busy"


async def test_status_tells_an_allowed_page_the_agent_is_there(stack: Stack) -> None:
    ok = await stack.client.get(f"{stack.pairing_url}/status", headers={"Origin": stack.merchant})
    bad = await stack.client.get(f"{stack.pairing_url}/status")
    assert ok.json()["busy"] is False and ok.json()["agent"].startswith("webpurse-agent/")
    assert bad.status_code == 403
