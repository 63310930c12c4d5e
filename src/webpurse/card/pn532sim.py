"""A simulated NXP PN532 on a pseudo-terminal, with the card emulator in its field.

Like ``vpcd.py`` does for PC/SC, this serves the card to anything that drives a PN532 over a
serial line: webpurse's own ``pn532:`` reader backend, or libnfc (``nfc-list`` with the
connstring ``pn532_uart:/dev/pts/N``). See ``docs/readers.md``.

Split as h11 does: :class:`Pn532Chip` is pure (bytes from the host in, bytes to the host
out) and answers the commands libnfc's ``pn532_uart`` driver and webpurse send
(UM0701-02 §7): Diagnose (communication test, card presence), GetFirmwareVersion,
GetGeneralStatus, Read/WriteRegister (a register file that remembers what was written),
SetParameters, SetSerialBaudRate (a no-op on a pty), SAMConfiguration, PowerDown,
RFConfiguration, InListPassiveTarget (106 kbps type A only: other modulations find nothing),
InDataExchange (with MI chaining both ways),
InCommunicateThru (no target answers raw frames), InDeselect, InSelect, InRelease. Anything
else gets the chip's syntax-error frame. :class:`PtyServer` is the thin loop that puts a
chip on a pty.

The card presents as an ISO 14443-4 type A card: ATQA ``00 04``, SAK ``20``, a 4-byte random
UID (first byte ``08``, ISO 14443-3 §6.4.4) and an ATS whose historical bytes are those of
the vpcd ATR, so a PC/SC-style ATR built from it equals :data:`~webpurse.card.vpcd.CARD_ATR`.

Fault hooks (for the proof suite's reader-fault rows): a hook sees every APDU before and
after the card processes it and may :meth:`Pn532Chip.remove` the card. Removed before: the
APDU never reaches the card; removed after: the card processed (and committed) it but its
answer is lost. Either way the host gets status ``01`` (timeout), as from a real chip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import termios
import threading
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from webpurse.card.serving import readable_until_stopped
from webpurse.card.vpcd import Card
from webpurse.protocol.pn532frame import (
    ACK_FRAME,
    ERROR_FRAME,
    ERROR_NO_TARGET,
    ERROR_TIMEOUT,
    STATUS_MI,
    TFI_HOST,
    TG_MI,
    Ack,
    BadFrame,
    Command,
    ErrorFrame,
    FrameDecoder,
    Information,
    Nack,
    TargetA,
    chunks,
    response_frame,
)

log = logging.getLogger(__name__)

DEFAULT_UID = bytes.fromhex("08A1B2C3")
DEFAULT_ATQA = bytes.fromhex("0004")
SAK_ISO14443_4 = 0x20
#: TL, T0 (TA, TB, TC present; FSCI 8 = 256 bytes), TA1, TB1 (FWI 7), TC1, "WEBPURSE".
DEFAULT_ATS = bytes((13, 0x78, 0x80, 0x70, 0x02)) + b"WEBPURSE"
#: GetFirmwareVersion: IC 32 (PN532), version 1.6, supports ISO 14443 type A only.
FIRMWARE = bytes((0x32, 0x01, 0x06, 0x01))


class Phase(Enum):
    BEFORE = "before"
    AFTER = "after"


@dataclass(frozen=True, slots=True)
class ApduEvent:
    """What a hook sees: an APDU on its way to the card (and back, ``AFTER``)."""

    phase: Phase
    apdu: bytes
    response: bytes | None
    index: int  # 1-based count of APDUs that reached the chip


ApduHook = Callable[[ApduEvent], None]


@dataclass
class ChipStats:
    """What went over the line (bytes counted as written by either side)."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    apdus: int = 0
    bad_frames: int = 0
    unknown_commands: list[int] = field(default_factory=list)


