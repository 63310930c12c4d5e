"""The settlement client's requests are byte for byte what httpx's ``json=`` sends."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest

from webpurse.merchant.settlement import SettlementClient, _encoded, _IdempotencyKeys

PAYLOADS: list[Any] = [
    {"amount": 1, "currency": "CNY", "description": "bench", "merchant_reference": "c1-0"},
    {"description": '茶 café \u2028 \x00\x1f\x7f \\ " / \t\n', "amount": 2**64 - 1},
    {"requests": [{"path": "/v1/payments", "idempotency_key": None, "body": {"a": [True]}}]},
    {"amount": -(2**63), "metadata": {"k": [1, None, False, "x"]}},
]
NOT_PLAIN: list[Any] = [
    {"amount": 2**64},
    {"amount": -(2**63) - 1},
    {"ratio": 0.1},
    {"big": 1e16},
    {1: "int key"},
    {"tuple": (1, 2)},
    None,
]


def _old_body(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_plain_payloads_encode_as_json_dumps(payload: Any) -> None:
    assert _encoded(payload) == _old_body(payload)


@pytest.mark.parametrize("payload", NOT_PLAIN)
def test_anything_else_goes_by_json_itself(payload: Any) -> None:
    assert _encoded(payload) is None


async def test_requests_on_the_wire_are_unchanged() -> None:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "pay_1", "status": "ok", "amount": 1})

    transport = httpx.MockTransport(record)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = SettlementClient(http, "sk_test")
        for payload in [*PAYLOADS, {"ratio": 0.5}]:
            headers = {"Authorization": "Bearer sk_test", "Idempotency-Key": "mer-1"}
            await client._send("POST", "/v1/payments", payload, headers)
            await http.post("/v1/payments", json=payload, headers=headers)
    for ours, httpx_s in zip(seen[::2], seen[1::2], strict=True):
        assert ours.method == httpx_s.method and ours.url == httpx_s.url
        assert ours.headers.raw == httpx_s.headers.raw
        assert ours.content == httpx_s.content


def test_idempotency_keys_look_like_token_hex_and_do_not_repeat() -> None:
    keys = _IdempotencyKeys()
    drawn = [keys() for _ in range(1000)]
    assert len(set(drawn)) == len(drawn)
    for key in drawn:
        assert key.startswith("mer-") and len(key) == 36
        int(key[4:], 16)


def test_a_forked_child_draws_its_own_keys() -> None:
    keys = _IdempotencyKeys()
    keys()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next key must not be the parent's next one
        os.write(write, keys().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child != keys()
