"""``Pn532Reader``: an NXP PN532 on a serial line (HSU/UART), e.g. ``/dev/ttyUSB0``.

The frames are :mod:`webpurse.protocol.pn532frame` (why not nfcpy or libnfc: that module's
docstring and ``docs/readers.md``); the line is the tty itself through ``termios`` (raw, 8N1,
the given baud rate), so no serial library is needed and a pseudo-terminal works as well as
a USB-serial adapter.

Start-up (UM0701-02 §7): wake-up preamble, SAMConfiguration (normal mode), GetFirmwareVersion
(must say IC ``32``), RFConfiguration MaxRetries (two passive activation tries, so looking
for a card returns at once when there is none).

The card: InListPassiveTarget at 106 kbps type A activates it as an ISO 14443-4 card (the chip
does REQA, anticollision and RATS); the reader keeps it activated from batch to batch, as the
PC/SC backend keeps its connection, so a pending INITIALIZE survives until the DEBIT or CREDIT
of the next batch. Each APDU goes in InDataExchange; a command longer than one frame's 252 data
bytes is sent in pieces with the MI bit of the Tg byte, and an answer flagged MI in its status
byte is fetched with further empty InDataExchanges (UM0701-02 §7.3.8). The card ATR
(:class:`CardInfo`) is the one a PC/SC reader makes of the ATS's historical bytes.

A status byte other than ``00`` (``01``: the card did not answer in time), a missing ACK or
answer, or a broken line while an APDU is out is :class:`CardRemoved` with the responses so
far: the APDU in flight may have reached the card, and its outcome must be recovered.

Waiting for a card (or its removal) polls: an InListPassiveTarget (or a Diagnose card-presence
test, ``00 06``) every ``poll_interval`` seconds on the reader's worker thread; the event loop
sleeps between polls, so cancelling a wait is immediate. Line I/O blocks, so it runs on one
worker thread per reader, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import termios
import time
import tty
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from webpurse.protocol.apdu import ResponseApdu
from webpurse.protocol.pn532frame import (
    ACK_FRAME,
    ERROR_TIMEOUT,
    STATUS_ERROR_MASK,
    STATUS_MI,
    TFI_CHIP,
    TG_MI,
    WAKEUP,
    Ack,
    BadFrame,
    Command,
    ErrorFrame,
    FrameDecoder,
    Information,
    Nack,
    TargetA,
    chunks,
    command_frame,
    decode_list_passive_a,
    pcsc_atr,
)
from webpurse.reader.base import CardInfo, ClosedOnExit, NoCard, ReaderError, ReaderTimeout, Step
from webpurse.reader.batch import LinkBroken, run_batch

T = TypeVar("T")

DEFAULT_BAUD = 115200
ACK_TIMEOUT = 1.0
#: A card may ask for waiting time extensions; the chip answers once the card has.
ANSWER_TIMEOUT = 5.0
POLL_INTERVAL = 0.1

_BAUDS = {
    9600: termios.B9600,
    19200: termios.B19200,
    38400: termios.B38400,
    57600: termios.B57600,
    115200: termios.B115200,
    230400: termios.B230400,
    460800: termios.B460800,
    921600: termios.B921600,
}


class Pn532Error(ReaderError):
    """The PN532 did not answer as UM0701-02 says (no ACK, a syntax error frame, …)."""


class Pn532Unavailable(Pn532Error):
    """The serial line cannot be opened, or no PN532 answers on it."""


class _LineTimeout(Pn532Error):
    pass


@dataclass
class LineStats:
    """Bytes over the line, both ways, since the reader opened (for the bench)."""

    written: int = 0
    read: int = 0


def parse_port(argument: str) -> tuple[str, int]:
    """``/dev/ttyUSB0`` or ``/dev/ttyUSB0:57600`` → (port, baud)."""
    port, sep, baud = argument.rpartition(":")
    if sep and baud.isdigit():
        rate = int(baud)
        if rate not in _BAUDS:
            raise ValueError(f"unsupported baud rate {rate}; use one of {sorted(_BAUDS)}")
        return port, rate
    return argument, DEFAULT_BAUD


class Pn532Line:
    """Blocking PN532 command/answer exchange over a tty (one caller at a time)."""

    def __init__(self, port: str, baud: int = DEFAULT_BAUD) -> None:
        if baud not in _BAUDS:
            raise Pn532Unavailable(f"unsupported baud rate {baud}")
        try:
            self._fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise Pn532Unavailable(f"cannot open {port}: {exc.strerror}") from exc
        try:
            tty.setraw(self._fd, termios.TCSANOW)
            attrs = termios.tcgetattr(self._fd)
            attrs[4] = attrs[5] = _BAUDS[baud]  # ispeed, ospeed
            attrs[2] |= termios.CLOCAL | termios.CREAD
            termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
            termios.tcflush(self._fd, termios.TCIOFLUSH)
        except termios.error as exc:
            os.close(self._fd)
            raise Pn532Unavailable(f"{port} is not a serial line: {exc}") from exc
        self._decoder = FrameDecoder()
        self._pending: list[Information | Ack | Nack | ErrorFrame | BadFrame] = []
        self.stats = LineStats()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            select.select([], [self._fd], [], ACK_TIMEOUT)
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                continue
            self.stats.written += written
            view = view[written:]

    def _next(self, timeout: float) -> Information | Ack | Nack | ErrorFrame | BadFrame:
        deadline = time.monotonic() + timeout
        while not self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _LineTimeout("the PN532 did not answer in time")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise Pn532Error(f"serial line failed: {exc.strerror}") from exc
            self.stats.read += len(data)
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    def call(self, command: int, params: bytes = b"", *, timeout: float = ANSWER_TIMEOUT) -> bytes:
        """Send ``command``; return the parameters of its answer (after the answer code)."""
        self._pending.clear()
        self.write(command_frame(command, params))
        try:
            first = self._next(ACK_TIMEOUT)
            if not isinstance(first, Ack):
                raise Pn532Error(f"expected an ACK for command {command:02X}, got {first}")
            answer = self._next(timeout)
        except _LineTimeout:
            self.write(ACK_FRAME)  # the host's ACK aborts the command (UM0701-02 §6.2.1.4)
            raise
        if isinstance(answer, ErrorFrame):
            raise Pn532Error(f"the PN532 refused command {command:02X} (syntax error)")
        if isinstance(answer, BadFrame):
            raise Pn532Error(f"bad answer to command {command:02X}: {answer.code}")
        if not isinstance(answer, Information) or answer.tfi != TFI_CHIP:
            raise Pn532Error(f"unexpected answer to command {command:02X}: {answer}")
        if answer.command != (command + 1) & 0xFF:
            raise Pn532Error(f"answer {answer.command:02X} to command {command:02X}")
        return answer.params


class Pn532Reader(ClosedOnExit):
    """A :class:`~webpurse.reader.base.Reader` over a PN532 on a serial line."""

    def __init__(
        self,
        port: str,
        baud: int = DEFAULT_BAUD,
        *,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        """Open ``port`` and initialise the chip; :class:`Pn532Unavailable` if it is mute."""
        self._name = f"PN532 {port}"
        self._line = Pn532Line(port, baud)
        self._poll = poll_interval
        self._target: TargetA | None = None
        try:
            self._start()
        except ReaderError as exc:
            self._line.close()
            raise Pn532Unavailable(f"no PN532 answers on {port}: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pn532")
        self._lock = asyncio.Lock()
        self._closed = False

    def _start(self) -> None:
        line = self._line
        line.write(WAKEUP)
        line.call(Command.SAM_CONFIGURATION, bytes((0x01, 0x14, 0x01)), timeout=ACK_TIMEOUT)
        firmware = line.call(Command.GET_FIRMWARE_VERSION, timeout=ACK_TIMEOUT)
        if len(firmware) < 4 or firmware[0] != 0x32:
            raise Pn532Error(f"not a PN532 (firmware {firmware.hex()})")
        self.firmware = f"PN532 v{firmware[1]}.{firmware[2]}"
        # MaxRetries: ATR_REQ 0xFF, PSL_REQ 1, passive activation 2 tries (not forever).
        line.call(Command.RF_CONFIGURATION, bytes((0x05, 0xFF, 0x01, 0x02)), timeout=ACK_TIMEOUT)

    @property
    def name(self) -> str:
        return self._name

    @property
    def line_stats(self) -> LineStats:
        return self._line.stats

    # --- on the worker thread -----------------------------------------------------

    async def _on_thread(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise ReaderError(f"reader {self._name} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _activate(self) -> TargetA | None:
        """The activated card, activating one if there is none yet."""
        if self._target is None:
            answer = self._line.call(Command.IN_LIST_PASSIVE_TARGET, b"\x01\x00")
            targets = decode_list_passive_a(answer)
            self._target = targets[0] if targets else None
        return self._target

    def _present(self) -> bool:
        if self._target is not None:
            status = self._line.call(Command.DIAGNOSE, b"\x06")
            if status[:1] == b"\x00":
                return True
            self._target = None
        return self._activate() is not None

    def _exchange(self, tg: int, data: bytes) -> bytes:
        status = self._line.call(Command.IN_DATA_EXCHANGE, bytes((tg,)) + data)
        if not status:
            raise LinkBroken("empty InDataExchange answer")
        code = status[0] & STATUS_ERROR_MASK
        if code:
            self._target = None
            what = "the card did not answer" if code == ERROR_TIMEOUT else "PN532 error"
            raise LinkBroken(f"{what} (status {code:02X})")
        return status

    def _send(self, apdu: bytes) -> bytes:
        target = self._target
        if target is None:
            raise LinkBroken("the card left the field")
        try:
            pieces = chunks(apdu)
            for piece in pieces[:-1]:
                self._exchange(target.tg | TG_MI, piece)
            status = self._exchange(target.tg, pieces[-1])
            response = bytearray(status[1:])
            while status[0] & STATUS_MI:
                status = self._exchange(target.tg, b"")
                response += status[1:]
        except Pn532Error as exc:
            self._target = None
            raise LinkBroken(f"PN532 line: {exc}") from exc
        return bytes(response)

    def _transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        if self._activate() is None:
            raise NoCard(f"no card on {self._name}")
        return run_batch(batch, self._send)

    # --- Reader -------------------------------------------------------------------

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        steps = list(batch)
        async with self._lock:
            return await self._on_thread(lambda: self._transmit(steps))

    async def _wait(self, present: bool, timeout: float) -> TargetA | None:
        deadline = time.monotonic() + timeout
        while True:
            async with self._lock:
                here = await self._on_thread(self._present)
                target = self._target
            if here == present:
                return target
            if time.monotonic() + self._poll > deadline:
                what = "no card on" if present else "card still on"
                raise ReaderTimeout(f"{what} {self._name} after {timeout:g} s")
            await asyncio.sleep(self._poll)

    async def wait_for_card(self, timeout: float) -> CardInfo:
        target = await self._wait(True, timeout)
        historical = target.historical if target is not None else b""
        return CardInfo(self._name, pcsc_atr(historical))

    async def wait_for_removal(self, timeout: float) -> None:
        await self._wait(False, timeout)

    # --- lifetime -----------------------------------------------------------------

    def _release(self) -> None:
        with contextlib.suppress(ReaderError):
            if self._target is not None:
                self._line.call(Command.IN_RELEASE, b"\x00", timeout=ACK_TIMEOUT)
        self._target = None
        self._line.close()

    async def close(self) -> None:
        """Release the card (InRelease) and the serial line."""
        if self._closed:
            return
        async with self._lock:
            await self._on_thread(self._release)
            self._closed = True
        self._executor.shutdown(wait=False)
