"""One agent session: the WebSocket to the merchant, relaying batches to the local reader.

``AgentSession.start`` dials the merchant's WebSocket (only at the origin the pairing
named), says ``hello`` with the pairing token or code and the card's state, and waits for
the server's ``hello``. ``serve`` then answers until the server's ``end``: it runs each
``transmit`` step by step through the :class:`~webpurse.agent.guard.Guard` (asking the
shopper before a DEBIT or CREDIT), answers pings, reports card events, refuses what it
cannot parse, and after a dropped socket resumes with the resume token within the grace
period. A batch cut off by the drop is not finished and its result is not sent later:
the server has already reported it as outcome unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from webpurse import __version__
from webpurse.agent.consent import Consent
from webpurse.agent.display import clean, outcome_line
from webpurse.agent.guard import Allow, Ask, Guard, Refuse
from webpurse.reader.base import (
    CardRemoved,
    NoCard,
    Reader,
    ReaderError,
    ReaderTimeout,
    Step,
)
from webpurse.reader.messages import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSIONS,
    AgentHello,
    Card,
    CardEvent,
    CardStatus,
    End,
    Error,
    ErrorCode,
    Message,
    MessageError,
    Ping,
    Pong,
    Result,
    Resume,
    ServerHello,
    Transmit,
    encode_message,
    error_for,
    parse_message,
)

log = logging.getLogger(__name__)

AGENT_NAME = f"webpurse-agent/{__version__}"
_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
_HTTP_SCHEME = {"ws": "http", "wss": "https", "http": "http", "https": "https"}
_DEFAULT_PORT = {"http": 80, "https": 443}
_FINAL_REFUSALS = frozenset(
    {ErrorCode.SESSION_EXPIRED, ErrorCode.TOKEN_INVALID, ErrorCode.UNSUPPORTED_VERSION}
)


class PairingRefused(Exception):
    """The server refused the hello (bad token or code, version) or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Link(Protocol):
    """The part of a websockets client connection the session uses."""

    async def send(self, message: str) -> None: ...

    async def recv(self) -> str | bytes: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


Connector = Callable[[str], Awaitable[Link]]


async def default_connector(url: str) -> Link:
    # websockets refuses frames above max_size by closing; allow some room above the
    # protocol limit so an oversized frame is refused with an ``error`` instead.
    return await ws_connect(
        url, max_size=4 * MAX_MESSAGE_BYTES, open_timeout=10, user_agent_header=AGENT_NAME
    )


