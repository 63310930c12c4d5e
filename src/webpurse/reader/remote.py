"""The merchant's side of the remote-reader protocol (``docs/remote-reader.md``).

- :class:`Pairings` issues the single-use pairing token (and its short code) for one
  payment or load, behind a small :class:`PairingStore` (in memory by default), with an
  injected clock;
- :class:`ReaderHub` is the session registry and the WebSocket endpoint the merchant app
  mounts; it turns each agent connection into a :class:`RemoteReader`;
- :class:`RemoteReader` implements :class:`webpurse.reader.base.Reader` over that
  connection, so the purchase and load flows do not care where the reader is.

A dropped socket keeps the session for a grace period: a batch that was out when it
dropped fails with :class:`~webpurse.reader.base.OutcomeUnknown` (it is never re-sent);
the agent reconnects with its resume token and the reader works again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ipaddress
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect

from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.base import (
    BatchRefused,
    CardInfo,
    CardRemoved,
    NoCard,
    OutcomeUnknown,
    ReaderDisconnected,
    ReaderTimeout,
    Step,
)
from webpurse.reader.messages import (
    MAX_BATCH_APDUS,
    MAX_TIMEOUT_MS,
    PROTOCOL_VERSIONS,
    AgentHello,
    ApduStep,
    Card,
    CardEvent,
    CardStatus,
    End,
    Error,
    ErrorCode,
    Message,
    MessageError,
    Outcome,
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

Clock = Callable[[], dt.datetime]

PAIRING_LIFETIME = dt.timedelta(minutes=5)
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"  # no 0/O, 1/I/L, U: easy to type
CODE_LENGTH = 8
_MAX_VIOLATIONS = 8
CODE_ATTEMPTS = 10
"""Failed code pairings allowed per client address per :data:`PAIRING_LIFETIME`."""
CODE_SITE_ATTEMPTS = 100
"""Failed code pairings allowed per IPv6 /48 (all its /64s together) per window."""
CODE_GUESS_BUDGET = 100_000
"""Wrong codes the hub may see (from anyone) while one pairing is open before that
pairing's code is retired: each code is one of 30⁸, so its chance of being guessed stays
below 2 × 10⁻⁷ however many networks guess (the token and link still work)."""
CODE_CLIENTS = 10_000
"""Client networks with recent wrong codes the hub remembers at most (see :class:`CodeLimiter`)."""


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _digest(secret: str) -> bytes:
    """Stores keep only hashes of tokens, codes and resume tokens: a dump reveals none."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def normalise_code(code: str) -> str:
    """What the shopper typed, without separators and case: ``abcd-efgh`` → ``ABCDEFGH``."""
    return "".join(ch for ch in code.upper() if ch not in " -")


# --- pairing --------------------------------------------------------------------------


class PairingError(Exception):
    """A token or code that is unknown, already used or expired (``token_invalid``)."""

    code = ErrorCode.TOKEN_INVALID


@dataclass(frozen=True, slots=True)
class Pairing:
    """What the merchant hands the payment page: the token, the code, and when they lapse.

    ``token`` and ``code`` are secrets: show them to the shopper's page only, never log.
    """

    token: str
    code: str
    binding: str
    expires_at: dt.datetime

    @property
    def display_code(self) -> str:
        return f"{self.code[:4]}-{self.code[4:]}"

    def __repr__(self) -> str:
        return f"Pairing(binding={self.binding!r}, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True, slots=True)
class PairingRecord:
    token_hash: bytes
    code_hash: bytes
    binding: str
    display: str | None
    expires_at: dt.datetime
    # The hub's count of wrong codes when this pairing was issued (CODE_GUESS_BUDGET).
    wrong_codes_at_issue: int = 0


class PairingStore(Protocol):
    """Where issued pairings wait to be redeemed. ``take_*`` removes atomically."""

    def put(self, record: PairingRecord) -> bool:
        """Store it; False if its token or code hash is already taken."""
        ...

    def take_by_token(self, token_hash: bytes) -> PairingRecord | None: ...

    def take_by_code(self, code_hash: bytes) -> PairingRecord | None: ...

    def purge(self, now: dt.datetime) -> None:
        """Forget records that expired before ``now``."""
        ...


