"""Webhooks: signatures a merchant can check on its own, at-least-once delivery with backoff,
a delivery log, events listed for replay, and each merchant seeing only its own."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text

from tests.asgi import AppClient
from tests.settlement.wc_support import (
    MERCHANT_A,
    MERCHANT_B,
    Receiver,
    Stack,
    database_url,
    settlement_stack,
)
from webpurse.settlement import webhooks
from webpurse.settlement.routes_webhooks import secret_box_for
from webpurse.settlement.webhooks import (
    InvalidSignatureError,
    InvalidTimestampError,
    MissingHeaderError,
    RetryPolicy,
    WebhookMessage,
    deliver_due,
    enqueue_event,
    sign,
    verify,
)

START = dt.datetime(2026, 11, 26, 2, 0, tzinfo=dt.UTC)
SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def independent_signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """The Standard Webhooks signature computed from the spec alone (not our module)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def independent_verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    expected = independent_signature(
        secret, headers["webhook-id"], headers["webhook-timestamp"], body
    )
    return any(
        hmac.compare_digest(candidate, expected)
        for candidate in headers["webhook-signature"].split()
    )


# --- signing (pure) -----------------------------------------------------------------


def test_signature_matches_an_independent_implementation() -> None:
    body = b'{"id":"evt_1","type":"payment.succeeded"}'
    assert sign(SECRET, "evt_1", 1_764_000_000, body) == independent_signature(
        SECRET, "evt_1", "1764000000", body
    )


def test_verify_accepts_a_genuine_delivery_with_any_header_case() -> None:
    body = b'{"a":1}'
    headers = {
        "Webhook-Id": "evt_1",
        "WEBHOOK-TIMESTAMP": "1764000000",
        "webhook-signature": independent_signature(SECRET, "evt_1", "1764000000", body),
    }
    verify(SECRET, headers, body, now=1_764_000_100)


def test_verify_accepts_any_signature_of_a_rotation_list() -> None:
    body = b"{}"
    old = "whsec_" + base64.b64encode(b"o" * 32).decode()
    headers = {
        "webhook-id": "evt_2",
        "webhook-timestamp": "1764000000",
        "webhook-signature": " ".join(
            [
                independent_signature(old, "evt_2", "1764000000", body),
                independent_signature(SECRET, "evt_2", "1764000000", body),
            ]
        ),
    }
    verify(SECRET, headers, body, now=dt.datetime.fromtimestamp(1_764_000_000, dt.UTC))


@pytest.mark.parametrize("skew", [301, -301, 86_400])
def test_verify_rejects_stale_or_future_timestamps(skew: int) -> None:
    body = b"{}"
    ts = 1_764_000_000
    headers = {
        "webhook-id": "evt_3",
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(SECRET, "evt_3", ts, body),
    }
    with pytest.raises(InvalidTimestampError):
        verify(SECRET, headers, body, now=ts + skew)
    verify(SECRET, headers, body, now=ts + (300 if skew > 0 else -300))  # at the edge: fine


def test_verify_rejects_forged_and_tampered_deliveries() -> None:
    body = b'{"amount":100}'
    ts = 1_764_000_000
    forged_with = "whsec_" + base64.b64encode(b"x" * 32).decode()
    good = {"webhook-id": "evt_4", "webhook-timestamp": str(ts)}
    cases = [
        ({**good, "webhook-signature": sign(forged_with, "evt_4", ts, body)}, body),
        ({**good, "webhook-signature": sign(SECRET, "evt_4", ts, body)}, b'{"amount":999}'),
        ({**good, "webhook-signature": sign(SECRET, "evt_5", ts, body)}, body),
        ({**good, "webhook-signature": "v1,not-base64!"}, body),
        ({**good, "webhook-signature": "v2," + sign(SECRET, "evt_4", ts, body)[3:]}, body),
    ]
    for headers, received in cases:
        with pytest.raises(InvalidSignatureError):
            verify(SECRET, headers, received, now=ts)


