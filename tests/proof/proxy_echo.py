"""An ASGI app that answers with the client address and scheme the server believes, run by
``webpurse.listen.run_asgi`` in a child process (tests/proof/test_attacks_proxy.py)."""

from __future__ import annotations

import json
import sys
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    client = scope.get("client") or ("?", 0)
    body = json.dumps({"client": client[0], "scheme": scope.get("scheme")}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":
    from webpurse.listen import run_asgi

    run_asgi(app, host=sys.argv[1], port=int(sys.argv[2]), log_level="warning", lifespan="off")