class MemoryPairingStore:
    """The default store: one process, nothing survives a restart (a pairing lives 5 min)."""

    def __init__(self) -> None:
        self._by_token: dict[bytes, PairingRecord] = {}
        self._by_code: dict[bytes, PairingRecord] = {}

    def put(self, record: PairingRecord) -> bool:
        if record.token_hash in self._by_token or record.code_hash in self._by_code:
            return False
        self._by_token[record.token_hash] = record
        self._by_code[record.code_hash] = record
        return True

    def _remove(self, record: PairingRecord) -> PairingRecord:
        self._by_token.pop(record.token_hash, None)
        self._by_code.pop(record.code_hash, None)
        return record

    def take_by_token(self, token_hash: bytes) -> PairingRecord | None:
        record = self._by_token.get(token_hash)
        return None if record is None else self._remove(record)

    def take_by_code(self, code_hash: bytes) -> PairingRecord | None:
        record = self._by_code.get(code_hash)
        return None if record is None else self._remove(record)

    def purge(self, now: dt.datetime) -> None:
        for record in [r for r in self._by_token.values() if r.expires_at <= now]:
            self._remove(record)


class Pairings:
    """Issues and redeems pairings: token (256 bits) and code (8 characters), single use,
    one shared lifetime, bound to one payment or load id. Redeeming either spends both."""

    def __init__(
        self,
        store: PairingStore | None = None,
        *,
        clock: Clock = utc_now,
        lifetime: dt.timedelta = PAIRING_LIFETIME,
    ) -> None:
        self._store: PairingStore = store if store is not None else MemoryPairingStore()
        self._clock = clock
        self._lifetime = lifetime

    def issue(self, binding: str, *, display: str | None = None, wrong_codes: int = 0) -> Pairing:
        """A new pairing for ``binding`` (e.g. ``pay_…``); ``display`` is shown by the agent
        as secondary text (the trusted lines are the origin and the card's amount);
        ``wrong_codes`` is the hub's count of wrong codes now (:data:`CODE_GUESS_BUDGET`)."""
        now = self._clock()
        self._store.purge(now)
        expires = now + self._lifetime
        while True:
            token = secrets.token_urlsafe(32)
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
            record = PairingRecord(
                _digest(token), _digest(code), binding, display, expires, wrong_codes
            )
            if self._store.put(record):
                return Pairing(token, code, binding, expires)

    def retire_code(self, record: PairingRecord) -> None:
        """Put ``record`` (taken by its code) back with its token only: the code is dead,
        the link and the token still pair."""
        dead = replace(record, code_hash=_digest(secrets.token_urlsafe(32)))
        self._store.put(dead)

    def redeem(self, *, token: str | None = None, code: str | None = None) -> PairingRecord:
        """Spend a token or a code; raises :class:`PairingError` if unknown, used or expired."""
        if token is not None:
            record = self._store.take_by_token(_digest(token))
        elif code is not None:
            record = self._store.take_by_code(_digest(normalise_code(code)))
        else:
            record = None
        if record is None:
            raise PairingError("pairing token or code unknown or already used")
        if self._clock() >= record.expires_at:
            raise PairingError("pairing token or code expired")
        return record


