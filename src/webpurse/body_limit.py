"""A request body limit, enforced before routing and authentication (issue 19, finding 5).

A pure ASGI middleware, outermost in the settlement server and the merchant shop: it reads
the request body itself, counting the bytes as they arrive, and answers 413 as soon as the
count passes the limit, whatever ``Content-Length`` says or whether there is one (chunked
bodies are counted the same way). A ``Content-Length`` over the limit is refused before a
byte of the body is read; a malformed one is 400. Only a body within the limit reaches the
application (replayed to it whole), so no route, dependency or authentication check ever
runs on, or buffers, more than the limit: an unauthenticated client cannot make the server
hold 120 MiB to find out it has no key.

The limit may differ per path (``overrides``: exact path → bytes), e.g. settlement's
``/v1/batch``. What the refusal looks like is the application's (``refusal``: status, code
and detail → status, headers, body), so each server answers in its own error format.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import structlog

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Refusal = Callable[[int, str, str], tuple[list[tuple[bytes, bytes]], bytes]]
"""``(status, code, detail) -> (headers, body)`` of a refused request."""
Logger = Callable[[str, str, int, int], None]
"""``(method, path, limit, bytes seen)``: how a 413 is logged (each server its own way)."""

MIB = 1 << 20

log = structlog.get_logger(__name__)


def log_refusal(method: str, path: str, limit: int, seen: int) -> None:
    log.warning("http.body_too_large", method=method, path=path, limit=limit, seen=seen)


def plain_refusal(status: int, code: str, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A JSON ``{"detail": …, "code": …}`` refusal (FastAPI's own error shape)."""
    import json

    body = json.dumps({"detail": detail, "code": code}).encode("utf-8")
    return [(b"content-type", b"application/json")], body


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (per path: ``overrides``) with 413."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int = MIB,
        overrides: Mapping[str, int] | None = None,
        refusal: Refusal = plain_refusal,
        logger: Logger = log_refusal,
    ) -> None:
        if limit < 0:
            raise ValueError("a body limit is a number of bytes >= 0")
        self.app = app
        self.limit = limit
        self.overrides = dict(overrides or {})
        self.refusal = refusal
        self.logger = logger

    def limit_for(self, path: str) -> int:
        return self.overrides.get(path.rstrip("/") or "/", self.limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", "/"))
        declared = _content_length(scope)
        if declared == -1:
            await self._refuse(send, scope, 400, "invalid_content_length", "bad Content-Length")
            return
        if declared is not None and declared > limit:
            await self._too_large(send, scope, limit, declared)
            return
        chunks: list[bytes] = []
        size = 0
        first: Message | None = None
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client went away
                first = message
                break
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await self._too_large(send, scope, limit, size)
                return
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                break
        if first is None:
            first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                assert first is not None
                return first
            return await receive()  # later calls: wait for the disconnect, as before

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, scope: Scope, limit: int, seen: int) -> None:
        self.logger(str(scope.get("method", "")), str(scope.get("path", "")), limit, seen)
        await self._refuse(
            send, scope, 413, "payload_too_large", f"the request body exceeds {limit} bytes"
        )

    async def _refuse(self, send: Send, scope: Scope, status: int, code: str, detail: str) -> None:
        headers, body = self.refusal(status, code, detail)
        headers = [
            *headers,
            (b"content-length", str(len(body)).encode("ascii")),
            # The rest of the body is never read: the connection cannot carry another request.
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _content_length(scope: Scope) -> int | None:
    """The declared length, ``None`` if absent, ``-1`` if malformed (or repeated, differing)."""
    headers = scope.get("headers", ())
    values = {value for name, value in headers if name.lower() == b"content-length"}
    if not values:
        return None
    if len(values) > 1:
        return -1
    text = values.pop().strip()
    if not text.isdigit() or len(text) > 18:
        return -1
    return int(text)