class Pn532Chip:
    """A PN532 in initiator mode with (or without) the card in its field; pure."""

    def __init__(
        self,
        card: Card | None,
        *,
        uid: bytes = DEFAULT_UID,
        atqa: bytes = DEFAULT_ATQA,
        ats: bytes = DEFAULT_ATS,
    ) -> None:
        self._card = card
        self._last_card = card
        self._target = TargetA(1, atqa, SAK_ISO14443_4, uid, ats)
        self._decoder = FrameDecoder()
        self._registers: dict[int, int] = {}
        self._active = False  # the card is selected (RATS done) as target 1
        self._chain_in = bytearray()  # host → card chaining (Tg MI bit)
        self._chain_out: list[bytes] = []  # card → host chaining (status MI bit)
        self._last_answer = b""
        self._hooks: list[ApduHook] = []
        self.stats = ChipStats()

    # --- the field -------------------------------------------------------------------

    @property
    def present(self) -> bool:
        return self._card is not None

    def insert(self, card: Card | None = None) -> None:
        """Put ``card`` (default: the last one) into the field; it powers up fresh."""
        card = card or self._last_card
        if card is None:
            raise ValueError("no card to insert")
        card.reset()
        self._card = self._last_card = card
        self._active = False

    def remove(self) -> None:
        """Take the card out of the field: it loses power."""
        if self._card is not None:
            self._card.reset()
        self._card = None
        self._active = False
        self._chain_in.clear()
        self._chain_out.clear()

    def add_hook(self, hook: ApduHook) -> None:
        self._hooks.append(hook)

    def remove_hook(self, hook: ApduHook) -> None:
        self._hooks.remove(hook)

    # --- the line --------------------------------------------------------------------

    def receive(self, data: bytes) -> bytes:
        """Bytes from the host in; the chip's bytes (ACKs and answers) out."""
        self.stats.bytes_in += len(data)
        out = bytearray()
        for event in self._decoder.feed(data):
            if isinstance(event, BadFrame):
                # A real PN532 ignores a frame it cannot check; the host times out.
                self.stats.bad_frames += 1
                log.warning("pn532 sim: dropped a bad frame (%s)", event.code)
            elif isinstance(event, Nack):
                out += self._last_answer
            elif isinstance(event, Ack | ErrorFrame):
                pass  # the host took our answer (or aborts): nothing to do
            elif event.tfi != TFI_HOST:
                self.stats.bad_frames += 1
                log.warning("pn532 sim: frame from the chip's side (TFI %02X) ignored", event.tfi)
            else:
                self.stats.frames_in += 1
                answer = self._command(event)
                self._last_answer = answer
                self.stats.frames_out += 1
                out += ACK_FRAME + answer
        self.stats.bytes_out += len(out)
        return bytes(out)

    # --- commands --------------------------------------------------------------------

    def _command(self, frame: Information) -> bytes:
        code, params = frame.command, frame.params
        handler = _HANDLERS.get(code)
        if handler is None:
            self.stats.unknown_commands.append(code)
            log.warning("pn532 sim: command %02X not supported; syntax error frame", code)
            return ERROR_FRAME
        result = handler(self, params)
        return response_frame(code, result)

    def _diagnose(self, params: bytes) -> bytes:
        test = params[:1]
        if test == b"\x00":  # communication line test: echo
            return params
        if test == b"\x06":  # ISO 14443-4 card presence (UM0701-02 §7.2.1)
            return bytes((0x00 if self._active and self._card is not None else ERROR_TIMEOUT,))
        return b"\x00"

    def _read_register(self, params: bytes) -> bytes:
        addresses = [int.from_bytes(params[i : i + 2], "big") for i in range(0, len(params), 2)]
        return bytes(self._registers.get(address, 0) for address in addresses)

    def _write_register(self, params: bytes) -> bytes:
        for i in range(0, len(params) - 2, 3):
            address = int.from_bytes(params[i : i + 2], "big")
            self._registers[address] = params[i + 2]
        return b""

    def _list_passive(self, params: bytes) -> bytes:
        max_tg, brty = (params[0], params[1]) if len(params) >= 2 else (1, 0)
        if brty != 0x00 or max_tg < 1 or self._card is None:
            return b"\x00"
        if not self._active:
            self._card.reset()  # a fresh activation (REQA, anticollision, RATS)
            self._active = True
        self._chain_in.clear()
        self._chain_out.clear()
        return b"\x01" + self._target.encode()

    def _release(self, params: bytes) -> bytes:
        # Deselected (S(DESELECT)): the card halts; a later activation starts fresh.
        if params[:1] in (b"\x00", b"\x01") and self._active:
            self._active = False
            if self._card is not None:
                self._card.reset()
        return b"\x00"

    def _select(self, params: bytes) -> bytes:
        return b"\x00" if params[:1] == b"\x01" and self._card is not None else b"\x27"

    def _data_exchange(self, params: bytes) -> bytes:
        if not params:
            return bytes((ERROR_NO_TARGET,))
        tg, data = params[0], params[1:]
        if tg & 0x3F != 1 or not self._active:
            return bytes((ERROR_NO_TARGET,))
        if self._card is None:
            return bytes((ERROR_TIMEOUT,))
        if self._chain_out:  # the host asks for the rest of a chained answer
            piece = self._chain_out.pop(0)
            return bytes((STATUS_MI if self._chain_out else 0x00,)) + piece
        self._chain_in += data
        if tg & TG_MI:
            return b"\x00"
        apdu = bytes(self._chain_in)
        self._chain_in.clear()
        response = self._exchange(apdu)
        if response is None:
            return bytes((ERROR_TIMEOUT,))
        pieces = chunks(response)
        self._chain_out = pieces[1:]
        return bytes((STATUS_MI if self._chain_out else 0x00,)) + pieces[0]

    def _exchange(self, apdu: bytes) -> bytes | None:
        self.stats.apdus += 1
        index = self.stats.apdus
        for hook in list(self._hooks):
            hook(ApduEvent(Phase.BEFORE, apdu, None, index))
        card = self._card
        if card is None:
            return None
        response = card.process(apdu)
        for hook in list(self._hooks):
            hook(ApduEvent(Phase.AFTER, apdu, response, index))
        if self._card is not card:
            return None
        return response

    def _communicate_thru(self, params: bytes) -> bytes:
        return bytes((ERROR_TIMEOUT,))  # no raw (non-ISO-DEP) target here

    def _status(self, params: bytes) -> bytes:
        if self._active and self._card is not None:
            return b"\x00\x00\x01" + b"\x01\x00\x00\x00" + b"\x00"  # Err, Field, NbTg, Tg1
        return b"\x00\x00\x00\x00"

    def _ok_status(self, params: bytes) -> bytes:
        return b"\x00"

    def _empty(self, params: bytes) -> bytes:
        return b""

    def _firmware(self, params: bytes) -> bytes:
        return FIRMWARE


