"""BatchingSettlementClient: concurrent payment calls coalesce into POST /v1/batch.

Against the real settlement app (in process, SQLite and PostgreSQL) for the happy path,
and against a transport that fails or answers wrongly for the error paths.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.settlement.support import BACKENDS, World, database_url, make_world
from webpurse.merchant.flows import run_transaction
from webpurse.merchant.settlement import (
    BatchingSettlementClient,
    Declined,
    Kind,
    SettlementError,
    batch_size,
)
from webpurse.reader.sim import SimReader
from webpurse.settlement import ledger


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


class Counting(httpx.AsyncBaseTransport):
    """Forwards to the app and counts the requests per path."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await self.inner.handle_async_request(request)


async def test_concurrent_purchases_share_batches_and_all_settle(world: World) -> None:
    cards = [world.funded_card(1_000) for _ in range(12)]
    transport = Counting(httpx.ASGITransport(app=world.client.app))
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = BatchingSettlementClient(http, world.merchant_key, max_in_flight=1)

        async def shop(index: int) -> str:
            async with SimReader(cards[index]) as reader:
                payment = await client.create(
                    Kind.PAYMENT, 100, description="tea", reference=f"o{index}"
                )
                outcome = await run_transaction(reader, client, payment)
                return outcome.status

        statuses = await asyncio.gather(*(shop(i) for i in range(len(cards))))
    assert statuses == ["succeeded"] * len(cards)
    assert set(transport.paths) == {"/v1/batch"}
    # 36 calls (create, authorise, capture × 12) in far fewer requests: one in flight at a
    # time, everything that queued meanwhile goes in the next one.
    assert client.items_sent == 36
    assert client.batches_sent == len(transport.paths) < 36
    with world.factory() as session:
        assert ledger.balance(session, ledger.merchant_account(world.merchant_id)) == 1_200
        assert ledger.check(session).ok


async def test_a_decline_inside_a_batch_is_the_callers_decline(world: World) -> None:
    transport = httpx.ASGITransport(app=world.client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = BatchingSettlementClient(http, world.merchant_key)
        payment = await client.create(Kind.PAYMENT, 100, description="tea", reference="o")
        issuer, init = world.terminal.purchase_batch1(world.funded_card(500), 100)
        with pytest.raises(Declined) as declined:
            await client.authorise(
                Kind.PAYMENT,
                payment.id,
                issuer_data=issuer,
                initialize=init,
                terminal_id=bytes.fromhex(world.other_terminal_id),
            )
    assert declined.value.decline_code == "terminal_mismatch"


def _failing(handler: httpx.MockTransport) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=handler, base_url="http://settlement")


async def test_an_unreachable_settlement_fails_every_waiting_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("webpurse.merchant.settlement.RETRY_PAUSES", (0.0,))
    attempts: list[list[str | None]] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append([i["idempotency_key"] for i in json.loads(request.content)["requests"]])
        raise httpx.ConnectError("refused", request=request)

    async with _failing(httpx.MockTransport(refuse)) as http:
        client = BatchingSettlementClient(http, "sk_mer_x", max_in_flight=1)
        calls = [
            client.create(Kind.PAYMENT, 100, description="tea", reference=f"o{i}") for i in range(3)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, SettlementError) for r in results)
    assert "unreachable" in str(results[0])
    # Retried with the same keys: settlement may have acted on the first attempt.
    assert len(attempts) >= 2 and attempts[0] == attempts[1]


async def test_a_malformed_batch_answer_is_a_settlement_error_not_a_guess() -> None:
    def wrong_count(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"object": "batch", "responses": []})

    async with _failing(httpx.MockTransport(wrong_count)) as http:
        client = BatchingSettlementClient(http, "sk_mer_x")
        with pytest.raises(SettlementError, match="wrong count"):
            await client.create(Kind.PAYMENT, 100, description="tea", reference="o")


async def test_a_refused_batch_refuses_each_item_with_its_status() -> None:
    def unauthorised(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"code": "unauthenticated", "detail": "bad key"})

    async with _failing(httpx.MockTransport(unauthorised)) as http:
        client = BatchingSettlementClient(http, "sk_mer_x")
        with pytest.raises(SettlementError) as refused:
            await client.create(Kind.PAYMENT, 100, description="tea", reference="o")
    assert refused.value.status == 401 and refused.value.code == "unauthenticated"


async def test_loads_and_reads_do_not_go_through_batches() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        body = {"id": "load_1", "status": "requires_card", "amount": 1}
        return httpx.Response(201 if request.method == "POST" else 200, json=body)

    async with _failing(httpx.MockTransport(answer)) as http:
        client = BatchingSettlementClient(http, "sk_mer_x")
        await client.create(
            Kind.LOAD, 1, description="top-up", reference="o", funding="merchant_float"
        )
        await client.get(Kind.PAYMENT, "pay_1")
    assert seen == ["POST /v1/loads", "GET /v1/payments/pay_1"]


