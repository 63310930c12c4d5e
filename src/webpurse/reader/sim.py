"""``SimReader``: a reader whose field holds an in-process card emulator.

The card is a :class:`~webpurse.card.CardApplet` (in memory, or an image file that keeps
every commit). Tests move the card in and out of the field with :meth:`SimReader.insert`
and :meth:`SimReader.remove`, and decide exactly where a card leaves the field during a
batch with fault hooks, without monkeypatching:

- ``Fault.before(ins)``: the card leaves before that command reaches it (nothing changed);
- ``Fault.after(ins)``: the card processed the command (and committed, if it changes
  state) but left before its response came back: the torn transaction of spec §6;
- :meth:`SimReader.add_hook` for anything else: a hook sees every APDU before and after
  the card processes it and may call :meth:`SimReader.remove`.

Either way ``transmit`` raises :class:`~webpurse.reader.base.CardRemoved` with the
responses received so far, as a real reader does.

The card runs on the event loop's thread (a card with an image file blocks it for the
``fsync`` of each commit): this backend is for tests, demos and benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from webpurse.card.applet import CardApplet
from webpurse.card.image import open_card
from webpurse.card.vpcd import CARD_ATR
from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.base import CardInfo, ClosedOnExit, NoCard, ReaderTimeout, Step
from webpurse.reader.batch import LinkBroken, run_batch


class Phase(Enum):
    """Where an APDU is on its way through the reader."""

    BEFORE = "before"  # about to reach the card
    AFTER = "after"  # processed (and committed) by the card; the response is on its way back


@dataclass(frozen=True, slots=True)
class ApduEvent:
    """What a hook sees: one APDU (GET RESPONSE and 6Cxx resends included)."""

    phase: Phase
    apdu: bytes
    response: bytes | None  # None before the card answered
    index: int  # 1-based count of APDUs this reader has sent to a card


ApduHook = Callable[[ApduEvent], None]


@dataclass(frozen=True, slots=True)
class Fault:
    """The card leaves the field at the ``occurrence``-th APDU with INS ``ins`` (any if None).

    One-shot: once it has fired it is gone. Count starts when the fault is injected.
    """

    phase: Phase
    ins: int | None = None
    occurrence: int = 1

    @classmethod
    def before(cls, ins: int | None = None, occurrence: int = 1) -> Fault:
        """Removed before the command reaches the card: the card is unchanged."""
        return cls(Phase.BEFORE, ins, occurrence)

    @classmethod
    def after(cls, ins: int | None = None, occurrence: int = 1) -> Fault:
        """Removed after the card processed the command, before its response came back."""
        return cls(Phase.AFTER, ins, occurrence)


DEFAULT_NAME = "webpurse sim"


class SimReader(ClosedOnExit):
    """A :class:`~webpurse.reader.base.Reader` with an emulated card in (or out of) its field."""

    def __init__(
        self,
        card: CardApplet | None = None,
        *,
        name: str = DEFAULT_NAME,
        atr: bytes = CARD_ATR,
    ) -> None:
        """``card`` starts in the field; ``None`` starts with an empty field."""
        self._name = name
        self._atr = atr
        self._card: CardApplet | None = None
        self._last_card = card
        self._hooks: list[ApduHook] = []
        self._faults: list[tuple[Fault, list[int]]] = []
        self._count = 0
        self._present = asyncio.Event()
        self._absent = asyncio.Event()
        self._absent.set()
        self._lock = asyncio.Lock()
        self._resources = contextlib.ExitStack()
        if card is not None:
            self.insert(card)

    @classmethod
    def from_image(cls, path: str | os.PathLike[str], *, name: str | None = None) -> SimReader:
        """A reader holding the card in image ``path`` (locked until :meth:`close`)."""
        resources = contextlib.ExitStack()
        card = resources.enter_context(open_card(path))
        reader = cls(card, name=name or f"{DEFAULT_NAME} {os.fspath(path)}")
        reader._resources = resources
        return reader

    # --- the field -----------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def card(self) -> CardApplet | None:
        """The card in the field, if any."""
        return self._card

    @property
    def present(self) -> bool:
        return self._card is not None

    @property
    def apdu_count(self) -> int:
        """APDUs sent to a card so far (GET RESPONSE and resends included)."""
        return self._count

    def insert(self, card: CardApplet | None = None) -> None:
        """Put ``card`` (default: the last card seen) into the field; it powers up fresh."""
        card = card or self._last_card
        if card is None:
            raise ValueError("no card to insert")
        card.reset()
        self._card = self._last_card = card
        self._absent.clear()
        self._present.set()

    def remove(self) -> None:
        """Take the card out of the field: it loses power (and any pending INITIALIZE)."""
        if self._card is not None:
            self._card.reset()
        self._card = None
        self._present.clear()
        self._absent.set()

    # --- fault injection -----------------------------------------------------------

    def add_hook(self, hook: ApduHook) -> None:
        """Call ``hook`` before and after every APDU; it may :meth:`remove` the card."""
        self._hooks.append(hook)

    def remove_hook(self, hook: ApduHook) -> None:
        self._hooks.remove(hook)

    def inject(self, fault: Fault) -> None:
        """Arm a one-shot :class:`Fault`."""
        self._faults.append((fault, [0]))

    def _fire(self, event: ApduEvent) -> None:
        for hook in list(self._hooks):
            hook(event)
        ins = event.apdu[1] if len(event.apdu) > 1 else None
        for entry in list(self._faults):
            fault, seen = entry
            if fault.ins is not None and fault.ins != ins:
                continue
            if event.phase is Phase.BEFORE:
                seen[0] += 1
            if fault.phase is event.phase and seen[0] == fault.occurrence:
                self._faults.remove(entry)
                self.remove()

    def _send(self, apdu: bytes) -> bytes:
        if self._card is None:
            raise LinkBroken("the card left the field")
        self._count += 1
        self._fire(ApduEvent(Phase.BEFORE, apdu, None, self._count))
        card = self._card
        if card is None:
            raise LinkBroken("the card left the field before the command reached it")
        response = card.process(apdu)
        self._fire(ApduEvent(Phase.AFTER, apdu, response, self._count))
        if self._card is not card:
            raise LinkBroken("the card left the field before its response came back")
        return response

    # --- Reader --------------------------------------------------------------------

    async def wait_for_card(self, timeout: float) -> CardInfo:
        # A card in the field is answered at once, without a turn of the event loop (as
        # for a removal below).
        if self._present.is_set():
            return CardInfo(self._name, self._atr)
        try:
            await asyncio.wait_for(self._present.wait(), timeout)
        except TimeoutError:
            raise ReaderTimeout(f"no card on {self._name} within {timeout:g} s") from None
        return CardInfo(self._name, self._atr)

    async def wait_for_removal(self, timeout: float) -> None:
        # A card gone already is gone: answered without a turn of the event loop.
        # ``asyncio.wait_for`` starts its wait as a new task, and in that turn a card put
        # back at once (a test inserting it the moment the order reads "interrupted") hid
        # the removal, so the cashier waited for another one (a CI failure, 23:41).
        if self._absent.is_set():
            return
        try:
            await asyncio.wait_for(self._absent.wait(), timeout)
        except TimeoutError:
            raise ReaderTimeout(f"card still on {self._name} after {timeout:g} s") from None

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        async with self._lock:
            if self._card is None:
                raise NoCard(f"no card on {self._name}")
            return run_batch(batch, self._send)

    # --- lifetime ------------------------------------------------------------------

    async def close(self) -> None:
        """Take the card out and release its image file."""
        self.remove()
        self._resources.close()
