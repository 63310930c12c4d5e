"""Attacks over HTTP: API keys, webhooks, and hostile bodies at settlement and at the shop.

- settlement (its app over a migrated SQLite database, in process; one case through a real
  uvicorn process): a missing, forged, revoked or misplaced API key is 401/403/404 and
  creates nothing; huge, deeply nested, non-JSON, non-UTF-8, wrongly typed and out-of-range
  bodies are 4xx problem+json with a specific code, logged, and create nothing;
- the shop (``webpurse.merchant``, with the in-memory settlement double of its own tests): a
  forged, stale, replayed or malformed webhook changes no order; hostile form bodies are 4xx
  and logged; nothing answers 5xx.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import func, select, update

from tests.merchant.conftest import make_card
from tests.merchant.fakes import FakeSettlement
from tests.proof.conftest import Proof
from tests.settlement.support import World, live_server, make_world
from webpurse.merchant.app import create_app
from webpurse.merchant.orders import Order
from webpurse.merchant.readers import LocalBroker
from webpurse.merchant.settings import MerchantSettings
from webpurse.reader.sim import SimReader
from webpurse.settlement.models import ApiKey, Load, Payment
from webpurse.settlement.webhooks import signed_headers

SUITE = "attacks"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with make_world(f"sqlite:///{tmp_path / 'settlement.db'}") as w:
        yield w


def objects(world: World) -> tuple[int, int]:
    with world.factory() as session:
        return (
            session.scalar(select(func.count()).select_from(Payment)) or 0,
            session.scalar(select(func.count()).select_from(Load)) or 0,
        )


def assert_problem(answer: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json"), answer.headers
    body: dict[str, Any] = answer.json()
    assert body["code"] == code and body["request_id"], body
    return body


def logged(events: list[dict[str, Any]], **fields: Any) -> None:
    if not any(all(e.get(k) == v for k, v in fields.items()) for e in events):
        raise AssertionError(f"no log event with {fields}: {events}")


# --- API keys ------------------------------------------------------------------------


def _key_cases(world: World) -> list[tuple[str, dict[str, str], int, str, dict[str, Any]]]:
    return [
        ("missing API key", {}, 401, "unauthenticated", {"code": "unauthenticated"}),
        (
            "forged API key (well-formed, never issued)",
            {"authorization": "Bearer sk_mer_" + "A" * 43},
            401,
            "unauthenticated",
            {"event": "auth.rejected"},
        ),
        (
            "API key in the wrong scheme (Basic)",
            {"authorization": f"Basic {world.merchant_key}"},
            401,
            "unauthenticated",
            {"code": "unauthenticated"},
        ),
        (
            "operator key on a merchant route",
            world.auth(world.operator_key),
            403,
            "forbidden",
            {"code": "forbidden"},
        ),
    ]


def test_bad_api_keys_create_nothing(world: World, proof: Proof) -> None:
    for label, headers, status, code, log_fields in _key_cases(world):
        with proof.row(
            SUITE,
            f"settlement: {label}",
            expected=f"{status} {code}, logged; no payment created",
        ) as row:
            before = objects(world)
            with structlog.testing.capture_logs() as events:
                answer = world.client.post("/v1/payments", json={"amount": 100}, headers=headers)
            assert_problem(answer, status, code)
            logged(events, **log_fields)
            assert objects(world) == before
            row.observed = f"{status} {code}; payments {before[0]} → {objects(world)[0]}"


def test_a_revoked_key_is_refused(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "settlement: revoked merchant API key",
        expected="401 unauthenticated, logged auth.rejected; no payment created",
    ) as row:
        assert world.terminal.create_payment(100)["status"] == "requires_card"
        with world.factory() as session, session.begin():
            session.execute(
                update(ApiKey)
                .where(ApiKey.merchant_id == world.merchant_id)
                .values(revoked_at=world.clock())
            )
        before = objects(world)
        with structlog.testing.capture_logs() as events:
            answer = world.client.post(
                "/v1/payments", json={"amount": 100}, headers=world.auth(world.merchant_key)
            )
        assert_problem(answer, 401, "unauthenticated")
        logged(events, event="auth.rejected")
        assert objects(world) == before
        row.observed = "401 unauthenticated; nothing created"


def test_another_merchants_key_sees_nothing(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "settlement: merchant B's key on merchant A's payment (read, cancel)",
        expected="404 resource_missing (as if absent); A's payment unchanged",
    ) as row:
        payment = world.terminal.create_payment(100)
        other = world.auth(world.other_key)
        assert_problem(
            world.client.get(f"/v1/payments/{payment['id']}", headers=other),
            404,
            "resource_missing",
        )
        assert_problem(
            world.client.post(f"/v1/payments/{payment['id']}/cancel", json={}, headers=other),
            404,
            "resource_missing",
        )
        mine = world.client.get(
            f"/v1/payments/{payment['id']}", headers=world.auth(world.merchant_key)
        )
        assert mine.json()["status"] == "requires_card"
        row.observed = "404 resource_missing twice; still requires_card"


# --- hostile bodies at settlement -----------------------------------------------------

JSON = {"content-type": "application/json"}

BODIES: list[tuple[str, dict[str, Any], int, str]] = [
    (
        "huge JSON (8 MB description)",
        {"json": {"amount": 1, "description": "x" * 8_000_000}},
        413,
        "payload_too_large",
    ),
    (
        "deeply nested JSON (100k levels)",
        {"content": b"[" * 100_000 + b"]" * 100_000, "headers": JSON},
        400,
        "http_error",
    ),
    ("not JSON at all", {"content": b"amount=100", "headers": JSON}, 422, "validation_error"),
    (
        "wrong content type (text/plain)",
        {"content": b'{"amount": 100}', "headers": {"content-type": "text/plain"}},
        422,
        "validation_error",
    ),
    ("invalid UTF-8", {"content": b'{"amount": 1\xff\xfe}', "headers": JSON}, 400, "http_error"),
    ("a JSON array", {"json": [100]}, 422, "validation_error"),
    ("negative amount", {"json": {"amount": -100}}, 422, "validation_error"),
    ("zero amount", {"json": {"amount": 0}}, 422, "validation_error"),
    ("float amount", {"json": {"amount": 100.5}}, 422, "validation_error"),
    ("integral float amount", {"json": {"amount": 100.0}}, 422, "validation_error"),
    ("string amount", {"json": {"amount": "100"}}, 422, "validation_error"),
    ("boolean amount", {"json": {"amount": True}}, 422, "validation_error"),
    ("amount 2^32", {"json": {"amount": 2**32}}, 422, "validation_error"),
    (
        "amount 10^400",
        {"content": b'{"amount": 1' + b"0" * 400 + b"}", "headers": JSON},
        422,
        "validation_error",
    ),
    ("NaN amount", {"content": b'{"amount": NaN}', "headers": JSON}, 422, "validation_error"),
    ("unknown field", {"json": {"amount": 100, "fee": 0}}, 422, "validation_error"),
    ("other currency", {"json": {"amount": 100, "currency": "USD"}}, 422, "validation_error"),
    (
        "Idempotency-Key of 300 characters",
        {"json": {"amount": 100}, "headers": {"idempotency-key": "k" * 300}},
        400,
        "invalid_idempotency_key",
    ),
]


def test_hostile_bodies_at_settlement_are_4xx_and_create_nothing(
    world: World, proof: Proof
) -> None:
    for label, kwargs, status, code in BODIES:
        with proof.row(
            SUITE,
            f"settlement POST /v1/payments: {label}",
            expected=f"{status} {code} problem+json, logged; nothing created",
        ) as row:
            headers = world.auth(world.merchant_key) | kwargs.pop("headers", {})
            before = objects(world)
            with structlog.testing.capture_logs() as events:
                answer = world.client.post("/v1/payments", headers=headers, **kwargs)
            assert_problem(answer, status, code)
            logged = ("http.invalid", "http.problem", "http.body_too_large")
            assert any(e.get("event") in logged for e in events)
            assert objects(world) == before
            row.observed = f"{answer.status_code} {code}"


CARD_DATA: list[tuple[str, dict[str, Any], int, str]] = [
    ("issuer_data not hex", {"issuer_data": "zz" * 30}, 422, "validation_error"),
    ("issuer_data odd length", {"issuer_data": "0" * 59}, 422, "validation_error"),
    ("issuer_data 29 bytes", {"issuer_data": "00" * 29}, 400, "invalid_issuer_data"),
    ("issuer_data 30 bytes of zeros", {"issuer_data": "00" * 30}, 400, "invalid_issuer_data"),
    (
        "initialize_response 14 bytes",
        {"initialize_response": "00" * 14},
        400,
        "invalid_initialize_response",
    ),
    ("initialize_response 1 KB", {"initialize_response": "00" * 1024}, 422, "validation_error"),
    ("terminal_id 5 bytes", {"terminal_id": "00" * 5}, 422, "validation_error"),
    ("amount above 2^32", {"amount": 2**32 + 1}, 422, "validation_error"),
]


def test_malformed_card_answers_are_refused_and_the_payment_waits(
    world: World, proof: Proof
) -> None:
    card = world.funded_card(1_000)
    payment = world.terminal.create_payment(100)
    issuer, init = world.terminal.purchase_batch1(card, 100)
    honest = {
        "issuer_data": issuer.hex(),
        "initialize_response": init.hex(),
        "terminal_id": world.terminal_id,
    }
    for label, tweak, status, code in CARD_DATA:
        with proof.row(
            SUITE,
            f"settlement authorise: {label}",
            expected=f"{status} {code}, logged; payment still requires_card, no hold",
        ) as row:
            with structlog.testing.capture_logs() as events:
                answer = world.client.post(
                    f"/v1/payments/{payment['id']}/authorise",
                    json=honest | tweak,
                    headers=world.auth(world.merchant_key),
                )
            assert_problem(answer, status, code)
            logged = ("http.invalid", "http.problem", "http.body_too_large")
            assert any(e.get("event") in logged for e in events)
            got = world.client.get(
                f"/v1/payments/{payment['id']}", headers=world.auth(world.merchant_key)
            ).json()
            assert got["status"] == "requires_card" and got["authorisation"] is None
            row.observed = f"{status} {code}; requires_card"


def test_a_real_server_survives_a_flood_of_bad_bodies(tmp_path: Path, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "settlement (real uvicorn): 32 MB body, truncated JSON, 200 bad requests",
        expected="4xx each, never 5xx; the process lives and still pays",
    ) as row:
        url = f"sqlite:///{tmp_path / 'settlement.db'}"
        with (
            live_server(url, tmp_path) as server,
            httpx.Client(base_url=server.base_url, timeout=60) as http,
        ):
            auth = {"authorization": f"Bearer {server.merchant_key}"}
            statuses: set[int] = set()
            big = http.post(
                "/v1/payments",
                content=b'{"amount": 1, "description": "' + b"x" * (32 << 20) + b'"}',
                headers=auth | JSON,
            )
            statuses.add(big.status_code)
            cut = http.post("/v1/payments", content=b'{"amount": 1', headers=auth | JSON)
            statuses.add(cut.status_code)
            for n in range(200):
                bad = http.post("/v1/payments", json={"amount": -n}, headers=auth)
                statuses.add(bad.status_code)
            assert statuses <= {400, 413, 422}, statuses
            assert http.get("/health").status_code == 200
            created = http.post("/v1/payments", json={"amount": 1}, headers=auth)
            assert created.status_code == 201
        row.observed = f"statuses {sorted(statuses)}; healthy; next payment 201"


# --- the shop: webhooks and forms -------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(b"w" * 24).decode()


@pytest.fixture
async def shop(
    tmp_path: Path,
) -> AsyncIterator[tuple[httpx.AsyncClient, Any, FakeSettlement]]:
    settlement = FakeSettlement()
    settings = MerchantSettings(data_dir=tmp_path, cookie_secret=b"c" * 32, webhook_secret=SECRET)
    async with SimReader(make_card(balance=10_000)) as sim:
        app = create_app(settings, settlement=settlement, broker=LocalBroker(sim))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
            yield client, app, settlement
        await app.state.cashier.close()


async def _order(client: httpx.AsyncClient, app: Any) -> Order:
    assert (await client.post("/cart/add", data={"product": "tea"})).status_code == 303
    answer = await client.post("/checkout")
    order_id = answer.headers["location"].split("/")[2]
    order: Order = app.state.orders.get(order_id)
    assert order.status == "pending" and order.settlement_id
    return order


def _event(object_id: str, event_id: str = "evt_attack") -> bytes:
    return json.dumps(
        {"id": event_id, "type": "payment.succeeded", "data": {"object": {"id": object_id}}}
    ).encode()


async def test_forged_stale_and_replayed_webhooks_move_no_order(
    shop: Any, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    client, app, settlement = shop
    order = await _order(client, app)
    body = _event(order.settlement_id)
    now = int(time.time())
    other_secret = "whsec_" + base64.b64encode(b"x" * 24).decode()
    cases = [
        ("forged signature (another secret)", signed_headers(other_secret, "evt_a", now, body)),
        ("stale timestamp (10 minutes old)", signed_headers(SECRET, "evt_a", now - 600, body)),
        (
            "timestamp from the future (10 minutes)",
            signed_headers(SECRET, "evt_a", now + 600, body),
        ),
        ("no signature headers", {}),
        ("signature of another body", signed_headers(SECRET, "evt_a", now, body + b" ")),
    ]
    for label, headers in cases:
        with proof.row(
            SUITE,
            f"shop webhook: {label}",
            expected="400 invalid_signature, logged; order stays pending",
        ) as row:
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="webpurse.merchant.app"):
                answer = await client.post("/webhooks/settlement", content=body, headers=headers)
            assert answer.status_code == 400 and answer.json()["error"] == "invalid_signature"
            assert "rejected a webhook delivery" in caplog.text
            assert app.state.orders.get(order.id).status == "pending"
            row.observed = "400 invalid_signature; pending"

    with proof.row(
        SUITE,
        "shop webhook: 8 MB unsigned JSON body",
        expected="413 payload_too_large before it is read (limit 1 MiB), logged; order "
        "unchanged; shop still answers",
    ) as row:
        caplog.clear()
        huge = b'{"id": "evt_big", "data": {"object": {"id": "' + b"x" * (8 << 20) + b'"}}}'
        answer = await client.post(
            "/webhooks/settlement", content=huge, headers={"content-type": "application/json"}
        )
        assert answer.status_code == 413 and "413 body over" in caplog.text
        assert answer.json()["code"] == "payload_too_large"
        assert app.state.orders.get(order.id).status == "pending"
        assert (await client.get("/health")).status_code == 200
        row.observed = "413 payload_too_large; pending; healthy"

    with proof.row(
        SUITE,
        "shop webhook: genuine 'payment.succeeded' that settlement does not confirm, replayed",
        expected="204 (at-least-once), order re-fetched from settlement: stays pending",
    ) as row:
        headers = signed_headers(SECRET, "evt_b", now, body)
        for _ in range(3):
            answer = await client.post("/webhooks/settlement", content=body, headers=headers)
            assert answer.status_code == 204
        assert settlement.records[order.settlement_id].status == "requires_card"
        assert app.state.orders.get(order.id).status == "pending"
        row.observed = "204 ×3; order pending (settlement says requires_card)"

    with proof.row(
        SUITE,
        "shop webhook: a genuine delivery replayed after the 5-minute window",
        expected="400 invalid_signature (stale), logged; order unchanged",
    ) as row:
        old = signed_headers(SECRET, "evt_c", now - 301, body)
        caplog.clear()
        answer = await client.post("/webhooks/settlement", content=body, headers=old)
        assert answer.status_code == 400 and "rejected a webhook delivery" in caplog.text
        assert app.state.orders.get(order.id).status == "pending"
        row.observed = "400 stale; pending"

    with proof.row(
        SUITE,
        "shop webhook: signed but malformed event body",
        expected="400 malformed_event; order unchanged",
    ) as row:
        junk = b'{"id": 1, "data": []}'
        answer = await client.post(
            "/webhooks/settlement", content=junk, headers=signed_headers(SECRET, "e", now, junk)
        )
        assert answer.status_code == 400 and answer.json()["error"] == "malformed_event"
        assert app.state.orders.get(order.id).status == "pending"
        row.observed = "400 malformed_event"


FORMS: list[tuple[str, str, dict[str, Any]]] = [
    ("cart add: unknown product", "/cart/add", {"data": {"product": "caviar"}}),
    ("cart add: quantity -1", "/cart/add", {"data": {"product": "tea", "quantity": "-1"}}),
    ("cart add: quantity 1.5", "/cart/add", {"data": {"product": "tea", "quantity": "1.5"}}),
    ("cart add: quantity 'ten'", "/cart/add", {"data": {"product": "tea", "quantity": "ten"}}),
    ("cart add: quantity 2^64", "/cart/add", {"data": {"product": "tea", "quantity": str(2**64)}}),
    ("cart add: 1 MB product name", "/cart/add", {"data": {"product": "x" * (1 << 20)}}),
    ("cart add: JSON instead of a form", "/cart/add", {"json": {"product": "tea"}}),
    ("cart update: quantity 21", "/cart/update", {"data": {"product": "tea", "quantity": "21"}}),
    ("top-up: amount not offered", "/topup", {"data": {"amount": "1"}}),
    ("top-up: negative amount", "/topup", {"data": {"amount": "-10000"}}),
    ("top-up: float amount", "/topup", {"data": {"amount": "100.5"}}),
    ("top-up: amount above 2^32", "/topup", {"data": {"amount": str(2**32 + 10000)}}),
    ("top-up: string amount", "/topup", {"data": {"amount": "lots"}}),
    ("top-up: missing amount", "/topup", {"data": {}}),
    (
        "top-up: multipart with a 2 MB file",
        "/topup",
        {"files": {"amount": ("a.bin", b"\0" * (2 << 20))}},
    ),
]


async def test_hostile_forms_at_the_shop_are_refused_and_logged(
    shop: Any, proof: Proof, caplog: pytest.LogCaptureFixture
) -> None:
    client, app, settlement = shop
    for label, path, kwargs in FORMS:
        with proof.row(
            SUITE,
            f"shop POST {path}: {label}",
            expected="4xx (422; 413 for a body over 1 MiB), logged; nothing created",
        ) as row:
            calls = len(settlement.calls)
            orders = len(app.state.orders.for_session("x" * 16))
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="webpurse.merchant.app"):
                answer = await client.post(path, **kwargs)
            assert answer.status_code in (400, 413, 422), (answer.status_code, answer.text[:200])
            assert caplog.records, "the refusal was not logged"
            assert len(settlement.calls) == calls
            assert len(app.state.orders.for_session("x" * 16)) == orders
            assert "wp_cart" not in answer.cookies
            row.observed = f"{answer.status_code}; logged; nothing created"
