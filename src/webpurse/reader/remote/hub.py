"""The session registry and the WebSocket endpoint the merchant app mounts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from typing import Any

from redis.exceptions import RedisError
from starlette.websockets import WebSocket, WebSocketDisconnect

from webpurse.reader.base import ReaderDisconnected, ReaderError, ReaderTimeout
from webpurse.reader.messages import (
    PROTOCOL_VERSIONS,
    AgentHello,
    Card,
    CardStatus,
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
    PairingRecord,
    Pairings,
    digest,
    utc_now,
)
from webpurse.reader.remote.reader import RemoteReader
from webpurse.reader.remote.redis_limiter import RedisCodeLimiter
from webpurse.reader.remote.redis_pairing import RedisPairings
from webpurse.reader.remote.routed import RoutedReader
from webpurse.reader.remote.routing import SESSION_TTL, RpcServer, SessionDirectory, SessionState
from webpurse.reader.remote.shared import SharedState, SharedStateUnavailable

log = logging.getLogger(__name__)

_MAX_VIOLATIONS = 8


class ReaderBusy(ReaderError):
    """The session cannot move to another process now: a batch is out on it."""


class ReaderHub:
    """Session registry and WebSocket endpoint. Mount ``hub.endpoint`` as a WebSocket route:

    ``app.add_api_websocket_route("/reader", hub.endpoint)`` (FastAPI) or
    ``WebSocketRoute("/reader", hub.endpoint)`` (Starlette).

    With ``shared`` (the shop's Redis) pairings, the code limiter and the sessions' state
    are shared by every shop process: an agent may pair on one process while the cashier
    drives its reader from another (:class:`RoutedReader`). Without it, all of it stays
    in this process. The async methods (:meth:`open_pairing`, :meth:`wait_for_reader`,
    :meth:`finish`) work either way.
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
        shared: SharedState | None = None,
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
        self.shared = shared
        self._shared_pairings: RedisPairings | None = None
        self._shared_limiter: RedisCodeLimiter | None = None
        self.directory: SessionDirectory | None = None
        self._rpc: RpcServer | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._announcing: dict[str, asyncio.Task[None]] = {}
        if shared is not None:
            self._shared_pairings = RedisPairings(shared, clock=clock)
            self._shared_limiter = RedisCodeLimiter(shared, clock=clock)
            self.directory = SessionDirectory(shared)
            self._rpc = RpcServer(shared, self.reader_for, self._hand_over)

    async def open_pairing(self, binding: str, *, display: str | None = None) -> Pairing:
        """:meth:`issue`, in the shared state when there is one (any process redeems it);
        raises :class:`~webpurse.reader.remote.shared.SharedStateUnavailable` without it."""
        if self._shared_pairings is None or self._shared_limiter is None:
            return self.issue(binding, display=display)
        wrong = await self._shared_limiter.wrong_codes()
        return await self._shared_pairings.issue(binding, display=display, wrong_codes=wrong)

    async def _code_allowed(self, client: str) -> bool:
        if self._shared_limiter is not None:
            return await self._shared_limiter.allows(client)
        return self.code_limiter.allows(client)

    async def _code_failed(self, client: str) -> None:
        if self._shared_limiter is not None:
            await self._shared_limiter.failed(client)
        else:
            self.code_limiter.failed(client)

    async def _wrong_codes(self) -> int:
        if self._shared_limiter is not None:
            return await self._shared_limiter.wrong_codes()
        return self.code_limiter.wrong_codes

    async def _redeem(self, token: str | None, code: str | None) -> PairingRecord:
        if self._shared_pairings is not None:
            return await self._shared_pairings.redeem(token=token, code=code)
        return self.pairings.redeem(token=token, code=code)

    async def _retire_code(self, record: PairingRecord) -> None:
        if self._shared_pairings is not None:
            await self._shared_pairings.retire_code(record)
        else:
            self.pairings.retire_code(record)

    def issue(self, binding: str, *, display: str | None = None) -> Pairing:
        """A pairing token and code for one payment or load id (see :class:`Pairings`)."""
        return self.pairings.issue(
            binding, display=display, wrong_codes=self.code_limiter.wrong_codes
        )

    def reader_for(self, binding: str) -> RemoteReader | None:
        reader = self._readers.get(binding)
        return None if reader is None or reader.ended else reader

    async def wait_for_reader(self, binding: str, timeout: float) -> RemoteReader | RoutedReader:
        """The reader of the agent that paired for ``binding``, once its hello is done:
        on this process, or (with shared state) on any other."""
        if self.directory is not None:
            return await self._wait_shared(self.directory, binding, timeout)
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

    async def _wait_shared(
        self, directory: SessionDirectory, binding: str, timeout: float
    ) -> RemoteReader | RoutedReader:
        me = directory.shared.node

        def paired(state: SessionState | None) -> bool:
            # A session of this process counts only while it is here (not just ended).
            local = self.reader_for(binding) is not None
            return local or (state is not None and state.node != me and state.alive)

        try:
            state = await directory.wait(binding, paired, timeout)
        except ReaderDisconnected:
            # Redis is away: an agent paired with this very process still works.
            if (reader := self.reader_for(binding)) is not None:
                return reader
            raise
        local = self.reader_for(binding)
        if local is not None:
            return local
        assert state is not None
        return RoutedReader(directory, state, batch_timeout=self.batch_timeout)

    async def finish(
        self,
        binding: str,
        outcome: Outcome,
        message: str = "",
        amount: int | None = None,
        *,
        session: str | None = None,
    ) -> None:
        """Tell the agent paired for ``binding`` the outcome and end its session, wherever
        it is connected (nothing when there is none); with ``session``, only that one."""
        reader = self.reader_for(binding)
        if reader is not None:
            if session is None or reader.session == session:
                await reader.end(outcome, message, amount)
            return
        if self.directory is None:
            return
        try:
            state = await self.directory.lookup(binding)
        except Exception:
            log.warning("could not look up the session for %s to end it", binding)
            return
        if state is None or state.node == self.directory.shared.node:
            return
        if session is None or state.session == session:
            routed = RoutedReader(self.directory, state, batch_timeout=self.batch_timeout)
            await routed.end(outcome, message, amount)

    async def _end_elsewhere(self, directory: SessionDirectory, binding: str) -> None:
        """An agent pairs here for ``binding`` while another process holds its previous
        session: end that one (its batches could no longer be routed to it)."""
        try:
            state = await directory.lookup(binding)
        except SharedStateUnavailable:
            return
        if state is not None and state.node != directory.shared.node:
            routed = RoutedReader(directory, state, batch_timeout=self.batch_timeout)
            await routed.end(Outcome.CANCELED, "another agent paired for this payment")

    async def _greet(
        self, link: Link, reader: RemoteReader, version: int, *, unknown_batch: int | None = None
    ) -> bool:
        """Tell ``reader``'s agent its session is up, with a fresh resume token (a token seen
        on a dropped path is spent); False when the agent left meanwhile."""
        try:
            await link.send(
                ServerHello(
                    version=version,
                    session=reader.session,
                    resume_token=self._new_resume_token(reader),
                    grace_ms=int(self.grace * 1000),
                    merchant=self._displays.get(reader.session),
                    unknown_batch=unknown_batch,
                )
            )
        except Exception:
            return False
        return True

    def _new_resume_token(self, reader: RemoteReader) -> str:
        """A fresh resume token for ``reader``: found by its hash here and, shared, in any
        shop process."""
        resume_token = secrets.token_urlsafe(32)
        self._by_resume[digest(resume_token)] = reader
        self._share_resume(digest(resume_token), reader)
        return resume_token

    def _unregister(self, reader: RemoteReader) -> None:
        """``reader`` is no longer this process's: its binding, resume tokens and display."""
        if self._readers.get(reader.binding) is reader:
            del self._readers[reader.binding]
        for key in [k for k, r in self._by_resume.items() if r is reader]:
            del self._by_resume[key]
        self._displays.pop(reader.session, None)
        self._changed.set()

    def _share_resume(self, key: bytes, reader: RemoteReader) -> None:
        """Let any shop process find ``reader``'s binding by its resume token's hash."""
        if self.directory is None:
            return
        shared = self.directory.shared

        async def write() -> None:
            try:
                await shared.redis.set(
                    shared.key("resume", key.hex()), reader.binding, ex=SESSION_TTL
                )
            except (RedisError, OSError) as exc:
                log.warning("session %s: resume token not shared: %s", reader.session, exc)

        task = asyncio.get_running_loop().create_task(write())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _take_over(self, directory: SessionDirectory, key: bytes) -> RemoteReader | None:
        """An agent resumes here a session another shop process holds: move it here."""
        shared = directory.shared
        try:
            raw = await shared.redis.getdel(shared.key("resume", key.hex()))
            if raw is None:
                return None
            binding = raw.decode() if isinstance(raw, bytes) else str(raw)
            state = await directory.lookup(binding)
        except (RedisError, OSError, SharedStateUnavailable) as exc:
            log.warning("resume: shared state unavailable: %s", exc)
            return None
        if state is None or not state.alive or state.node == shared.node:
            return None
        moved = await RoutedReader(directory, state, batch_timeout=self.batch_timeout).hand_over()
        if moved is None:
            return None
        atr = str(moved.get("atr") or "")
        reader = RemoteReader(
            session=state.session,
            binding=binding,
            reader_name=str(moved.get("reader", "")),
            card=CardStatus(bool(moved.get("present")), bytes.fromhex(atr) if atr else None),
            batch_timeout=self.batch_timeout,
        )
        reader._next_id = int(str(moved.get("next_id", 1)))
        lost = moved.get("lost_id")
        reader._lost_id = int(str(lost)) if lost is not None else None
        display = moved.get("display")
        old = self._readers.get(binding)
        if old is not None and not old.ended:
            await old.end(Outcome.CANCELED, "the agent resumed its newer session")
            self._forget(old)
        self._readers[binding] = reader
        self._by_resume[key] = reader
        self._displays[reader.session] = str(display) if display is not None else None
        self._start_rpc()
        log.info(
            "session %s moved here from %s (its agent resumed here)", reader.session, state.node
        )
        return reader

    async def _hand_over(self, reader: RemoteReader) -> dict[str, Any]:
        """Another shop process asks for ``reader``'s session (its agent resumed there):
        give it up unless a batch is out; its state in Redis stays (the taker rewrites it)."""
        if reader._pending is not None:
            raise ReaderBusy("a batch is in flight on this session")
        link = reader._link
        if link is not None:  # a half-dead socket: the agent is connected elsewhere now
            reader._detach(link)
            await link.close(1001, "the session moved to another shop process")
        handle = self._expiry.pop(reader.session, None)
        if handle is not None:
            handle.cancel()
        moved = {
            "reader": reader.name.removeprefix("remote:"),
            "present": reader.card.present,
            "atr": (reader.card.atr or b"").hex(),
            "next_id": reader._next_id,
            "lost_id": reader._take_lost_batch(),
            "display": self._displays.get(reader.session),
        }
        reader.moved = True
        reader._expire()  # ended here: a cashier here finds the session where it went
        self._unregister(reader)
        log.info("session %s handed over (its agent resumed elsewhere)", reader.session)
        return moved

    def _announce(self, reader: RemoteReader) -> None:
        """Publish ``reader``'s state to the shared state, in the background and in order
        per binding: an old session's last word (it dropped, it ended) never lands after
        the announcement of the session that replaced it."""
        if self.directory is None or reader.moved:
            return
        directory = self.directory
        binding = reader.binding
        previous = self._announcing.get(binding)

        async def write() -> None:
            if previous is not None:
                with contextlib.suppress(BaseException):
                    await previous
            if reader.ended:
                await directory.forget(reader)
            else:
                await directory.publish(reader)

        task = asyncio.get_running_loop().create_task(write())
        self._announcing[binding] = task
        self._background.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._background.discard(finished)
            if self._announcing.get(binding) is finished:
                del self._announcing[binding]

        task.add_done_callback(done)

    async def close(self) -> None:
        """End every session (server shutdown)."""
        if self._rpc is not None:
            await self._rpc.close()
        for reader in list(self._readers.values()):
            await reader.end(Outcome.CANCELED, "the merchant server is shutting down")
        for handle in self._expiry.values():
            handle.cancel()
        self._readers.clear()
        self._by_resume.clear()
        for task in list(self._background):
            with contextlib.suppress(BaseException):
                await task

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
                    self._announce(reader)
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
        if hello.code is not None and not await self._code_allowed(client):
            await self._refuse(link, ErrorCode.TOKEN_INVALID, "too many wrong codes; wait")
            return None
        try:
            record = await self._redeem(hello.token, hello.code)
        except PairingError as exc:
            if hello.code is not None:
                await self._code_failed(client)
            await self._refuse(link, ErrorCode.TOKEN_INVALID, str(exc))
            return None
        guessed = await self._wrong_codes() - record.wrong_codes_at_issue
        if hello.code is not None and guessed > CODE_GUESS_BUDGET:
            log.warning("code for %s retired after %d wrong codes", record.binding, guessed)
            await self._retire_code(record)
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
        elif self.directory is not None:
            await self._end_elsewhere(self.directory, record.binding)
        reader = RemoteReader(
            session="ses_" + secrets.token_urlsafe(12),
            binding=record.binding,
            reader_name=hello.reader,
            card=hello.card,
            batch_timeout=self.batch_timeout,
        )
        self._readers[record.binding] = reader
        self._displays[reader.session] = record.display
        if not await self._greet(link, reader, max(common)):
            log.warning("agent for %s left during hello", record.binding)
            self._forget(reader)
            return None
        reader._attach(link, hello.card, hello.reader)
        self._start_rpc()
        self._announce(reader)
        log.info("agent paired: session %s for %s", reader.session, record.binding)
        self._changed.set()
        return reader

    async def _resume(self, link: Link, resume: Resume) -> RemoteReader | None:
        key = digest(resume.resume_token)
        reader = self._by_resume.get(key)
        if reader is None and self.directory is not None:
            reader = await self._take_over(self.directory, key)
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
        # A fresh resume token each time (_greet): a token seen on a dropped path is spent.
        del self._by_resume[key]
        lost = reader._take_lost_batch()
        if not await self._greet(link, reader, max(PROTOCOL_VERSIONS), unknown_batch=lost):
            log.warning("agent of session %s left during resume", reader.session)
            reader._lost_id = lost
            self._start_grace(reader)
            return None
        reader._attach(link, resume.card, resume.reader)
        self._announce(reader)
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
                    if isinstance(message, Card):
                        self._announce(reader)
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

    def _start_rpc(self) -> None:
        if self._rpc is not None:
            self._rpc.start()

    def _forget(self, reader: RemoteReader) -> None:
        self._announce(reader)
        self._unregister(reader)
