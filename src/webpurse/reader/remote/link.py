"""One live WebSocket of a remote-reader session."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.websockets import WebSocket

from webpurse.reader.messages import Message, encode_message


class Link:
    """One live WebSocket of a session; sends are serialised."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._lock = asyncio.Lock()
        self.closed = False

    async def send(self, message: Message) -> None:
        async with self._lock:
            await self.websocket.send_text(encode_message(message))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            await self.websocket.close(code, reason)
