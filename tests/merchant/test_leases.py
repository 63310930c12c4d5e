"""Order leases across shop processes (real Redis): a dead driver's order is found and
freed for a survivor, a live one's never; a driver whose lease was taken over stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.redis_support import drop_prefix, redis_url, unique_prefix
from webpurse.merchant.leases import RedisFlowLeases
from webpurse.reader.remote.shared import SharedState

pytestmark = pytest.mark.timeout(60)

DEADLINE = 10.0


@pytest.fixture
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[tuple[SharedState, SharedState]]:
    url = redis_url()
    prefix = unique_prefix(request.node.name)
    a = SharedState.from_url(url, prefix=prefix, name="shopA")
    b = SharedState.from_url(url, prefix=prefix, name="shopB")
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
        drop_prefix(url, prefix)


async def test_a_dead_drivers_lease_is_freed_for_one_survivor_only(
    nodes: tuple[SharedState, SharedState],
) -> None:
    a, b = nodes
    on_a, on_b = RedisFlowLeases(a), RedisFlowLeases(b)
    assert a.node.startswith("shopA_") and b.node.startswith("shopB_")
    assert await on_a.acquire("ord_1")
    assert not await on_b.acquire("ord_1")
    # A is alive (acquire wrote its heartbeat): nothing to take over, nothing freed.
    assert await on_b.orphaned() == {}
    assert not await on_b.clear_dead("ord_1", a.node)
    # A dies: its heartbeat lapses (deleted here rather than waited for), its lease stays.
    await a.redis.delete(a.key("node", a.node))
    assert await on_b.orphaned() == {"ord_1": a.node}
    assert await on_b.clear_dead("ord_1", a.node)
    assert not await on_b.clear_dead("ord_1", a.node)  # a second survivor finds it gone
    assert await on_b.acquire("ord_1")
    assert await b.redis.get(b.key("flow", "ord_1")) == b.node.encode()
    assert await on_a.orphaned() == {}  # B is alive
    # Released: no longer looked at; a lease that lapsed with nobody left is forgotten.
    await on_b.release("ord_1")
    assert await b.redis.smembers(b.key("flows")) == set()
    assert await on_b.acquire("ord_2")
    await b.redis.delete(b.key("flow", "ord_2"))
    assert await on_a.orphaned() == {}
    assert await b.redis.smembers(b.key("flows")) == set()


async def test_a_driver_whose_lease_was_taken_over_stops_and_a_lost_lease_is_retaken(
    nodes: tuple[SharedState, SharedState],
) -> None:
    a, b = nodes
    on_a, on_b = RedisFlowLeases(a, seconds=0.3), RedisFlowLeases(b, seconds=0.3)
    assert await on_a.acquire("ord_1")
    keeper = asyncio.create_task(on_a.keep("ord_1"))
    try:
        # The lease vanishes (a Redis restarted empty): the keeper takes it again.
        await a.redis.delete(a.key("flow", "ord_1"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while await a.redis.get(a.key("flow", "ord_1")) != a.node.encode():
            assert loop.time() < deadline, "the keeper never took the lease again"
            await asyncio.sleep(0.05)
        assert not keeper.done()
        # B takes it over (A looked dead): A's keeper returns, so A stops driving.
        await a.redis.set(a.key("flow", "ord_1"), b.node, px=300)
        await asyncio.wait_for(keeper, DEADLINE)
        assert not await on_b.acquire("ord_1")  # B holds it, A did not take it back
        assert await b.redis.get(b.key("flow", "ord_1")) == b.node.encode()
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
