"""Real components for the remote-reader tests: uvicorn on a free port, a TCP proxy to cut.

- :func:`serve` runs an ASGI app in a real uvicorn server on 127.0.0.1 (a free port) in
  this event loop, and stops it afterwards;
- :func:`merchant_app` is the tiny FastAPI app a merchant writes: it mounts the hub's
  WebSocket endpoint at ``/reader``;
- :class:`TcpProxy` forwards TCP to the server and can cut every connection at once: a
  dropped network path, as the agent and the server both see it;
- :func:`purchase_batches` / :func:`load_batches` drive any Reader the way the merchant's
  flows do, computing the host MACs with ``webpurse.protocol.host`` (the card keys of
  ``tests/card/support.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI

from tests.card.support import DLK, DPK, DTK, TERMINAL, WHEN
from webpurse.agent.guard import ConsentRequest
from webpurse.protocol import commands as cmd
from webpurse.protocol import host
from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.base import Reader, Step
from webpurse.reader.remote import ReaderHub

_START_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def serve(app: object) -> AsyncIterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yield ``http://127.0.0.1:PORT``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="off", log_level="warning", ws_max_size=1 << 20)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _START_TIMEOUT
    while not server.started:  # bounded polling on the server's own flag
        if task.done() or loop.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def merchant_app(hub: ReaderHub) -> FastAPI:
    app = FastAPI()
    app.add_api_websocket_route("/reader", hub.endpoint)
    return app


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; :meth:`cut` drops every live connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def cut(self) -> None:
        """Abort every connection now, both ways (no close handshake: a broken path)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


@dataclass
class ConsentRecorder:
    """The shopper, scripted: answers ``answer`` and remembers what it was shown."""

    answer: bool = True
    asked: list[ConsentRequest] = field(default_factory=list)

    async def __call__(self, request: ConsentRequest) -> bool:
        self.asked.append(request)
        return self.answer


def select_read_initialize(init: cmd.InitializeForPurchase | cmd.InitializeForLoad) -> list[Step]:
    return [
        Step(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes()),
        Step(cmd.ReadBinary(cmd.SFI_ISSUER).to_apdu().to_bytes()),
        Step(init.to_apdu().to_bytes()),
    ]


def debit_step(amount: int, init_response: ResponseApdu, seq: int = 1) -> Step:
    init = cmd.InitializeForPurchaseResponse.from_data(init_response.data)
    mac1 = host.purchase_mac1(
        DPK,
        random=init.random,
        offline_counter=init.offline_counter,
        terminal_seq=seq,
        amount=amount,
        terminal_id=TERMINAL,
        date=WHEN[0],
        time=WHEN[1],
    )
    return Step(cmd.DebitForPurchase(seq, WHEN[0], WHEN[1], mac1).to_apdu().to_bytes())


def credit_step(amount: int, init_response: ResponseApdu) -> Step:
    init = cmd.InitializeForLoadResponse.from_data(init_response.data)
    assert host.verify_load_mac1(
        DLK,
        init.mac1,
        random=init.random,
        online_counter=init.online_counter,
        balance=init.balance,
        amount=amount,
        terminal_id=TERMINAL,
    ), "the card's load MAC1 must verify"
    mac2 = host.load_mac2(
        DLK,
        random=init.random,
        online_counter=init.online_counter,
        amount=amount,
        terminal_id=TERMINAL,
        date=WHEN[0],
        time=WHEN[1],
    )
    return Step(cmd.CreditForLoad(WHEN[0], WHEN[1], mac2).to_apdu().to_bytes())


async def load(reader: Reader, amount: int) -> bytes:
    """A full load over any reader; returns the verified TAC."""
    first = await reader.transmit(
        select_read_initialize(cmd.InitializeForLoad(1, amount, TERMINAL))
    )
    assert [r.sw for r in first] == [0x9000] * 3
    init = cmd.InitializeForLoadResponse.from_data(first[2].data)
    (credit,) = await reader.transmit([credit_step(amount, first[2])])
    assert credit.sw == 0x9000
    tac = cmd.CreditForLoadResponse.from_data(credit.data).tac
    assert host.verify_load_tac(
        DTK,
        tac,
        new_balance=init.balance + amount,
        online_counter=init.online_counter,
        amount=amount,
        terminal_id=TERMINAL,
        date=WHEN[0],
        time=WHEN[1],
    )
    return tac


async def purchase(reader: Reader, amount: int, seq: int = 1) -> bytes:
    """A full purchase over any reader; returns the verified TAC."""
    first = await reader.transmit(
        select_read_initialize(cmd.InitializeForPurchase(1, amount, TERMINAL))
    )
    assert [r.sw for r in first] == [0x9000] * 3
    init = cmd.InitializeForPurchaseResponse.from_data(first[2].data)
    (debit,) = await reader.transmit([debit_step(amount, first[2], seq)])
    assert debit.sw == 0x9000, debit
    answer = cmd.DebitForPurchaseResponse.from_data(debit.data)
    assert host.verify_purchase_mac2(
        DPK,
        answer.mac2,
        random=init.random,
        offline_counter=init.offline_counter,
        terminal_seq=seq,
        amount=amount,
    )
    assert host.verify_purchase_tac(
        DTK,
        answer.tac,
        amount=amount,
        terminal_id=TERMINAL,
        terminal_seq=seq,
        date=WHEN[0],
        time=WHEN[1],
    )
    return answer.tac