def test_verify_names_a_missing_header() -> None:
    with pytest.raises(MissingHeaderError, match="webhook-signature"):
        verify(SECRET, {"webhook-id": "evt_1", "webhook-timestamp": "1"}, b"", now=1)
    with pytest.raises(InvalidTimestampError):
        verify(
            SECRET,
            {"webhook-id": "e", "webhook-timestamp": "soon", "webhook-signature": "v1,x"},
            b"",
            now=1,
        )


# --- the retry schedule (pure) -------------------------------------------------------


def test_backoff_grows_exponentially_with_bounded_jitter_and_a_cap() -> None:
    policy = RetryPolicy()
    low = [policy.next_delay(n, 0.0).total_seconds() for n in range(1, 16)]
    high = [policy.next_delay(n, 0.999999).total_seconds() for n in range(1, 16)]
    assert low[:4] == pytest.approx([4, 8, 16, 32])
    assert high[:4] == pytest.approx([6, 12, 24, 48], rel=1e-5)
    assert max(high) <= 6 * 3600 * 1.2 + 1e-6
    assert low[-1] == pytest.approx(6 * 3600 * 0.8)


def test_backoff_gives_up_after_three_days() -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    created = START
    now = START
    attempts = 0
    while True:
        attempts += 1
        at = policy.next_attempt_at(created, now, attempts, rng.random())
        if at is None:
            break
        assert at > now
        now = at
    assert now - created <= dt.timedelta(days=3)
    assert now - created > dt.timedelta(days=2)
    assert 15 < attempts < 40


# --- delivery through a real HTTP receiver ----------------------------------------


@pytest.fixture
def stack(migrated_db_url: str) -> Iterator[Stack]:
    with settlement_stack(migrated_db_url, START) as built:
        yield built


@pytest.fixture
def client(stack: Stack) -> Iterator[AppClient]:
    with AppClient(stack.app) as test_client:
        yield test_client


def register(client: AppClient, stack: Stack, url: str, events: list[str]) -> dict[str, str]:
    response = client.post(
        "/v1/webhook_endpoints", json={"url": url, "events": events}, headers=stack.auth(MERCHANT_A)
    )
    assert response.status_code == 201, response.text
    body: dict[str, str] = response.json()
    assert body["secret"].startswith("whsec_")
    return body


def payment_event(stack: Stack, event_type: str = "payment.succeeded", amount: int = 1234) -> str:
    payment = {"id": "pay_test1", "object": "payment", "status": "succeeded", "amount": amount}
    with stack.session_factory() as session, session.begin():
        return enqueue_event(session, MERCHANT_A, event_type, payment, now=stack.clock())


async def deliver(stack: Stack, http: httpx.AsyncClient) -> webhooks.DeliveryReport:
    return await deliver_due(
        stack.session_factory,
        http,
        stack.clock(),
        secret_box=secret_box_for(stack.settings),
        rng=random.Random(1),
        allow_private=stack.settings.webhook_allow_private,
    )


async def test_failed_delivery_is_retried_with_backoff_then_succeeds(
    stack: Stack, client: AppClient
) -> None:
    with Receiver([500]) as receiver:
        endpoint = register(client, stack, receiver.url, ["payment.*"])
        event_id = payment_event(stack)
        async with httpx.AsyncClient() as http:
            first = await deliver(stack, http)
            assert (first.attempted, first.retrying, first.succeeded) == (1, 1, 0)
            with stack.session_factory() as session:
                message = session.scalars(select(WebhookMessage)).one()
                assert message.status == "pending"
                assert message.last_status_code == 500
                wait = message.next_attempt_at - stack.clock()  # type: ignore[operator]
            assert dt.timedelta(seconds=4) <= wait <= dt.timedelta(seconds=6)

            stack.clock.advance(wait - dt.timedelta(seconds=1))
            early = await deliver(stack, http)
            assert early.attempted == 0  # not due yet: backoff is respected

            stack.clock.advance(dt.timedelta(seconds=1))
            second = await deliver(stack, http)
            assert (second.attempted, second.succeeded) == (1, 1)
            assert (await deliver(stack, http)).attempted == 0  # delivered: never sent again

        got = receiver.wait_for(2)
    assert len(got) == 2
    assert got[0].body == got[1].body
    assert got[0].headers["webhook-id"] == got[1].headers["webhook-id"] == event_id
    for delivery in got:
        assert independent_verify(endpoint["secret"], delivery.headers, delivery.body)
    body = json.loads(got[1].body)
    assert body["id"] == event_id
    assert body["type"] == "payment.succeeded"
    assert body["data"]["object"]["amount"] == 1234
    assert int(got[1].headers["webhook-timestamp"]) == int(stack.clock().timestamp())

    detail = client.get(f"/v1/events/{event_id}", headers=stack.auth(MERCHANT_A)).json()
    (delivery,) = detail["deliveries"]
    assert delivery["status"] == "succeeded"
    assert delivery["attempts"] == 2
    assert [a["status_code"] for a in delivery["log"]] == [500, 200]
    assert [a["succeeded"] for a in delivery["log"]] == [False, True]
    assert delivery["log"][0]["error"] == "HTTP 500"
    assert all(a["duration_ms"] >= 0 for a in delivery["log"])


