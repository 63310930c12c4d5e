"""The delaying TCP proxy (bench.delay_proxy) and the RTT benchmark's rows (bench.rtt)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.delay_proxy import DelayProxy, delayed
from bench.rtt import Timing, goal_ms, rtt_rows


async def _echo_server() -> tuple[asyncio.Server, str]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (asyncio.CancelledError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_bytes_arrive_in_order_each_way_one_delay_later() -> None:
    server, url = await _echo_server()
    one_way = 0.03
    async with server, delayed(url, one_way) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        # The first answer also pays the TCP handshake: 1.5 RTT there, 0.5 back.
        payload = bytes(range(256)) * 1000
        started = time.perf_counter()
        writer.write(payload)
        await writer.drain()
        echoed = await reader.readexactly(len(payload))
        first = time.perf_counter() - started
        assert echoed == payload
        assert first >= 4 * one_way
        started = time.perf_counter()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert time.perf_counter() - started >= 2 * one_way
        writer.write_eof()
        assert await reader.read() == b""  # end of stream passed through
        writer.close()
        assert proxy.connections == 1


def test_only_loopback_and_no_negative_delay() -> None:
    with pytest.raises(ValueError, match="loopback"):
        DelayProxy("192.0.2.1", 80, 0.01)
    with pytest.raises(ValueError, match="negative"):
        DelayProxy("127.0.0.1", 80, -0.01)


def test_rows_give_percentiles_and_the_goal_verdict() -> None:
    fast = [Timing(purchase=0.050, from_click=0.120, batches=2) for _ in range(9)]
    rows = rtt_rows(10, [*fast, Timing(purchase=0.5, from_click=0.9, batches=2)])
    by = {(r.metric, r.params.get("stat")): r for r in rows}
    assert by[("purchase, batch 1 → capture answer", "p50")].value == pytest.approx(50.0)
    assert by[("purchase, batch 1 → capture answer", "p95")].value > 50.0
    goal = by[("goal: batch 1 → capture p50 ≤ 2 × RTT + 20 ms", None)]
    assert goal.value == goal_ms(20) == 60.0
    assert goal.note.startswith("met")
    assert by[("merchant↔reader round trips per purchase", None)].value == 2
    assert all(r.params["rtt_ms"] == 20 for r in rows)
