"""A TCP proxy on loopback that delays every byte by a fixed one-way time (issue 17).

This machine's kernel has no ``netem`` qdisc, so the internet's round trip is put between
the agent and the shop by a proxy: each chunk read from one side is written to the other
``one_way`` seconds later, in order, in both directions (RTT = 2 × ``one_way``). A new
connection's first bytes reach the server no sooner than 1.5 RTT after the connect: the
TCP handshake a real client pays (SYN, SYN-ACK, then its data with the ACK), which the
client's loopback connection to the proxy skips.
TLS is not modelled (TLS 1.3 adds one more round trip to a new connection).

Only loopback targets are allowed: this is a measuring tool, not a relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator

CHUNK = 64 * 1024


class DelayProxy:
    """``listen`` on a free loopback port; connections go to ``target`` delayed."""

    def __init__(self, target_host: str, target_port: int, one_way: float) -> None:
        if not ipaddress.ip_address(target_host).is_loopback:
            raise ValueError(f"the delay proxy only forwards to loopback, not {target_host}")
        if one_way < 0:
            raise ValueError("a delay cannot be negative")
        self.target = (target_host, target_port)
        self.one_way = one_way
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.connections += 1
        loop = asyncio.get_running_loop()
        # The handshake a real client waits for: SYN, SYN-ACK, then data with the ACK.
        not_before = loop.time() + 3 * self.one_way
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(
                self._pipe(client_r, server_w, not_before), self._pipe(server_r, client_w, 0.0)
            )
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # close(): end quietly (asyncio's stream callback reports a cancelled handler).
            pass
        finally:
            for writer in (client_w, server_w):
                writer.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, not_before: float
    ) -> None:
        """Copy ``source`` to ``sink``, each chunk ``one_way`` after it was read."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            while True:
                chunk = await source.read(CHUNK)
                queue.put_nowait((max(loop.time() + self.one_way, not_before), chunk))
                if not chunk:
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the delay being modelled, not a sync
                if not chunk:
                    if sink.can_write_eof():
                        sink.write_eof()
                    return
                sink.write(chunk)
                await sink.drain()
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await reading


@contextlib.asynccontextmanager
async def delayed(url: str, one_way: float) -> AsyncIterator[DelayProxy]:
    """A :class:`DelayProxy` in front of ``http://HOST:PORT`` (loopback) while in use."""
    host, _, port = url.split("://", 1)[1].rstrip("/").partition(":")
    proxy = DelayProxy(host, int(port), one_way)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