async def test_unreachable_endpoint_is_given_up_after_the_window_and_can_be_replayed(
    stack: Stack, client: AppClient
) -> None:
    with Receiver([]) as receiver:
        endpoint = register(client, stack, receiver.url, ["payment.succeeded"])
        # Point the endpoint at a port where nobody listens: connection refused.
        closed = Receiver([])
        dead_url = closed.url
        closed.server.server_close()
        with stack.session_factory() as session, session.begin():
            session.get(webhooks.WebhookEndpoint, endpoint["id"]).url = dead_url  # type: ignore[union-attr]
        event_id = payment_event(stack)
        async with httpx.AsyncClient() as http:
            attempts = 0
            while True:
                report = await deliver(stack, http)
                attempts += report.attempted
                if report.failed:
                    break
                with stack.session_factory() as session:
                    message = session.scalars(select(WebhookMessage)).one()
                    assert message.next_attempt_at is not None
                    stack.clock.now = message.next_attempt_at
                assert attempts < 60
            assert stack.clock() - START <= dt.timedelta(days=3)

            pending = client.get(
                "/v1/events", params={"delivery_status": "failed"}, headers=stack.auth(MERCHANT_A)
            ).json()
            assert [e["id"] for e in pending["data"]] == [event_id]
            assert pending["data"][0]["deliveries"][0]["attempts"] == attempts
            assert "ConnectError" in pending["data"][0]["deliveries"][0]["last_error"]

            # The merchant fixes its endpoint and asks for a replay.
            with stack.session_factory() as session, session.begin():
                session.get(webhooks.WebhookEndpoint, endpoint["id"]).url = receiver.url  # type: ignore[union-attr]
            replay = client.post(f"/v1/events/{event_id}/redeliver", headers=stack.auth(MERCHANT_A))
            assert replay.status_code == 200
            assert replay.json()["deliveries"][0]["status"] == "pending"
            assert (await deliver(stack, http)).succeeded == 1
        (got,) = receiver.wait_for(1)
    assert independent_verify(endpoint["secret"], got.headers, got.body)
    assert got.headers["webhook-id"] == event_id


async def test_events_are_listed_for_replay_and_polling(stack: Stack, client: AppClient) -> None:
    with Receiver([]) as receiver:
        register(client, stack, receiver.url, ["load.*"])
        ids = []
        for event_type in ("payment.succeeded", "payment.failed", "load.succeeded"):
            ids.append(payment_event(stack, event_type))
            stack.clock.advance(dt.timedelta(seconds=1))
        auth = stack.auth(MERCHANT_A)
        listed = client.get("/v1/events", headers=auth).json()
        assert [e["id"] for e in listed["data"]] == ids[::-1]  # newest first
        # Only the load event had a subscribed endpoint; the others are there to poll.
        assert [len(e["deliveries"]) for e in listed["data"]] == [1, 0, 0]
        undelivered = client.get(
            "/v1/events", params={"delivery_status": "pending"}, headers=auth
        ).json()
        assert [e["id"] for e in undelivered["data"]] == [ids[2]]
        typed = client.get("/v1/events", params={"type": "payment.failed"}, headers=auth).json()
        assert [e["id"] for e in typed["data"]] == [ids[1]]
        page1 = client.get("/v1/events", params={"limit": 2}, headers=auth).json()
        assert page1["has_more"] is True
        page2 = client.get(
            "/v1/events",
            params={"limit": 2, "starting_after": page1["data"][-1]["id"]},
            headers=auth,
        ).json()
        assert [e["id"] for e in page1["data"] + page2["data"]] == ids[::-1]
        assert page2["has_more"] is False
        bad = client.get("/v1/events", params={"type": "nonsense"}, headers=auth)
        assert bad.status_code == 400
        assert bad.json()["code"] == "invalid_event_type"

        async with httpx.AsyncClient() as http:
            assert (await deliver(stack, http)).succeeded == 1
        (got,) = receiver.wait_for(1)
        assert json.loads(got.body)["type"] == "load.succeeded"


