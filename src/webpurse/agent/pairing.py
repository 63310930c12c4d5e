"""The agent's loopback pairing endpoint: ``POST /pair {token, server}`` on 127.0.0.1.

The payment page hands the agent the pairing token the merchant issued. Checks, in order
(each refusal is an RFC 9457 problem with a stable ``code``, and changes nothing):

- ``Host`` must name the loopback (``127.0.0.1``, ``localhost``, ``[::1]``): a page on a
  DNS-rebound name cannot reach the agent (``bad_host``, 421);
- the request's ``Origin`` header (never a field of the payload) must be on the agent's
  ``--allow-origin`` list (``origin_not_allowed``, 403); CORS headers are only ever sent
  for an allowed origin, and the preflight answers Chrome's Private Network Access;
- the body is small JSON with a URL-safe ``token`` and a ``server`` URL
  (``bad_request``, 400), and that server is at the page's own origin
  (``server_origin_mismatch``, 400): the agent dials ``ws://`` for ``http://`` and
  ``wss://`` for ``https://``, never anywhere else;
- one session at a time (``busy``, 409);
- the server must accept the token (``token_invalid`` etc., 403; ``unreachable``, 502).

On success: 200 ``{status: "paired", session, merchant}`` once the server said hello.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from webpurse.agent.session import AGENT_NAME, PairingRefused, origin_of
from webpurse.agent.terminal import AgentBusy, TerminalAgent

log = logging.getLogger(__name__)

DEFAULT_PORT = 47800
MAX_BODY = 4096
_LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
_TOKEN = re.compile(r"\A[A-Za-z0-9_\-]{32,128}\Z")


def normalise_origins(origins: Sequence[str]) -> frozenset[str]:
    """The allow-list as origins (``https://shop.example``); raises ValueError on a bad one."""
    return frozenset(origin_of(o) for o in origins)


def _problem(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    log.info("pairing answered %d %s: %s", status, code, detail)
    body = {"type": "about:blank", "title": code.replace("_", " "), "status": status}
    body |= {"detail": detail, "code": code}
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


def _host_ok(request: Request) -> bool:
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in _LOOPBACK


def _cors(origin: str) -> dict[str, str]:
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def _pair_request(body: Any, origin: str, headers: dict[str, str]) -> tuple[str, str] | Response:
    """The (token, server) of a pairing request, or the problem that refuses it."""
    if not isinstance(body, dict):
        return _problem(400, "bad_request", "expected a small JSON object", headers)
    token, server = body.get("token"), body.get("server")
    if not isinstance(token, str) or not _TOKEN.match(token):
        return _problem(400, "bad_request", "token must be a URL-safe pairing token", headers)
    if not isinstance(server, str) or len(server) > 2000:
        return _problem(400, "bad_request", "server must be the merchant's URL", headers)
    try:
        server_origin = origin_of(server)
    except ValueError as exc:
        return _problem(400, "bad_request", str(exc), headers)
    if server_origin != origin:
        return _problem(
            400,
            "server_origin_mismatch",
            f"the agent dials only the page's own origin {origin}",
            headers,
        )
    return token, server


Handler = Callable[[Request, str], Awaitable[Response]]


class _PairingEndpoint:
    """The routes of the loopback app; each checks the host and the page's origin first."""

    def __init__(self, agent: TerminalAgent, allowed: frozenset[str]) -> None:
        self.agent = agent
        self.allowed = allowed

    def page_origin(self, request: Request) -> str | None:
        raw = request.headers.get("origin")
        if raw is None:
            return None
        try:
            origin = origin_of(raw)
        except ValueError:
            return None
        return origin if origin in self.allowed else None

    def gate(self, request: Request) -> tuple[str | None, Response | None]:
        if not _host_ok(request):
            return None, _problem(421, "bad_host", "the agent answers only on its loopback name")
        origin = self.page_origin(request)
        if origin is None:
            log.warning("pairing refused: origin %r not allowed", request.headers.get("origin"))
            return None, _problem(
                403, "origin_not_allowed", "this site may not pair with the agent"
            )
        return origin, None

    def route(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the gate, with the CORS preflight on OPTIONS."""

        async def endpoint(request: Request) -> Response:
            origin, refusal = self.gate(request)
            if refusal is not None or origin is None:
                return refusal or _problem(403, "origin_not_allowed", "not allowed")
            if request.method == "OPTIONS":
                return self.preflight(request, origin)
            return await handler(request, origin)

        return endpoint

    def preflight(self, request: Request, origin: str) -> Response:
        headers = _cors(origin) | {
            "Access-Control-Allow-Methods": "POST, GET",
            "Access-Control-Allow-Headers": "Content-Type",
            "Access-Control-Max-Age": "600",
        }
        if request.headers.get("access-control-request-private-network") == "true":
            headers["Access-Control-Allow-Private-Network"] = "true"
        return Response(status_code=204, headers=headers)

    async def pair(self, request: Request, origin: str) -> Response:
        headers = _cors(origin)
        checked = _pair_request(await _read_json(request), origin, headers)
        if isinstance(checked, Response):
            return checked
        token, server = checked
        try:
            hello = await self.agent.pair(server, token=token, origin=origin)
        except AgentBusy as exc:
            return _problem(409, "busy", str(exc), headers)
        except PairingRefused as exc:
            status = 502 if exc.code in ("unreachable", "timeout") else 403
            return _problem(status, exc.code, exc.message, headers)
        except ValueError as exc:
            return _problem(400, "bad_request", str(exc), headers)
        payload = {"status": "paired", "session": hello.session, "merchant": hello.merchant}
        return JSONResponse(payload, headers=headers)

    async def status(self, request: Request, origin: str) -> Response:
        agent = self.agent
        payload = {"agent": AGENT_NAME, "reader": agent.reader.name, "busy": agent.busy}
        return JSONResponse(payload, headers=_cors(origin))


def create_pairing_app(agent: TerminalAgent, *, allowed_origins: Sequence[str]) -> Starlette:
    """The loopback app; serve it on 127.0.0.1 only (``webpurse agent`` does)."""
    endpoint = _PairingEndpoint(agent, normalise_origins(allowed_origins))
    return Starlette(
        routes=[
            Route("/pair", endpoint.route(endpoint.pair), methods=["POST", "OPTIONS"]),
            Route("/status", endpoint.route(endpoint.status), methods=["GET", "OPTIONS"]),
        ]
    )


async def _read_json(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return None
    chunks = bytearray()
    async for chunk in request.stream():
        chunks += chunk
        if len(chunks) > MAX_BODY:
            return None
    try:
        return json.loads(chunks)
    except (ValueError, RecursionError):
        return None
