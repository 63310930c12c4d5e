"""The merchant's :class:`~webpurse.reader.base.Reader` over an agent's WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

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
    ApduStep,
    Card,
    CardEvent,
    CardStatus,
    End,
    Error,
    ErrorCode,
    Message,
    Outcome,
    Ping,
    Pong,
    Result,
    Transmit,
)
from webpurse.reader.remote.link import Link

log = logging.getLogger(__name__)


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
        self._link: Link | None = None
        self._changed = asyncio.Event()
        self._batch_lock = asyncio.Lock()
        self._next_id = 1
        self._pending_id: int | None = None
        self._pending: asyncio.Future[Result] | None = None
        self._lost_id: int | None = None
        self.ended = False
        self.moved = False
        """Handed over to another shop process (its agent resumed there)."""

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

    def _attach(self, link: Link, card: CardStatus, reader_name: str) -> None:
        self._link = link
        self._card = card
        self._reader_name = reader_name
        self._changed.set()

    def _detach(self, link: Link) -> bool:
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