def test_each_merchant_sees_only_its_own_and_secrets_are_not_returned_or_stored_in_clear(
    stack: Stack, client: AppClient
) -> None:
    endpoint = register(client, stack, "https://shop.example/hooks", ["*"])
    event_id = payment_event(stack)
    mine = client.get("/v1/webhook_endpoints", headers=stack.auth(MERCHANT_A)).json()
    assert [e["id"] for e in mine["data"]] == [endpoint["id"]]
    assert "secret" not in mine["data"][0]
    got = client.get(f"/v1/webhook_endpoints/{endpoint['id']}", headers=stack.auth(MERCHANT_A))
    assert "secret" not in got.json()

    other = stack.auth(MERCHANT_B)
    assert client.get("/v1/webhook_endpoints", headers=other).json()["data"] == []
    assert client.get("/v1/events", headers=other).json()["data"] == []
    for method, path in (
        ("GET", f"/v1/events/{event_id}"),
        ("POST", f"/v1/events/{event_id}/redeliver"),
        ("GET", f"/v1/webhook_endpoints/{endpoint['id']}"),
        ("DELETE", f"/v1/webhook_endpoints/{endpoint['id']}"),
    ):
        response = client.request(method, path, headers=other)
        assert response.status_code == 404, (method, path)
        assert response.json()["code"] == "resource_missing"
    assert client.get("/v1/events").status_code == 401
    assert client.get("/v1/events", headers=stack.auth("operator")).status_code == 403

    with stack.engine.connect() as connection:
        dump = " ".join(
            str(row) for row in connection.execute(text("SELECT * FROM webhook_endpoints"))
        )
    secret_b64 = endpoint["secret"].removeprefix("whsec_")
    assert secret_b64 not in dump


def test_bad_registrations_are_refused_and_change_nothing(stack: Stack, client: AppClient) -> None:
    auth = stack.auth(MERCHANT_A)
    for body, param in (
        ({"url": "ftp://shop.example/x", "events": ["*"]}, "url"),
        ({"url": "https://user:pw@shop.example/x", "events": ["*"]}, "url"),
        ({"url": "https://shop.example/x", "events": []}, "events"),
        ({"url": "https://shop.example/x", "events": ["payment.nope!"]}, "events"),
        ({"url": "https://shop.example/x", "events": ["*"], "extra": 1}, "extra"),
    ):
        response = client.post("/v1/webhook_endpoints", json=body, headers=auth)
        assert response.status_code == 422, body
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["param"] == param
    assert client.get("/v1/webhook_endpoints", headers=auth).json()["data"] == []


async def test_deleting_an_endpoint_cancels_its_pending_deliveries(
    stack: Stack, client: AppClient
) -> None:
    endpoint = register(client, stack, "http://127.0.0.1:9/never", ["payment.*"])
    event_id = payment_event(stack)
    deleted = client.delete(
        f"/v1/webhook_endpoints/{endpoint['id']}", headers=stack.auth(MERCHANT_A)
    )
    assert deleted.json() == {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}
    async with httpx.AsyncClient() as http:
        assert (await deliver(stack, http)).attempted == 0
    event = client.get(f"/v1/events/{event_id}", headers=stack.auth(MERCHANT_A)).json()
    assert event["deliveries"][0]["status"] == "canceled"
    assert client.get("/v1/webhook_endpoints", headers=stack.auth(MERCHANT_A)).json()["data"] == []


