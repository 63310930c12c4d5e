"""``webpurse serve settlement --workers N``: several processes on one TCP_NODELAY socket."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import httpx
import pytest
import uvicorn

from tests.settlement.support import Http, Terminal, database_url, live_server
from webpurse.settlement import ledger
from webpurse.settlement.cli import tcp_listen_socket
from webpurse.settlement.models import Merchant

PURCHASES = 12


async def _nodelay_of_accepted(sock: socket.socket) -> int:
    """Serve ``sock`` with asyncio; the TCP_NODELAY of the connection it accepts."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[int] = loop.create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await loop.create_server(Probe, sock=sock)
    async with server:
        port = sock.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(accepted, timeout=10)
        finally:
            writer.close()


def test_the_workers_socket_turns_nagle_off_where_uvicorns_own_does_not() -> None:
    """The trap docs/performance.md describes: ~40 ms per response written in two parts."""
    assert asyncio.run(_nodelay_of_accepted(tcp_listen_socket("127.0.0.1", 0))) != 0
    uvicorns = uvicorn.Config("x:app", host="127.0.0.1", port=0, log_config=None).bind_socket()
    assert asyncio.run(_nodelay_of_accepted(uvicorns)) == 0


def _workers(pid: int) -> list[int]:
    """The uvicorn worker processes (multiprocessing spawn children) of ``pid``."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.postgres
def test_two_workers_serve_concurrent_purchases_and_the_ledger_balances(tmp_path: Path) -> None:
    with (
        database_url("postgresql", tmp_path) as url,
        live_server(url, tmp_path, workers=2) as server,
    ):
        assert server.pid is not None and len(_workers(server.pid)) == 2
        cards = [server.issue() for _ in range(3)]
        limits = httpx.Limits(max_connections=PURCHASES)
        with httpx.Client(base_url=server.base_url, timeout=60, limits=limits) as http:
            terminal = Terminal(cast(Http, http), server.merchant_key, server.terminal_id)
            for card in cards:
                terminal.load(card, 1_000)

            def buy(card_index: int) -> str:
                # One card is one shopper: its purchases run one after another.
                statuses = []
                for _ in range(PURCHASES // len(cards)):
                    statuses.append(terminal.purchase(cards[card_index], 10)["status"])
                return ",".join(statuses)

            with ThreadPoolExecutor(len(cards)) as pool:
                results = list(pool.map(buy, range(len(cards))))
        assert all(set(r.split(",")) == {"succeeded"} for r in results)
        with server.factory() as session:
            report = ledger.check(session)
            assert report.ok, report.problems
            merchant = session.query(Merchant).one()
            paid = ledger.balance(session, ledger.merchant_account(merchant.id))
            assert paid == PURCHASES * 10
