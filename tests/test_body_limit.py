"""The request body limit as an ASGI middleware, driven message by message."""

from __future__ import annotations

import json
from typing import Any

from webpurse.body_limit import BodyLimit

Message = dict[str, Any]


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """The application behind the limit: answers with the length of the body it read."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


async def call(
    app: Any, chunks: list[bytes], headers: list[tuple[bytes, bytes]] | None = None, path: str = "/"
) -> tuple[list[Message], int]:
    """Run one request; return what was sent and how many body messages were read."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or []}
    pending = [
        {"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1}
        for i, chunk in enumerate(chunks)
    ]
    read = 0

    async def receive() -> Message:
        nonlocal read
        read += 1
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent, read


async def test_a_body_within_the_limit_reaches_the_app_whole() -> None:
    sent, _ = await call(BodyLimit(echo, limit=10), [b"12345", b"67890"])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"10"


async def test_a_chunked_body_is_refused_once_it_passes_the_limit_and_not_read_further() -> None:
    chunks = [b"x" * 4] * 100
    sent, read = await call(BodyLimit(echo, limit=10), chunks)
    assert sent[0]["status"] == 413
    assert (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["code"] == "payload_too_large"
    assert read == 3  # 4 + 4 + 4 > 10: the rest is never read


async def test_a_declared_length_over_the_limit_is_refused_unread_and_a_bad_one_is_400() -> None:
    sent, read = await call(BodyLimit(echo, limit=10), [b"x"], [(b"content-length", b"11")])
    assert (sent[0]["status"], read) == (413, 0)
    for bad in (b"-1", b"ten", b"1" * 30):
        sent, _ = await call(BodyLimit(echo, limit=10), [b"x"], [(b"content-length", bad)])
        assert sent[0]["status"] == 400
    sent, _ = await call(
        BodyLimit(echo, limit=10), [b"x"], [(b"content-length", b"1"), (b"content-length", b"2")]
    )
    assert sent[0]["status"] == 400


async def test_a_path_may_have_its_own_limit() -> None:
    app = BodyLimit(echo, limit=4, overrides={"/v1/batch": 16})
    assert (await call(app, [b"x" * 10], path="/v1/batch"))[0][0]["status"] == 200
    assert (await call(app, [b"x" * 10], path="/v1/payments"))[0][0]["status"] == 413