@dataclass(frozen=True, slots=True)
class ServerTarget:
    """Where the agent dials: the WebSocket URL, and the web origin it belongs to."""

    ws_url: str
    origin: str


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of an http(s) or ws(s) URL, lower case, default port dropped.

    Raises ValueError for anything else.
    """
    parts = urlsplit(url.strip())
    scheme = _HTTP_SCHEME.get(parts.scheme.lower())
    if scheme is None or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"{url!r} is not an http(s) or ws(s) URL with a host")
    port = parts.port
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return (
        f"{scheme}://{host}"
        if port in (None, _DEFAULT_PORT[scheme])
        else f"{scheme}://{host}:{port}"
    )


def target_for(server: str) -> ServerTarget:
    """The WebSocket endpoint ``server`` names (http→ws, https→wss), and its origin."""
    parts = urlsplit(server.strip())
    scheme = _WS_SCHEME.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"{server!r}: the server URL must be http(s) or ws(s)")
    origin = origin_of(server)
    ws_url = urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))
    return ServerTarget(ws_url, origin)


class AgentSession:
    """One paired session with a merchant server."""

    def __init__(
        self,
        reader: Reader,
        target: ServerTarget,
        *,
        consent: Consent,
        show: Callable[[str], None] = print,
        connector: Connector = default_connector,
        hello_timeout: float = 10.0,
        idle_timeout: float = 60.0,
    ) -> None:
        self.reader = reader
        self.target = target
        self._consent = consent
        self._show = show
        self._connector = connector
        self._hello_timeout = hello_timeout
        self._idle_timeout = idle_timeout
        self._link: Link | None = None
        self._generation = 0
        self._batch: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._guard = Guard(target.origin)
        self._card = CardStatus(False)
        self.hello: ServerHello | None = None
        self.end: End | None = None
        self.refusals: list[Error] = []
        """Every ``error`` this agent sent (what it refused), newest last."""

    # -- start ------------------------------------------------------------------------------

    async def _card_status(self) -> CardStatus:
        try:
            info = await self.reader.wait_for_card(0.05)
        except ReaderTimeout:
            return CardStatus(False)
        return CardStatus(True, info.atr or None)

    async def _handshake(self, link: Link, first: Message) -> ServerHello:
        await link.send(encode_message(first))
        try:
            frame = await asyncio.wait_for(link.recv(), self._hello_timeout)
            reply = parse_message(frame)
        except TimeoutError:
            raise PairingRefused(ErrorCode.TIMEOUT, "the server did not answer hello") from None
        except MessageError as exc:
            raise PairingRefused(exc.code, exc.message) from None
        if isinstance(reply, Error):
            raise PairingRefused(reply.code, reply.message)
        if not isinstance(reply, ServerHello) or reply.version not in PROTOCOL_VERSIONS:
            raise PairingRefused(ErrorCode.UNEXPECTED, "the server's answer is not a hello")
        return reply

    async def start(self, *, token: str | None = None, code: str | None = None) -> ServerHello:
        """Dial and pair; raises :class:`PairingRefused`."""
        self._card = await self._card_status()
        hello = AgentHello(
            versions=PROTOCOL_VERSIONS,
            agent=AGENT_NAME,
            reader=self.reader.name[:200],
            card=self._card,
            token=token,
            code=code,
        )
        try:
            link = await self._connector(self.target.ws_url)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise PairingRefused(
                "unreachable", f"cannot reach {self.target.ws_url}: {exc}"
            ) from None
        try:
            self.hello = await self._handshake(link, hello)
        except (ConnectionClosed, OSError) as exc:
            await link.close()
            raise PairingRefused("unreachable", f"connection closed during hello: {exc}") from None
        except PairingRefused:
            await link.close()
            raise
        self._link = link
        self._guard = Guard(self.target.origin, self.hello.merchant)
        merchant = f" ({clean(self.hello.merchant)})" if self.hello.merchant else ""
        self._show(f"paired with {self.target.origin}{merchant}")
        return self.hello

    # -- serve ------------------------------------------------------------------------------

    async def serve(self) -> End | None:
        """Answer the server until ``end`` (returned), or until the session is lost (None)."""
        self._watcher = asyncio.create_task(self._watch_card())
        try:
            while True:
                link = self._link
                if link is None:
                    return None
                try:
                    if await self._receive_loop(link):
                        return self.end
                except (ConnectionClosed, OSError, TimeoutError):
                    pass
                with contextlib.suppress(Exception):
                    await link.close()
                self._link = None
                self._generation += 1  # a batch still running stops at its next step
                self._show("connection to the merchant lost; resuming…")
                if not await self._resume():
                    self._show("the session could not be resumed")
                    return None
        finally:
            await self.close()

    async def close(self) -> None:
        for task in (self._watcher, self._batch):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._link is not None:
            with contextlib.suppress(Exception):
                await self._link.close()
            self._link = None

    async def _send(self, message: Message, generation: int | None = None) -> None:
        """Send on the live link; silently dropped if it is gone or was replaced."""
        link = self._link
        if link is None or (generation is not None and generation != self._generation):
            log.info("not sent (link gone): %s", type(message).__name__)
            return
        if isinstance(message, Error):
            self.refusals.append(message)
        with contextlib.suppress(ConnectionClosed, OSError):
            await link.send(encode_message(message))

    async def _receive_loop(self, link: Link) -> bool:
        """Handle messages on ``link``; True when the server ended the session."""
        while True:
            frame = await asyncio.wait_for(link.recv(), self._idle_timeout)
            try:
                message = parse_message(frame)
            except MessageError as exc:
                log.warning("refused server frame: %s (%s)", exc.code, exc.message)
                await self._send(error_for(exc))
                continue
            match message:
                case Transmit():
                    if self._batch is not None and not self._batch.done():
                        await self._send(
                            Error(ErrorCode.BUSY, "a batch is already running", message.id)
                        )
                    else:
                        self._batch = asyncio.create_task(
                            self._run_batch(message, self._generation)
                        )
                case Ping():
                    await self._send(Pong(message.nonce))
                case Pong():
                    pass
                case End():
                    self.end = message
                    self._show(outcome_line(message.outcome.value, message.amount, message.message))
                    with contextlib.suppress(Exception):
                        await link.close()
                    return True
                case Error():
                    log.warning("server error %s: %s", message.code, message.message)
                case _:
                    await self._send(
                        Error(ErrorCode.UNEXPECTED, f"{type(message).__name__} not expected now")
                    )

    async def _run_batch(self, transmit: Transmit, generation: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + transmit.timeout_ms / 1000
        responses: list[bytes] = []

        async def refuse(code: str, text: str) -> None:
            log.warning("batch %d refused: %s (%s)", transmit.id, code, text)
            await self._send(Error(code, text, transmit.id, tuple(responses)), generation)

        for step in transmit.apdus:
            if generation != self._generation:
                return  # the link dropped: finish nothing, the server counts it unknown
            if loop.time() >= deadline:
                return await refuse(ErrorCode.TIMEOUT, "the batch's deadline passed")
            verdict = self._guard.check(step.apdu)
            if isinstance(verdict, Ask):
                try:
                    granted = await asyncio.wait_for(
                        self._consent(verdict.request), deadline - loop.time()
                    )
                except TimeoutError:
                    return await refuse(ErrorCode.TIMEOUT, "no answer from the shopper in time")
                except Exception:
                    # A broken prompt is no "yes": answer the batch as refused, so the
                    # merchant knows for sure that nothing reached the card. The guard does
                    # not record a refusal: the shopper never said no.
                    log.exception("batch %d: the consent prompt failed", transmit.id)
                    self._show("refused: the confirmation prompt failed")
                    return await refuse(
                        ErrorCode.CONSENT_REFUSED,
                        "the shopper could not be asked: the prompt failed",
                    )
                verdict = self._guard.decide(verdict.request, granted)
                if generation != self._generation or loop.time() >= deadline:
                    return await refuse(ErrorCode.TIMEOUT, "the batch's deadline passed")
            if isinstance(verdict, Refuse):
                self._show(f"refused: {verdict.message}")
                return await refuse(verdict.code, verdict.message)
            assert isinstance(verdict, Allow)
            try:
                (response,) = await self.reader.transmit([Step(step.apdu, step.ok)])
            except CardRemoved as exc:
                self._guard.sent(step.apdu, exc.responses[0].to_bytes() if exc.responses else None)
                self._guard.card_changed()
                return await refuse(ErrorCode.CARD_REMOVED, str(exc))
            except NoCard as exc:
                self._guard.card_changed()
                code = ErrorCode.NO_CARD if not responses else ErrorCode.CARD_REMOVED
                return await refuse(code, str(exc))
            except ReaderError as exc:
                self._guard.sent(step.apdu, None)
                return await refuse(ErrorCode.READER_FAILURE, str(exc))
            raw = response.to_bytes()
            self._guard.sent(step.apdu, raw)
            responses.append(raw)
            if response.sw not in step.ok:
                return await self._send(Result(transmit.id, tuple(responses), False), generation)
        await self._send(Result(transmit.id, tuple(responses), True), generation)

    async def _watch_card(self) -> None:
        """Report the card entering and leaving the field."""
        present = self._card.present
        while True:
            try:
                if present:
                    await self.reader.wait_for_removal(3600)
                    present = False
                    self._guard.card_changed()
                    self._card = CardStatus(False)
                    await self._send(Card(CardEvent.REMOVED))
                else:
                    info = await self.reader.wait_for_card(3600)
                    present = True
                    self._guard.card_changed()
                    self._card = CardStatus(True, info.atr or None)
                    await self._send(Card(CardEvent.INSERTED, info.atr or None))
            except ReaderTimeout:
                continue
            except ReaderError as exc:
                log.warning("card watch stopped: %s", exc)
                return

    async def _resume(self) -> bool:
        """Reconnect within the grace period the server announced."""
        assert self.hello is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.hello.grace_ms / 1000
        delay = 0.05
        while loop.time() < deadline:
            try:
                link = await self._connector(self.target.ws_url)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                log.info("resume: cannot reach the server yet: %s", exc)
            else:
                try:
                    hello = await self._handshake(
                        link,
                        Resume(self.hello.resume_token, self.reader.name[:200], self._card),
                    )
                except PairingRefused as exc:
                    await link.close()
                    if exc.code in _FINAL_REFUSALS:
                        self._show(f"resume refused: {exc.message}")
                        return False
                    log.info("resume: %s, retrying", exc)
                except (ConnectionClosed, OSError) as exc:
                    log.info("resume: connection closed: %s", exc)
                else:
                    self.hello = hello
                    self._link = link
                    if hello.unknown_batch is not None:
                        self._show(
                            f"batch {hello.unknown_batch} was cut off: the merchant will check "
                            "the card for its outcome"
                        )
                    self._show("resumed")
                    return True
            # Back off before the next attempt (a retry delay, not a synchronisation).
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 2.0)
        return False
