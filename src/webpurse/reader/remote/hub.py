"""The session registry and the WebSocket endpoint the merchant app mounts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from starlette.websockets import WebSocket, WebSocketDisconnect

from webpurse.reader.base import ReaderTimeout
from webpurse.reader.messages import (
    PROTOCOL_VERSIONS,
    AgentHello,
    Error,
    ErrorCode,
    Message,
    MessageError,
    Outcome,
    Ping,
    Resume,
    ServerHello,
    error_for,
    parse_message,
)
from webpurse.reader.remote.limiter import CODE_GUESS_BUDGET, CodeLimiter
from webpurse.reader.remote.link import Link
from webpurse.reader.remote.pairing import (
    Clock,
    Pairing,
    PairingError,
    Pairings,
    digest,
    utc_now,
)
from webpurse.reader.remote.reader import RemoteReader

log = logging.getLogger(__name__)

_MAX_VIOLATIONS = 8


class ReaderHub:
    """Session registry and WebSocket endpoint. Mount ``hub.endpoint`` as a WebSocket route:

    ``app.add_api_websocket_route("/reader", hub.endpoint)`` (FastAPI) or
    ``WebSocketRoute("/reader", hub.endpoint)`` (Starlette).
    """

    def __init__(
        self,
        pairings: Pairings | None = None,
        *,
        clock: Clock = utc_now,
        grace: float = 30.0,
        batch_timeout: float = 60.0,
        hello_timeout: float = 10.0,
        ping_interval: float = 15.0,
    ) -> None:
        self.pairings = pairings if pairings is not None else Pairings(clock=clock)
        self.grace = grace
        self.batch_timeout = batch_timeout
        self.hello_timeout = hello_timeout
        self.ping_interval = ping_interval
        self._readers: dict[str, RemoteReader] = {}
        self._by_resume: dict[bytes, RemoteReader] = {}
        self._displays: dict[str, str | None] = {}
        self._changed = asyncio.Event()
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._clock = clock
        self.code_limiter = CodeLimiter(clock=clock)

    def issue(self, binding: str, *, display: str | None = None) -> Pairing:
        """A pairing token and code for one payment or load id (see :class:`Pairings`)."""
        return self.pairings.issue(
            binding, display=display, wrong_codes=self.code_limiter.wrong_codes
        )

    def reader_for(self, binding: str) -> RemoteReader | None:
        reader = self._readers.get(binding)
        return None if reader is None or reader.ended else reader

    async def wait_for_reader(self, binding: str, timeout: float) -> RemoteReader:
        """The reader of the agent that paired for ``binding``, once its hello is done."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (reader := self.reader_for(binding)) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ReaderTimeout(f"no agent paired for {binding} within {timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return reader

    async def close(self) -> None:
        """End every session (server shutdown)."""
        for reader in list(self._readers.values()):
            await reader.end(Outcome.CANCELED, "the merchant server is shutting down")
        for handle in self._expiry.values():
            handle.cancel()
        self._readers.clear()
        self._by_resume.clear()

    # -- the endpoint ---------------------------------------------------------------------

    async def endpoint(self, websocket: WebSocket) -> None:
        """One agent connection: hello or resume, then messages until it closes."""
        await websocket.accept()
        link = Link(websocket)
        try:
            reader = await self._handshake(link)
            if reader is None:
                return
            try:
                await self._serve(link, reader)
            finally:
                if reader._detach(link):
                    self._start_grace(reader)
                elif reader.ended:
                    self._forget(reader)
        except WebSocketDisconnect:
            return
        except Exception:
            # One broken connection must not take anything else down; it is logged.
            log.exception("remote-reader connection failed")
        finally:
            await link.close()

    async def _receive(self, link: Link, timeout: float) -> Message | MessageError | None:
        """The next message, a refusal to answer, or None when the socket closed."""
        try:
            event = await asyncio.wait_for(link.websocket.receive(), timeout)
        except TimeoutError:
            return MessageError(ErrorCode.TIMEOUT, f"nothing received for {timeout:g} s")
        if event["type"] == "websocket.disconnect":
            return None
        frame = event.get("text")
        if frame is None:
            frame = event.get("bytes") or b""
        try:
            return parse_message(frame)
        except MessageError as exc:
            log.warning("refused agent frame: %s (%s)", exc.code, exc.message)
            return exc

    async def _refuse(self, link: Link, code: ErrorCode, text: str) -> None:
        log.warning("refused agent connection: %s (%s)", code, text)
        with contextlib.suppress(Exception):
            await link.send(Error(code.value, text))
        await link.close(1008, code.value)

    async def _handshake(self, link: Link) -> RemoteReader | None:
        first = await self._receive(link, self.hello_timeout)
        if first is None:
            return None
        if isinstance(first, MessageError):
            await self._refuse(link, first.code, first.message)
            return None
        if isinstance(first, AgentHello):
            return await self._hello(link, first)
        if isinstance(first, Resume):
            return await self._resume(link, first)
        await self._refuse(link, ErrorCode.UNEXPECTED, "the first message must be hello or resume")
        return None

    async def _hello(self, link: Link, hello: AgentHello) -> RemoteReader | None:
        common = set(hello.versions) & set(PROTOCOL_VERSIONS)
        if not common:
            await self._refuse(
                link,
                ErrorCode.UNSUPPORTED_VERSION,
                f"server speaks versions {list(PROTOCOL_VERSIONS)}",
            )
            return None
        client = link.websocket.client.host if link.websocket.client else "?"
        if hello.code is not None and not self.code_limiter.allows(client):
            await self._refuse(link, ErrorCode.TOKEN_INVALID, "too many wrong codes; wait")
            return None
        try:
            record = self.pairings.redeem(token=hello.token, code=hello.code)
        except PairingError as exc:
            if hello.code is not None:
                self.code_limiter.failed(client)
            await self._refuse(link, ErrorCode.TOKEN_INVALID, str(exc))
            return None
        guessed = self.code_limiter.wrong_codes - record.wrong_codes_at_issue
        if hello.code is not None and guessed > CODE_GUESS_BUDGET:
            log.warning("code for %s retired after %d wrong codes", record.binding, guessed)
            self.pairings.retire_code(record)
            await self._refuse(
                link,
                ErrorCode.TOKEN_INVALID,
                "this code was retired after too many wrong codes here; pair with the link",
            )
            return None
        old = self._readers.get(record.binding)
        if old is not None and not old.ended:
            await old.end(Outcome.CANCELED, "another agent paired for this payment")
            self._forget(old)
        reader = RemoteReader(
            session="ses_" + secrets.token_urlsafe(12),
            binding=record.binding,
            reader_name=hello.reader,
            card=hello.card,
            batch_timeout=self.batch_timeout,
        )
        resume_token = secrets.token_urlsafe(32)
        self._readers[record.binding] = reader
        self._by_resume[digest(resume_token)] = reader
        self._displays[reader.session] = record.display
        try:
            await link.send(
                ServerHello(
                    version=max(common),
                    session=reader.session,
                    resume_token=resume_token,
                    grace_ms=int(self.grace * 1000),
                    merchant=record.display,
                )
            )
        except Exception:
            log.warning("agent for %s left during hello", record.binding)
            self._forget(reader)
            return None
        reader._attach(link, hello.card, hello.reader)
        log.info("agent paired: session %s for %s", reader.session, record.binding)
        self._changed.set()
        return reader

    async def _resume(self, link: Link, resume: Resume) -> RemoteReader | None:
        key = digest(resume.resume_token)
        reader = self._by_resume.get(key)
        if reader is None or reader.ended:
            await self._refuse(link, ErrorCode.SESSION_EXPIRED, "no such session, or it expired")
            return None
        if reader._link is not None:  # a half-dead socket the server has not noticed yet
            old = reader._link
            reader._detach(old)
            await old.close(1001, "superseded by resume")
        handle = self._expiry.pop(reader.session, None)
        if handle is not None:
            handle.cancel()
        # A fresh resume token each time: a token seen on a dropped path is spent.
        del self._by_resume[key]
        resume_token = secrets.token_urlsafe(32)
        self._by_resume[digest(resume_token)] = reader
        lost = reader._take_lost_batch()
        try:
            await link.send(
                ServerHello(
                    version=max(PROTOCOL_VERSIONS),
                    session=reader.session,
                    resume_token=resume_token,
                    grace_ms=int(self.grace * 1000),
                    merchant=self._displays.get(reader.session),
                    unknown_batch=lost,
                )
            )
        except Exception:
            log.warning("agent of session %s left during resume", reader.session)
            reader._lost_id = lost
            self._start_grace(reader)
            return None
        reader._attach(link, resume.card, resume.reader)
        log.info("agent resumed session %s", reader.session)
        self._changed.set()
        return reader

    async def _serve(self, link: Link, reader: RemoteReader) -> None:
        pinger = asyncio.create_task(self._ping(link))
        violations = 0
        try:
            while not link.closed:
                message = await self._receive(link, 3 * self.ping_interval)
                if message is None:
                    return
                if isinstance(message, MessageError):
                    if message.code is ErrorCode.TIMEOUT:
                        log.warning("session %s: agent silent, dropping link", reader.session)
                        return
                    reply: Message | None = error_for(message)
                else:
                    reply = reader.on_message(message)
                if isinstance(reply, Error):
                    violations += 1
                if reply is not None:
                    await link.send(reply)
                if violations >= _MAX_VIOLATIONS:
                    await self._refuse(link, ErrorCode.MALFORMED, "too many refused messages")
                    return
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger

    async def _ping(self, link: Link) -> None:
        n = 0
        with contextlib.suppress(Exception):
            while not link.closed:
                await asyncio.sleep(self.ping_interval)
                n += 1
                await link.send(Ping(str(n)))

    def _start_grace(self, reader: RemoteReader) -> None:
        if reader.ended:
            self._forget(reader)
            return
        loop = asyncio.get_running_loop()
        self._expiry[reader.session] = loop.call_later(self.grace, self._expire, reader)
        log.info("session %s: link dropped, %g s to resume", reader.session, self.grace)

    def _expire(self, reader: RemoteReader) -> None:
        self._expiry.pop(reader.session, None)
        if reader._link is None:
            log.info("session %s expired without resume", reader.session)
            reader._expire()
            self._forget(reader)

    def _forget(self, reader: RemoteReader) -> None:
        if self._readers.get(reader.binding) is reader:
            del self._readers[reader.binding]
        for key in [k for k, r in self._by_resume.items() if r is reader]:
            del self._by_resume[key]
        self._displays.pop(reader.session, None)
        self._changed.set()
