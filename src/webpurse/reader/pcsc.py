"""``PcscReader``: any PC/SC reader through pyscard (USB CCID, built-in NFC, or vpcd).

pyscard's calls block, so none runs on the event loop:
- card operations (connect, status, transmit) run on one worker thread per reader, in
  order, on the reader's own PC/SC context;
- waiting for a card or its removal blocks in ``SCardGetStatusChange`` on a worker thread
  with a context of its own, so the thread sleeps in pcscd until the event (no polling
  here; pcscd itself polls some readers, vpcd every ~400 ms). Cancelling the waiting task
  calls ``SCardCancel`` so the thread returns at once (within ``CANCEL_CHECK_MS`` at worst).

The connection is kept from batch to batch (SHARED mode, one PC/SC transaction per batch),
so a pending INITIALIZE survives until the DEBIT or CREDIT of the next batch. If the card
left the field between batches, the next batch runs on whatever card is there now (a new
contact: a fresh card has nothing pending), or raises ``NoCard``. Any failure while a
command is out (``SCARD_E_NOT_TRANSACTED`` when the card is pulled, ``SCARD_W_REMOVED_CARD``
…) is ``CardRemoved`` with the responses received so far.

pyscard is optional (``pip install webpurse[pcsc]``); without it, or without a running
pcscd, constructing a reader raises :class:`PcscUnavailable`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, TypeVar, cast

from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.base import CardInfo, ClosedOnExit, NoCard, ReaderError, ReaderTimeout, Step
from webpurse.reader.batch import LinkBroken, run_batch

T = TypeVar("T")

#: A wait blocks in pcscd at most this long before it looks at its cancel flag again.
#: ``SCardCancel`` wakes it at once; the bound only covers a cancel that lands between two
#: ``SCardGetStatusChange`` calls, which pcsc-lite would otherwise lose.
CANCEL_CHECK_MS = 1000


class PcscUnavailable(ReaderError):
    """pyscard is not installed, or no PC/SC service (pcscd) answers."""


class ReaderNotFound(ReaderError):
    """No PC/SC reader has the requested name."""


class PcscError(ReaderError):
    """A PC/SC call failed for a reason other than the card leaving."""

    def __init__(self, what: str, hresult: int) -> None:
        self.hresult = hresult & 0xFFFFFFFF
        super().__init__(f"{what}: {_describe(hresult)}")


def _scard() -> ModuleType:
    try:
        from smartcard import scard  # pyscard is optional: imported on first use
    except ImportError as exc:
        raise PcscUnavailable(
            "pyscard is not installed: pip install 'webpurse[pcsc]' "
            "(it builds from source and needs swig, gcc and libpcsclite-dev)"
        ) from exc
    return cast(ModuleType, scard)


def _describe(hresult: int) -> str:
    code = hresult & 0xFFFFFFFF
    try:
        text = str(_scard().SCardGetErrorMessage(hresult))
    except PcscUnavailable:
        text = "PC/SC error"
    return f"{text} (0x{code:08X})"


def _establish(scard: ModuleType) -> Any:
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        raise PcscUnavailable(f"no PC/SC service (is pcscd running?): {_describe(hresult)}")
    return context


def _list(scard: ModuleType, context: Any) -> list[str]:
    hresult, readers = scard.SCardListReaders(context, [])
    if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
        return []
    if hresult != scard.SCARD_S_SUCCESS:
        raise PcscError("cannot list PC/SC readers", hresult)
    return [str(name) for name in readers]


def list_readers() -> list[str]:
    """The names of the PC/SC readers pcscd knows now (e.g. ``Virtual PCD 00 00``)."""
    scard = _scard()
    context = _establish(scard)
    try:
        return _list(scard, context)
    finally:
        scard.SCardReleaseContext(context)


def match_reader(wanted: str | None, available: Sequence[str]) -> str:
    """Pick a reader: the first one; or ``wanted`` exactly; or the one name containing it."""
    if not available:
        raise ReaderNotFound("no PC/SC reader is connected")
    if wanted is None or wanted == "":
        return available[0]
    if wanted in available:
        return wanted
    matches = [name for name in available if wanted.lower() in name.lower()]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(repr(name) for name in available)
    if not matches:
        raise ReaderNotFound(f"no PC/SC reader named {wanted!r}; readers: {listing}")
    raise ReaderNotFound(f"{wanted!r} matches several readers: {listing}")


class _Wait:
    """One blocking status-change wait, cancellable from the event loop's thread."""

    def __init__(self) -> None:
        self.context: Any = None
        self.cancelled = False
        self.lock = threading.Lock()