def test_an_event_is_recorded_only_if_the_callers_transaction_commits(stack: Stack) -> None:
    with stack.session_factory() as session:
        session.begin()
        enqueue_event(session, MERCHANT_A, "payment.succeeded", {"id": "pay_x"}, now=START)
        session.rollback()
    with stack.session_factory() as session:
        assert session.scalars(select(webhooks.WebhookEvent)).all() == []
    with stack.session_factory() as session, pytest.raises(webhooks.WebhookError):
        enqueue_event(session, MERCHANT_A, "wire.sent", {"id": "x"}, now=START)


def test_the_app_lifespan_worker_delivers_by_itself(tmp_path: Path) -> None:
    with (
        database_url("sqlite", tmp_path) as url,
        settlement_stack(url, START, webhook_worker=True, real_clock=True) as stack,
        Receiver([]) as receiver,
        AppClient(stack.app) as client,
    ):
        endpoint = register(client, stack, receiver.url, ["payment.succeeded"])
        with stack.session_factory() as session, session.begin():
            event_id = enqueue_event(session, MERCHANT_A, "payment.succeeded", {"id": "pay_w"})
        (got,) = receiver.wait_for(1)
        assert got.headers["webhook-id"] == event_id
        verify(endpoint["secret"], got.headers, got.body, now=dt.datetime.now(dt.UTC))


async def test_an_unreadable_endpoint_secret_fails_its_message_and_delivers_the_rest(
    stack: Stack, client: AppClient
) -> None:
    with Receiver([200]) as good, Receiver([200]) as damaged:
        register(client, stack, good.url, ["payment.*"])
        broken = register(client, stack, damaged.url, ["payment.*"])
        with stack.session_factory() as session, session.begin():
            endpoint = session.get(webhooks.WebhookEndpoint, broken["id"])
            assert endpoint is not None
            endpoint.secret_sealed = "v1:" + "A" * 60  # sealed under another key, say
        payment_event(stack)
        async with httpx.AsyncClient() as http:
            report = await deliver(stack, http)
        assert report.succeeded == 1
        assert len(good.wait_for(1)) == 1
        with stack.session_factory() as session:
            statuses = {
                m.endpoint_id: (m.status, m.last_error)
                for m in session.scalars(select(WebhookMessage))
            }
    assert statuses[broken["id"]] == ("failed", "endpoint secret cannot be opened")


# --- delivery targets: no webhooks to private addresses (SSRF) -----------------------


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("not-an-address", False),
    ],
)
def test_only_public_addresses_are_webhook_targets(address: str, allowed: bool) -> None:
    assert webhooks.address_allowed(address) is allowed


@pytest.fixture
def strict(migrated_db_url: str) -> Iterator[Stack]:
    """A stack as in production: private webhook targets not allowed."""
    with settlement_stack(migrated_db_url, START, allow_private=False) as built:
        yield built


def test_registering_a_private_url_is_refused_unless_the_operator_allows_it(
    strict: Stack,
) -> None:
    with AppClient(strict.app) as client:
        auth = strict.auth(MERCHANT_A)
        for url in (
            "http://127.0.0.1:8080/hooks",
            "http://10.0.0.5/hooks",
            "http://169.254.169.254/latest/meta-data",
            "https://[::1]/hooks",
            "http://[::ffff:127.0.0.1]/hooks",
            "http://localhost:8080/hooks",
            "http://0.0.0.0/hooks",
        ):
            response = client.post(
                "/v1/webhook_endpoints", json={"url": url, "events": ["*"]}, headers=auth
            )
            assert response.status_code == 422, url
            problem = response.json()
            assert problem["code"] == "webhook_url_not_allowed", url
            assert problem["param"] == "url"
        for url in ("http://xn--/hooks", "http://shop.example:99999/hooks"):
            response = client.post(
                "/v1/webhook_endpoints", json={"url": url, "events": ["*"]}, headers=auth
            )
            assert response.status_code == 422, url
            assert response.json()["param"] == "url", url  # not a URL delivery could use
        assert client.get("/v1/webhook_endpoints", headers=auth).json()["data"] == []
        # Public addresses, and names that do not resolve yet (checked again at delivery).
        for url in ("https://93.184.215.14/hooks", "https://shop.example/hooks"):
            response = client.post(
                "/v1/webhook_endpoints", json={"url": url, "events": ["*"]}, headers=auth
            )
            assert response.status_code == 201, (url, response.text)
    # WEBPURSE_WEBHOOK_ALLOW_PRIVATE=1: the operator allows them (the demo, these tests).
    state = strict.app.state.settlement
    state.settings = dataclasses.replace(state.settings, webhook_allow_private=True)
    with AppClient(strict.app) as client:
        response = client.post(
            "/v1/webhook_endpoints",
            json={"url": "http://127.0.0.1:8080/hooks", "events": ["*"]},
            headers=strict.auth(MERCHANT_A),
        )
        assert response.status_code == 201