_HANDLERS: dict[int, Callable[[Pn532Chip, bytes], bytes]] = {
    Command.DIAGNOSE: Pn532Chip._diagnose,
    Command.GET_FIRMWARE_VERSION: Pn532Chip._firmware,
    Command.GET_GENERAL_STATUS: Pn532Chip._status,
    Command.READ_REGISTER: Pn532Chip._read_register,
    Command.WRITE_REGISTER: Pn532Chip._write_register,
    Command.SET_PARAMETERS: Pn532Chip._empty,
    Command.SET_SERIAL_BAUD_RATE: Pn532Chip._empty,  # a pty has no baud rate to change
    Command.SAM_CONFIGURATION: Pn532Chip._empty,
    Command.POWER_DOWN: Pn532Chip._ok_status,
    Command.RF_CONFIGURATION: Pn532Chip._empty,
    Command.IN_LIST_PASSIVE_TARGET: Pn532Chip._list_passive,
    Command.IN_DATA_EXCHANGE: Pn532Chip._data_exchange,
    Command.IN_COMMUNICATE_THRU: Pn532Chip._communicate_thru,
    Command.IN_DESELECT: Pn532Chip._release,
    Command.IN_RELEASE: Pn532Chip._release,
    Command.IN_SELECT: Pn532Chip._select,
}


class PtyServer:
    """A :class:`Pn532Chip` on a new pseudo-terminal until :meth:`stop`.

    :attr:`path` is the pty's slave (``/dev/pts/N``): open it as the PN532's serial line.
    The server keeps a slave descriptor of its own open, so a host closing and reopening
    the line (as ``nfc-list`` does) never makes the master side fail.
    """

    def __init__(self, chip: Pn532Chip) -> None:
        self.chip = chip
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave, termios.TCSANOW)
        self.path = os.ttyname(self._slave)
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def lock(self) -> threading.Lock:
        """Held while the chip handles bytes: take it to change the field from elsewhere."""
        return self._lock

    def run(self) -> None:
        """Serve until :meth:`stop` (blocking)."""
        for _ in readable_until_stopped(self._master, self._wake_r, lambda: self._stopping):
            try:
                data = os.read(self._master, 4096)
            except OSError as exc:  # EIO: no slave open (cannot happen: we hold one)
                log.warning("pn532 sim: pty read failed: %s", exc)
                return
            with self._lock:
                out = self.chip.receive(data)
            if out:
                os.write(self._master, out)

    def start(self) -> PtyServer:
        """Serve on a daemon thread."""
        self._thread = threading.Thread(target=self.run, name="pn532-sim", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask :meth:`run` to return. Safe from signal handlers."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for fd in (self._master, self._slave, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PtyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