def client_network(host: str) -> tuple[str, str]:
    """The networks a client's wrong codes count against: (its own, the wider one).

    An IPv6 client owns its whole /64 (any host can take any address in it), so the /64 is
    the client; the /48 around it (one site's allocation) is the wider network. An IPv4
    address is the client and its own wider network (addresses are scarce). Anything else
    (a test client's name) is itself.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host, host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv4Address):
        return str(address), str(address)
    narrow = ipaddress.IPv6Network((address, 64), strict=False)
    wide = ipaddress.IPv6Network((address, 48), strict=False)
    return str(narrow), str(wide)


class CodeLimiter:
    """Bounds wrong short-code guesses per client network: at most ``attempts`` within
    ``window`` per IPv4 address or IPv6 /64 (an 8-character code is guessable by brute
    force), and ``wide_attempts`` per IPv6 /48.

    Memory is bounded too: a network's failures are forgotten once the newest is older
    than ``window`` (swept on every call, oldest first), and at most ``max_clients``
    networks are remembered. A /64 is one entry however many addresses it uses, and a /48
    stops being let in (and so stops adding /64 entries) after ``wide_attempts``, so filling
    the table takes ``max_clients / wide_attempts`` separate /48 sites. When it is full, a
    network it does not hold may still try (it is not remembered): the table filling must
    not lock every shopper out. What bounds guessing then is per pairing: every wrong code
    counts in :attr:`wrong_codes`, and a pairing's code is retired once the hub has seen
    :data:`CODE_GUESS_BUDGET` wrong codes since it was issued (``ReaderHub``).
    """

    def __init__(
        self,
        *,
        clock: Clock = utc_now,
        window: dt.timedelta = PAIRING_LIFETIME,
        attempts: int = CODE_ATTEMPTS,
        wide_attempts: int = CODE_SITE_ATTEMPTS,
        max_clients: int = CODE_CLIENTS,
    ) -> None:
        self._clock = clock
        self._window = window
        self._attempts = attempts
        self._wide_attempts = wide_attempts
        self._max_clients = max_clients
        # network → its failure times within the window; ordered by newest failure, oldest first
        self._failures: OrderedDict[str, list[dt.datetime]] = OrderedDict()
        self._wide: OrderedDict[str, list[dt.datetime]] = OrderedDict()
        self.wrong_codes = 0  # every wrong code ever, remembered or not

    def __len__(self) -> int:
        """Client networks remembered now."""
        return len(self._failures)

    def _sweep(self, table: OrderedDict[str, list[dt.datetime]], since: dt.datetime) -> None:
        while table:
            key, times = next(iter(table.items()))
            if times[-1] > since:
                break
            del table[key]

    def _recent(
        self, table: OrderedDict[str, list[dt.datetime]], key: str, since: dt.datetime
    ) -> int | None:
        times = table.get(key)
        if times is None:
            return None
        recent = [t for t in times if t > since]
        if not recent:  # only if the clock went back: stale behind a fresher entry
            del table[key]
            return None
        table[key] = recent  # order unchanged: its newest failure is the same
        return len(recent)

    def allows(self, client: str) -> bool:
        """May ``client`` (its address) try a code now?"""
        since = self._clock() - self._window
        self._sweep(self._failures, since)
        self._sweep(self._wide, since)
        narrow, wide = client_network(client)
        if narrow != wide and (self._recent(self._wide, wide, since) or 0) >= self._wide_attempts:
            return False
        count = self._recent(self._failures, narrow, since)
        if count is None:
            if len(self._failures) >= self._max_clients:
                log.warning("code limiter full (%d networks): %s not remembered", len(self), narrow)
            return True
        return count < self._attempts

    def _record(self, table: OrderedDict[str, list[dt.datetime]], key: str, keep: int) -> None:
        now = self._clock()
        times = table.pop(key, None)
        if times is None and len(table) >= self._max_clients:
            return  # full: ``allows`` refuses this network anyway
        recent = [t for t in times or () if t > now - self._window]
        recent.append(now)
        table[key] = recent[-keep:]  # newest failure: to the end

    def failed(self, client: str) -> None:
        """``client`` (its address) tried a wrong code."""
        self.wrong_codes += 1
        since = self._clock() - self._window
        self._sweep(self._failures, since)
        self._sweep(self._wide, since)
        narrow, wide = client_network(client)
        self._record(self._failures, narrow, self._attempts)
        if narrow != wide:
            self._record(self._wide, wide, self._wide_attempts)


# --- the reader -----------------------------------------------------------------------


class _Link:
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


class RemoteReader:
    """A :class:`~webpurse.reader.base.Reader` at the far end of an agent's WebSocket.

    One batch at a time. ``transmit`` raises :class:`NoCard` when the agent reports no
    card, :class:`ReaderDisconnected` when no link is up (nothing sent),
    :class:`OutcomeUnknown` when the link dropped or the deadline passed with the batch
    out, or the agent's reader failed during a step (``reader_failure``: that step may have
    reached the card), :class:`CardRemoved` when the agent saw the card leave mid-batch, and
    :class:`BatchRefused` when the agent refused a step (the shopper said no, an amount
    differs from the confirmed one, …).
    """

    def __init__(
        self,
        *,
        session: str,
        binding: str,
        reader_name: str,
        card: CardStatus,
        batch_timeout: float = 60.0,
    ) -> None:
        self.session = session
        self.binding = binding
        self.batch_timeout = batch_timeout
        self._reader_name = reader_name
        self._card = card
        self._link: _Link | None = None
        self._changed = asyncio.Event()
        self._batch_lock = asyncio.Lock()
        self._next_id = 1
        self._pending_id: int | None = None
        self._pending: asyncio.Future[Result] | None = None
        self._lost_id: int | None = None
        self.ended = False

    # Reader interface

    @property
    def name(self) -> str:
        return f"remote:{self._reader_name}"

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def card(self) -> CardStatus:
        return self._card

    async def _wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if self.ended:
                raise ReaderDisconnected("the remote reader's session has ended")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ReaderTimeout(f"{what} within {timeout:g} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_for_card(self, timeout: float) -> CardInfo:
        await self._wait_until(
            lambda: self._link is not None and self._card.present, timeout, "no card"
        )
        return CardInfo(self.name, self._card.atr or b"")

    async def wait_for_removal(self, timeout: float) -> None:
        await self._wait_until(
            lambda: self._link is not None and not self._card.present,
            timeout,
            "card still present",
        )

    async def wait_connected(self, timeout: float) -> None:
        """Return when the agent's link is up (e.g. after it resumed)."""
        await self._wait_until(lambda: self._link is not None, timeout, "agent not connected")

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        if not 1 <= len(batch) <= MAX_BATCH_APDUS:
            raise ValueError(f"a remote batch holds 1 to {MAX_BATCH_APDUS} steps")
        async with self._batch_lock:
            link = self._link
            if self.ended or link is None:
                raise ReaderDisconnected("the agent is not connected")
            if not self._card.present:
                raise NoCard("no card on the agent's reader")
            msg_id = self._next_id
            self._next_id += 1
            timeout_ms = min(MAX_TIMEOUT_MS, max(1, int(self.batch_timeout * 1000)))
            message = Transmit(
                msg_id, tuple(ApduStep(s.apdu, frozenset(s.ok)) for s in batch), timeout_ms
            )
            future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            self._pending_id, self._pending = msg_id, future
            try:
                try:
                    await link.send(message)
                except Exception:
                    raise ReaderDisconnected("the agent's link closed before the batch") from None
                # The agent stops starting steps at its deadline; allow for the wire.
                try:
                    result = await asyncio.wait_for(future, timeout_ms / 1000 + 5.0)
                except TimeoutError:
                    self._lost_id = msg_id
                    log.warning("remote batch %d timed out: outcome unknown", msg_id)
                    raise OutcomeUnknown(
                        f"batch {msg_id}: no result within {timeout_ms} ms"
                    ) from None
            finally:
                self._pending_id, self._pending = None, None
            return self._check_result(batch, result)

    def _check_result(self, batch: Sequence[Step], result: Result) -> list[ResponseApdu]:
        responses = [ResponseApdu.from_bytes(r) for r in result.responses]
        n = len(responses)
        coherent = 1 <= n <= len(batch) and all(
            r.sw in s.ok for r, s in zip(responses[:-1], batch, strict=False)
        )
        if coherent:
            last_ok = responses[-1].sw in batch[n - 1].ok
            coherent = (n == len(batch) and last_ok) if result.complete else not last_ok
        if not coherent:
            self._lost_id = result.id
            raise OutcomeUnknown(f"batch {result.id}: incoherent result from the agent")
        return responses

    async def end(self, outcome: Outcome, message: str = "", amount: int | None = None) -> None:
        """Tell the agent the outcome to display, and close the session."""
        link, self._link = self._link, None
        self.ended = True
        self._changed.set()
        if link is not None:
            with contextlib.suppress(Exception):
                await link.send(End(outcome, message, amount))
            await link.close(1000, "end")

    # called by the hub ------------------------------------------------------------------

    def _attach(self, link: _Link, card: CardStatus, reader_name: str) -> None:
        self._link = link
        self._card = card
        self._reader_name = reader_name
        self._changed.set()

    def _detach(self, link: _Link) -> bool:
        """The socket ``link`` is gone; True if it was this session's live one."""
        if self._link is not link:
            return False
        self._link = None
        if self._pending is not None and not self._pending.done():
            self._lost_id = self._pending_id
            self._pending.set_exception(
                OutcomeUnknown(f"batch {self._pending_id}: the agent's link dropped mid-batch")
            )
        self._changed.set()
        return True

    def _take_lost_batch(self) -> int | None:
        lost, self._lost_id = self._lost_id, None
        return lost

    def _expire(self) -> None:
        self.ended = True
        self._changed.set()

    def on_message(self, message: Message) -> Message | None:
        """Handle one message from the agent; return the reply to send, if any."""
        match message:
            case Result():
                if message.id != self._pending_id or self._pending is None:
                    log.warning("refused agent result: no batch %d in flight", message.id)
                    return Error(
                        ErrorCode.UNKNOWN_ID, f"no batch {message.id} in flight", message.id
                    )
                if not self._pending.done():
                    self._pending.set_result(message)
                return None
            case Error():
                if message.id is not None and message.id == self._pending_id:
                    if self._pending is not None and not self._pending.done():
                        self._pending.set_exception(self._batch_error(message))
                else:
                    log.info("agent error %s: %s", message.code, message.message)
                return None
            case Card():
                self._card = CardStatus(message.event is CardEvent.INSERTED, message.atr)
                self._changed.set()
                return None
            case Ping():
                return Pong(message.nonce)
            case Pong():
                return None
        return Error(ErrorCode.UNEXPECTED, f"{type(message).__name__} not expected now")

    @staticmethod
    def _batch_error(error: Error) -> Exception:
        responses = [ResponseApdu.from_bytes(r) for r in error.responses]
        if error.code == ErrorCode.CARD_REMOVED:
            return CardRemoved(f"card removed: {error.message}", responses)
        if error.code == ErrorCode.NO_CARD and not responses:
            return NoCard(error.message)
        if error.code == ErrorCode.READER_FAILURE:
            # The reader failed while the step after ``responses`` may have reached the
            # card: not "nothing happened" but unknown; the card's counter settles it.
            return OutcomeUnknown(f"reader failure: {error.message}", responses)
        return BatchRefused(error.code, error.message, responses)