def test_the_operator_setting_comes_from_the_environment() -> None:
    from webpurse.settlement.settings import Settings

    assert Settings.from_env({}).webhook_allow_private is False
    assert Settings.from_env({"WEBPURSE_WEBHOOK_ALLOW_PRIVATE": "1"}).webhook_allow_private
    assert not Settings.from_env({"WEBPURSE_WEBHOOK_ALLOW_PRIVATE": "0"}).webhook_allow_private


async def test_a_name_that_resolves_to_a_private_address_at_delivery_is_not_sent_to(
    strict: Stack,
) -> None:
    """DNS rebinding: the name was public (or unresolvable) at registration, private now."""
    with AppClient(strict.app) as client:
        response = client.post(
            "/v1/webhook_endpoints",
            json={"url": "https://hooks.shop.example:8443/webpurse?x=1", "events": ["*"]},
            headers=strict.auth(MERCHANT_A),
        )
    assert response.status_code == 201, response.text
    event_id = payment_event(strict)
    sent: list[httpx.Request] = []

    def receive(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    answers = {"hooks.shop.example": ["169.254.169.254"]}

    def resolver(host: str, port: int) -> list[str]:
        assert port == 8443
        return answers[host]

    async def deliver_strict(http: httpx.AsyncClient) -> webhooks.DeliveryReport:
        return await deliver_due(
            strict.session_factory,
            http,
            strict.clock(),
            secret_box=secret_box_for(strict.settings),
            rng=random.Random(1),
            resolver=resolver,
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as http:
        refused = await deliver_strict(http)
        assert (refused.attempted, refused.retrying, refused.succeeded) == (1, 1, 0)
        assert sent == []
        with strict.session_factory() as session:
            message = session.scalars(select(WebhookMessage)).one()
            assert message.status == "pending"
            assert message.last_error is not None
            assert message.last_error.startswith("webhook_url_not_allowed")
            assert "169.254.169.254" in message.last_error
            assert message.next_attempt_at is not None
            strict.clock.now = message.next_attempt_at

        # One public and one private answer: still refused (the client could pick either).
        answers["hooks.shop.example"] = ["93.184.215.14", "10.0.0.7"]
        assert (await deliver_strict(http)).retrying == 1
        assert sent == []
        with strict.session_factory() as session:
            message = session.scalars(select(WebhookMessage)).one()
            assert message.next_attempt_at is not None
            strict.clock.now = message.next_attempt_at

        # Public again: sent to the address that was checked, under the URL's name.
        answers["hooks.shop.example"] = ["93.184.215.14"]
        assert (await deliver_strict(http)).succeeded == 1
    (request,) = sent
    assert request.url.host == "93.184.215.14"
    assert (request.url.port, request.url.path, request.url.query) == (8443, "/webpurse", b"x=1")
    assert request.headers["host"] == "hooks.shop.example:8443"
    assert request.extensions["sni_hostname"] == "hooks.shop.example"
    assert request.headers["webhook-id"] == event_id
    with AppClient(strict.app) as client:
        detail = client.get(f"/v1/events/{event_id}", headers=strict.auth(MERCHANT_A))
    log = detail.json()["deliveries"][0]["log"]
    assert [a["succeeded"] for a in log] == [False, False, True]
    assert log[0]["status_code"] is None and "not a public address" in log[0]["error"]


# --- retention of the delivery log ---------------------------------------------------


async def test_the_sweep_forgets_deliveries_older_than_the_retention(
    stack: Stack, client: AppClient
) -> None:
    from webpurse.settlement.expiry import expire_stale

    outcomes = {"good": 200, "down": 503}

    def receive(request: httpx.Request) -> httpx.Response:
        return httpx.Response(outcomes[request.url.path.strip("/")])

    register(client, stack, "http://127.0.0.1:9/good", ["payment.succeeded"])
    register(client, stack, "http://127.0.0.1:9/down", ["payment.failed"])
    old_delivered = payment_event(stack, "payment.succeeded")
    old_failing = payment_event(stack, "payment.failed")
    async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as http:
        assert (await deliver(stack, http)).succeeded == 1
        stack.clock.advance(dt.timedelta(days=20))
        recent_delivered = payment_event(stack, "payment.succeeded")
        assert (await deliver(stack, http)).succeeded == 1

    def sweep(at: dt.datetime) -> None:
        with stack.session_factory() as session, session.begin():
            expire_stale(
                session,
                at,
                requires_card_ttl=dt.timedelta(minutes=30),
                authorised_ttl=dt.timedelta(minutes=2),
            )

    def kept() -> tuple[set[str], set[str], int]:
        with stack.session_factory() as session:
            events = set(session.scalars(select(webhooks.WebhookEvent.id)))
            messages = set(session.scalars(select(WebhookMessage.event_id)))
            attempts = len(session.scalars(select(webhooks.WebhookAttempt.id)).all())
        return events, messages, attempts

    everything = {old_delivered, old_failing, recent_delivered}
    before = kept()
    sweep(START + webhooks.DELIVERY_RETENTION - dt.timedelta(minutes=1))
    assert kept() == before  # nothing is old enough yet
    assert before[0] == before[1] == everything

    sweep(START + webhooks.DELIVERY_RETENTION + dt.timedelta(minutes=1))
    events, messages, attempts = kept()
    # The old delivered event, its message and its attempt are gone; the undelivered one
    # (the merchant may still redeliver it) and the recent delivery stay, log included.
    assert events == messages == {old_failing, recent_delivered}
    assert attempts == before[2] - 1
    listed = client.get("/v1/events", headers=stack.auth(MERCHANT_A)).json()["data"]
    assert {e["id"] for e in listed} == {old_failing, recent_delivered}


# --- slow endpoints: a total deadline, a per-endpoint bound ----------------------------


async def test_an_attempt_has_a_total_deadline_not_a_per_read_timeout(
    stack: Stack, client: AppClient
) -> None:
    """A receiver sending its status line one byte every 0.2 s never trips httpx's per-read
    timeout; the attempt's deadline ends it all the same, as a retried failure."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            for byte in b"HTTP/1.1 200 OK\r\n" * 100:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)  # the slow receiver itself
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    register(client, stack, f"http://127.0.0.1:{port}/hook", ["payment.*"])
    payment_event(stack)
    try:
        async with httpx.AsyncClient() as http:
            started = time.monotonic()
            report = await deliver_due(
                stack.session_factory,
                http,
                stack.clock(),
                secret_box=secret_box_for(stack.settings),
                rng=random.Random(1),
                allow_private=True,
                timeout=1.0,
            )
            took = time.monotonic() - started
    finally:
        server.close()
    assert (report.attempted, report.retrying) == (1, 1)
    assert took < 5
    with stack.session_factory() as session:
        message = session.scalars(select(WebhookMessage)).one()
        assert message.status == "pending"
        assert message.last_error is not None and message.last_error.startswith("deadline")


async def test_a_claim_takes_at_most_per_endpoint_messages_of_one_endpoint(
    stack: Stack, client: AppClient
) -> None:
    busy = register(client, stack, "http://127.0.0.1:9/busy", ["payment.*"])
    for _ in range(5):
        payment_event(stack)
    box = secret_box_for(stack.settings)
    jobs, _ = webhooks._claim_due(
        stack.session_factory, stack.clock(), box, 50, dt.timedelta(minutes=2), {}, 2
    )
    assert [job.endpoint_id for job in jobs] == [busy["id"]] * 2
    # with both still in flight, the endpoint gets nothing more
    more, _ = webhooks._claim_due(
        stack.session_factory, stack.clock(), box, 50, dt.timedelta(minutes=2), {busy["id"]: 2}, 2
    )
    assert more == []
