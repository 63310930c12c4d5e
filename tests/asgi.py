"""A synchronous HTTP client for an ASGI app in this process, with its lifespan.

The tests call the settlement app as a merchant's HTTP client would, without a socket:
httpx's own ``ASGITransport`` (async) runs the app on an event loop in a helper thread,
and the app's lifespan (webhook worker, expiry sweeper) runs there for the client's life.
This is ours rather than ``starlette.testclient``, whose httpx flavour is deprecated
upstream: the tests depend on httpx's public transport API and the ASGI lifespan protocol,
nothing else.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import httpx

T = TypeVar("T")


class _LoopThread:
    """An asyncio event loop running in a daemon thread until ``close``."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Lifespan:
    """Drive the ASGI lifespan protocol: startup on ``start``, shutdown on ``stop``."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._receive: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self._sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def _expect(self, ok: str) -> None:
        message = await self._sent.get()
        if message["type"] != ok:
            raise RuntimeError(f"lifespan: {message.get('message', message['type'])}")

    async def start(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.create_task(self._app(scope, self._receive.get, self._sent.put))
        await self._receive.put({"type": "lifespan.startup"})
        await self._expect("lifespan.startup.complete")

    async def stop(self) -> None:
        await self._receive.put({"type": "lifespan.shutdown"})
        await self._expect("lifespan.shutdown.complete")
        assert self._task is not None
        await self._task


class _SyncASGITransport(httpx.BaseTransport):
    def __init__(self, app: Any, loop: _LoopThread) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        content = request.read()

        async def send() -> httpx.Response:
            inner = httpx.Request(
                request.method, request.url, headers=request.headers, content=content
            )
            response = await self._inner.handle_async_request(inner)
            body = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=body)

        return self._loop.run(send())


class AppClient(httpx.Client):
    """``with AppClient(app) as client:`` — the app started, requests in process, stopped."""

    def __init__(self, app: Any, base_url: str = "http://testserver") -> None:
        self.app = app  # for tests that also reach it asynchronously (httpx.ASGITransport)
        self._loop = _LoopThread()
        self._lifespan = _Lifespan(app)
        self._started = False
        super().__init__(transport=_SyncASGITransport(app, self._loop), base_url=base_url)

    def __enter__(self) -> AppClient:
        super().__enter__()
        self._loop.run(self._lifespan.start())
        self._started = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        try:
            if self._started:
                self._loop.run(self._lifespan.stop())
        finally:
            super().__exit__(exc_type, exc, tb)
            self._loop.close()