# --- the hub --------------------------------------------------------------------------


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
        link = _Link(websocket)
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

    async def _receive(self, link: _Link, timeout: float) -> Message | MessageError | None:
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

    async def _refuse(self, link: _Link, code: ErrorCode, text: str) -> None:
        log.warning("refused agent connection: %s (%s)", code, text)
        with contextlib.suppress(Exception):
            await link.send(Error(code.value, text))
        await link.close(1008, code.value)

    async def _handshake(self, link: _Link) -> RemoteReader | None:
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

    async def _hello(self, link: _Link, hello: AgentHello) -> RemoteReader | None:
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
        self._by_resume[_digest(resume_token)] = reader
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

    async def _resume(self, link: _Link, resume: Resume) -> RemoteReader | None:
        key = _digest(resume.resume_token)
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
        self._by_resume[_digest(resume_token)] = reader
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

    async def _serve(self, link: _Link, reader: RemoteReader) -> None:
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

    async def _ping(self, link: _Link) -> None:
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


__all__ = [
    "CODE_ALPHABET",
    "CODE_ATTEMPTS",
    "MemoryPairingStore",
    "Pairing",
    "PairingError",
    "PairingRecord",
    "PairingStore",
    "Pairings",
    "ReaderHub",
    "RemoteReader",
    "normalise_code",
]
