"""The one reader interface every backend and ``RemoteReader`` implement.

A batch is a list of :class:`Step` (an APDU and the status words that count as success
for it). ``transmit`` sends them in order and stops at the first response whose status
word is not in its step's ``ok`` set; 61xx (GET RESPONSE) and 6Cxx (wrong Le) are
handled transparently by the backend before that check. The merchant's flows use only
this interface, so they do not care whether the reader is in process, on PC/SC, or at
the other end of a WebSocket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from webpurse.protocol.apdu import ResponseApdu

SUCCESS: frozenset[int] = frozenset({0x9000})


@dataclass(frozen=True, slots=True)
class Step:
    """One APDU of a batch, and the status words after which the batch goes on."""

    apdu: bytes
    ok: frozenset[int] = field(default=SUCCESS)


@dataclass(frozen=True, slots=True)
class CardInfo:
    """What a reader knows about the card in its field: the ATR, and the reader's name."""

    reader: str
    atr: bytes


class ReaderError(Exception):
    """Base class of reader failures."""


class NoCard(ReaderError):
    """No card in the field (not presented yet, or removed before the batch began)."""


class CardRemoved(ReaderError):
    """The card left the field, or the link to it broke, during a batch.

    ``responses`` holds the answers received before the break. The APDU after them may or
    may not have reached the card: its outcome is unknown and must be recovered (spec §6),
    never guessed.
    """

    def __init__(self, message: str, responses: Sequence[ResponseApdu] = ()) -> None:
        super().__init__(message)
        self.responses = list(responses)


class ReaderTimeout(ReaderError):
    """No card (or no answer) within the time allowed."""


class OutcomeUnknown(CardRemoved):
    """A remote reader's link broke (or its deadline passed) while a batch was out, or the
    agent's reader failed during a step (``reader_failure``).

    After a broken link whether the agent ran any step is unknown: ``responses`` is empty
    and the whole batch must be treated as possibly executed. After a reader failure
    ``responses`` holds the answers before the failing step, which may have reached the
    card. Either way: recover per spec §6, never re-send. Raised by ``RemoteReader``; a
    ``CardRemoved``, so flows need no special case.
    """


class ReaderDisconnected(NoCard):
    """A remote reader has no live link (dropped and not resumed yet, or its session
    ended); nothing of this batch was sent."""


class BatchRefused(ReaderError):
    """The far end refused the batch before or at one of its steps, with a stable ``code``.

    The step at ``len(responses)`` (and every later one) never reached the card; the
    steps before it did, with these ``responses``. Codes: ``docs/remote-reader.md``
    (e.g. ``consent_refused``, ``amount_mismatch``, ``apdu_not_allowed``).
    """

    def __init__(self, code: str, message: str, responses: Sequence[ResponseApdu] = ()) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.responses = list(responses)


@runtime_checkable
class Reader(Protocol):
    """A card reader, local or remote."""

    @property
    def name(self) -> str: ...

    async def wait_for_card(self, timeout: float) -> CardInfo:
        """Return when a card is in the field; raise :class:`ReaderTimeout` otherwise."""
        ...

    async def wait_for_removal(self, timeout: float) -> None:
        """Return when the field is empty; raise :class:`ReaderTimeout` otherwise."""
        ...

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        """Send the batch in order, stopping after the first response not in its ``ok``.

        Returns the responses received (the last one may be the failing one). Raises
        :class:`NoCard` if no card is present, :class:`CardRemoved` if the card or the
        link went away mid-batch.
        """
        ...


class ClosedOnExit:
    """``async with reader:`` closes the reader on the way out, whatever happened inside."""

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