async def test_callers_ready_together_go_in_one_batch_even_with_room_in_flight() -> None:
    # Ten shoppers whose calls become ready in the same turn of the event loop (as when a
    # batch comes back and wakes them all) must travel together: a free in-flight slot is
    # no reason to send the first of them alone and the rest after it.
    sizes: list[int] = []

    def answer(request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["requests"]
        sizes.append(len(items))
        body = {"id": "pay_1", "status": "requires_card", "amount": 100}
        return httpx.Response(
            200,
            json={
                "object": "batch",
                "responses": [{"status": 201, "body": body, "replayed": False}] * len(items),
            },
        )

    async with _failing(httpx.MockTransport(answer)) as http:
        client = BatchingSettlementClient(http, "sk_mer_x", max_in_flight=2)
        await asyncio.gather(
            *(
                client.create(Kind.PAYMENT, 100, description="tea", reference=f"o{i}")
                for i in range(10)
            )
        )
    assert sizes == [10]


class Held(httpx.AsyncBaseTransport):
    """Answers every batch item ``requires_card``; a batch of ``hold`` or more items waits
    until ``release`` is set, so a test can see what is sent while it is on its way."""

    def __init__(self, hold: int) -> None:
        self.hold = hold
        self.release = asyncio.Event()
        self.sizes: list[int] = []
        self.sent = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["requests"]
        self.sizes.append(len(items))
        self.sent.set()
        if len(items) >= self.hold:
            await self.release.wait()
        body = {"id": "pay_1", "status": "requires_card", "amount": 100}
        answer = {"status": 201, "body": body, "replayed": False}
        return httpx.Response(200, json={"object": "batch", "responses": [answer] * len(items)})


def _creates(client: BatchingSettlementClient, count: int, tag: str) -> list[asyncio.Task[object]]:
    return [
        asyncio.ensure_future(
            client.create(Kind.PAYMENT, 100, description="tea", reference=f"{tag}{i}")
        )
        for i in range(count)
    ]


async def test_a_few_callers_wait_for_the_big_batch_instead_of_a_request_of_their_own() -> None:
    # 40 shoppers' calls are on their way; 3 more are not worth a request beside them
    # (issue 20: a dozen callers cycling in batches of their own made two in flight lose
    # to one). They go as soon as the big batch is back, at the front of the next batch.
    transport = Held(hold=40)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = BatchingSettlementClient(http, "sk_mer_x", max_in_flight=2)
        big = _creates(client, 40, "big")
        await transport.sent.wait()
        few = _creates(client, 3, "few")
        for _ in range(20):  # many turns of the loop: nothing but the big batch is sent
            await asyncio.sleep(0)
        assert transport.sizes == [40] and not any(task.done() for task in few)
        transport.release.set()
        await asyncio.gather(*big, *few)
    assert transport.sizes == [40, 3]


async def test_a_batch_half_the_size_of_the_one_in_flight_goes_beside_it() -> None:
    transport = Held(hold=40)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = BatchingSettlementClient(http, "sk_mer_x", max_in_flight=2)
        big = _creates(client, 40, "big")
        await transport.sent.wait()
        half = _creates(client, 20, "half")
        await asyncio.gather(*half)  # answered while the big batch is still on its way
        assert not any(task.done() for task in big)
        transport.release.set()
        await asyncio.gather(*big)
    assert transport.sizes == [40, 20]


async def test_a_lone_caller_beside_a_lone_call_goes_at_once() -> None:
    # Low load with two in flight: one shopper's call is on its way (held), a second
    # shopper's call goes beside it at once, as it did before (latency unchanged).
    transport = Held(hold=1)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = BatchingSettlementClient(http, "sk_mer_x", max_in_flight=2)
        first = _creates(client, 1, "a")
        await transport.sent.wait()
        transport.sent.clear()
        second = _creates(client, 1, "b")
        await transport.sent.wait()
        assert transport.sizes == [1, 1] and not first[0].done()
        transport.release.set()
        await asyncio.gather(*first, *second)


async def test_more_than_max_batch_go_as_equal_batches() -> None:
    transport = Held(hold=1_000)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = BatchingSettlementClient(http, "sk_mer_x", max_batch=5, max_in_flight=3)
        await asyncio.gather(*_creates(client, 12, "o"))
    assert transport.sizes == [4, 4, 4]


async def test_with_one_in_flight_more_than_max_batch_go_as_max_batch_and_the_rest() -> None:
    transport = Held(hold=1_000)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = BatchingSettlementClient(http, "sk_mer_x", max_batch=5, max_in_flight=1)
        await asyncio.gather(*_creates(client, 12, "o"))
    assert transport.sizes == [5, 5, 2]


@given(queued=st.integers(1, 5_000), max_batch=st.integers(1, 1_000))
def test_batch_sizes_share_a_queue_equally_in_the_fewest_batches(
    queued: int, max_batch: int
) -> None:
    sizes = []
    left = queued
    while left:
        sizes.append(batch_size(left, max_batch))
        left -= sizes[-1]
    assert len(sizes) == -(-queued // max_batch)
    assert max(sizes) <= max_batch and max(sizes) - min(sizes) <= 1


def test_a_shop_sends_two_batches_at_once_unless_told_otherwise(tmp_path: Path) -> None:
    """The shop's client keeps two batches on their way (bench/findings.md: 1.7x one's
    purchases/s at 512 shoppers); WEBPURSE_SETTLEMENT_BATCHES_IN_FLIGHT sets it, and a
    value that is not a whole number of at least 1 is refused before the shop starts."""
    from webpurse.merchant.app import _settlement_client
    from webpurse.merchant.settings import MerchantSettings

    def in_flight(env: dict[str, str]) -> int:
        settings = MerchantSettings.from_env({"WEBPURSE_DATA_DIR": str(tmp_path), **env})
        client, http = _settlement_client(settings)
        assert isinstance(client, BatchingSettlementClient)
        asyncio.run(http.aclose())
        return client._max_in_flight

    assert in_flight({}) == 2
    assert in_flight({"WEBPURSE_SETTLEMENT_BATCHES_IN_FLIGHT": "1"}) == 1
    assert in_flight({"WEBPURSE_SETTLEMENT_BATCHES_IN_FLIGHT": "4"}) == 4
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(ValueError, match="WEBPURSE_SETTLEMENT_BATCHES_IN_FLIGHT"):
            MerchantSettings.from_env({"WEBPURSE_SETTLEMENT_BATCHES_IN_FLIGHT": bad})