class PcscReader(ClosedOnExit):
    """A :class:`~webpurse.reader.base.Reader` over one PC/SC reader."""

    def __init__(self, name: str | None = None, *, exclusive: bool = False) -> None:
        """Open the reader called ``name`` (default: the first reader; see :func:`match_reader`).

        ``exclusive`` keeps every other application away from the card while connected.
        """
        self._scard = _scard()
        self._context = _establish(self._scard)
        try:
            self._name = match_reader(name, _list(self._scard, self._context))
        except BaseException:
            self._scard.SCardReleaseContext(self._context)
            raise
        s = self._scard
        self._share = s.SCARD_SHARE_EXCLUSIVE if exclusive else s.SCARD_SHARE_SHARED
        self._protocols = s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1
        self._hcard: Any = None
        self._protocol = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcsc-card")
        self._lock = asyncio.Lock()
        self._waits: set[_Wait] = set()
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    # --- card operations (on the card thread) --------------------------------------

    async def _on_card_thread(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise ReaderError(f"reader {self._name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _renew_context(self) -> None:
        """pcscd restarted: old contexts and handles are dead; open a new context."""
        s = self._scard
        self._hcard = None
        s.SCardReleaseContext(self._context)
        self._context = _establish(s)

    def _drop_card(self) -> None:
        if self._hcard is not None:
            self._scard.SCardDisconnect(self._hcard, self._scard.SCARD_LEAVE_CARD)
            self._hcard = None

    def _connect(self) -> None:
        """Have a live handle to the card in the field, or raise :class:`NoCard`."""
        s = self._scard
        if self._hcard is not None:
            hresult, _reader, _state, _protocol, _atr = s.SCardStatus(self._hcard)
            if hresult == s.SCARD_S_SUCCESS:
                return
            if hresult == s.SCARD_W_RESET_CARD:  # another application reset it
                hresult, protocol = s.SCardReconnect(
                    self._hcard, self._share, self._protocols, s.SCARD_LEAVE_CARD
                )
                if hresult == s.SCARD_S_SUCCESS:
                    self._protocol = protocol
                    return
            self._drop_card()  # the card we knew left the field
        for attempt in (1, 2):
            hresult, hcard, protocol = s.SCardConnect(
                self._context, self._name, self._share, self._protocols
            )
            if attempt == 1 and hresult in (
                s.SCARD_E_NO_SERVICE,
                s.SCARD_E_SERVICE_STOPPED,
                s.SCARD_E_INVALID_HANDLE,
            ):
                self._renew_context()
                continue
            break
        if hresult == s.SCARD_S_SUCCESS:
            self._hcard, self._protocol = hcard, protocol
            return
        if hresult in (
            s.SCARD_E_NO_SMARTCARD,
            s.SCARD_W_REMOVED_CARD,
            s.SCARD_W_UNPOWERED_CARD,
            s.SCARD_W_UNRESPONSIVE_CARD,
            s.SCARD_E_NOT_READY,
        ):
            raise NoCard(f"no card on {self._name}: {_describe(hresult)}")
        if hresult == s.SCARD_E_SHARING_VIOLATION:
            raise PcscError(f"{self._name} is held by another application", hresult)
        raise PcscError(f"cannot connect to the card on {self._name}", hresult)

    def _send(self, apdu: bytes) -> bytes:
        hresult, response = self._scard.SCardTransmit(self._hcard, self._protocol, list(apdu))
        if hresult != self._scard.SCARD_S_SUCCESS:
            raise LinkBroken(f"card on {self._name} lost during a command: {_describe(hresult)}")
        return bytes(response)

    def _transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        s = self._scard
        self._connect()
        hresult = s.SCardBeginTransaction(self._hcard)
        if hresult != s.SCARD_S_SUCCESS:
            self._drop_card()
            raise NoCard(f"no card on {self._name}: {_describe(hresult)}")
        try:
            return run_batch(batch, self._send)
        finally:
            s.SCardEndTransaction(self._hcard, s.SCARD_LEAVE_CARD)

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        steps = list(batch)
        async with self._lock:
            return await self._on_card_thread(lambda: self._transmit(steps))

    # --- presence (each wait on its own thread and context) ------------------------

    def _wait_blocking(self, wait: _Wait, present: bool, timeout: float) -> bytes:
        """Block in SCardGetStatusChange until the field is (not) occupied; return the ATR."""
        s = self._scard
        context = _establish(s)
        with wait.lock:
            wait.context = context
            cancelled = wait.cancelled
        try:
            if cancelled:
                raise asyncio.CancelledError
            deadline = time.monotonic() + timeout
            known = s.SCARD_STATE_UNAWARE
            while True:
                with wait.lock:
                    if wait.cancelled:
                        raise asyncio.CancelledError
                remaining = max(0, math.ceil((deadline - time.monotonic()) * 1000))
                block = 0 if known == s.SCARD_STATE_UNAWARE else min(remaining, CANCEL_CHECK_MS)
                hresult, states = s.SCardGetStatusChange(context, block, [(self._name, known)])
                if hresult == s.SCARD_E_TIMEOUT:
                    if time.monotonic() >= deadline:
                        break
                    continue
                if hresult == s.SCARD_E_CANCELLED:
                    raise asyncio.CancelledError
                if hresult != s.SCARD_S_SUCCESS:
                    raise PcscError(f"cannot watch {self._name}", hresult)
                _reader, event, atr = states[0]
                if event & (s.SCARD_STATE_UNKNOWN | s.SCARD_STATE_UNAVAILABLE):
                    raise ReaderError(f"reader {self._name} is gone")
                in_field = bool(event & s.SCARD_STATE_PRESENT) and not (event & s.SCARD_STATE_MUTE)
                if in_field == present:
                    return bytes(atr)
                known = event & ~s.SCARD_STATE_CHANGED
        finally:
            with wait.lock:
                wait.context = None
            s.SCardReleaseContext(context)
        what = "no card on" if present else "card still on"
        raise ReaderTimeout(f"{what} {self._name} after {timeout:g} s")

    async def _wait(self, present: bool, timeout: float) -> bytes:
        if self._closed:
            raise ReaderError(f"reader {self._name} is closed")
        wait = _Wait()
        self._waits.add(wait)
        try:
            return await asyncio.to_thread(self._wait_blocking, wait, present, timeout)
        finally:
            self._waits.discard(wait)
            self._cancel(wait)

    def _cancel(self, wait: _Wait) -> None:
        with wait.lock:
            wait.cancelled = True
            if wait.context is not None:
                self._scard.SCardCancel(wait.context)

    async def wait_for_card(self, timeout: float) -> CardInfo:
        atr = await self._wait(True, timeout)
        return CardInfo(self._name, atr)

    async def wait_for_removal(self, timeout: float) -> None:
        await self._wait(False, timeout)

    # --- lifetime ------------------------------------------------------------------

    def _release(self) -> None:
        self._drop_card()
        self._scard.SCardReleaseContext(self._context)

    async def close(self) -> None:
        """Leave the card as it is (no reset), release PC/SC, stop the worker threads."""
        if self._closed:
            return
        for wait in list(self._waits):
            self._cancel(wait)
        async with self._lock:
            await self._on_card_thread(self._release)
            self._closed = True
        self._executor.shutdown(wait=False)
