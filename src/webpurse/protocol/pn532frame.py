"""The NXP PN532's host frames (UM0701-02 §6.2), sans-I/O: bytes in, frames out.

Why hand-written: nfcpy (1.0.4, 2022) has a PN532 ``tty:`` driver, but it cannot be pointed
at a pseudo-terminal (its path pattern ``tty:NAME`` forbids ``/`` and it only looks at the
top level of ``/dev``, so ``/dev/pts/N`` cannot be named), it imports ``usb1`` (libusb) even
for a serial line, and it drives ISO 14443-4 cards through ``InCommunicateThru`` with its own
ISO-DEP block layer in Python rather than the chip's ``InDataExchange``. See
``docs/readers.md``.

A frame on the wire (UM0701-02 §6.2.1):

- normal information frame: ``00 00 FF LEN LCS TFI PD0..PDn DCS 00`` with LEN = bytes in
  TFI‖PD, ``LEN + LCS ≡ 0``, ``TFI + ΣPD + DCS ≡ 0`` (mod 256);
- extended information frame (LEN > 255): ``00 00 FF FF FF LENM LENL LCS TFI PD.. DCS 00``
  with ``LENM + LENL + LCS ≡ 0``;
- ACK ``00 00 FF 00 FF 00``; NACK ``00 00 FF FF 00 00``;
- application error (syntax error): ``00 00 FF 01 FF 7F 81 00``.

TFI is ``D4`` host→PN532 and ``D5`` PN532→host; PD0 is the command code (the answer's is the
command's + 1). On HSU (UART) a sleeping chip is woken by ``55 55 00 00 …`` before the first
frame; the decoder skips any bytes before a start code ``00 FF``, so the wake-up preamble and
the postamble are simply ignored.

:class:`FrameDecoder` reassembles frames from a byte stream split anywhere and reports a bad
frame as a :class:`BadFrame` event with a stable ``code`` (``bad_length_checksum``,
``bad_data_checksum``, ``bad_postamble``…) instead of raising, so one line noise burst does not
lose the frames after it. :func:`decode_frame` decodes exactly one frame and raises
:class:`Pn532FrameError` with the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

START = b"\x00\xff"
ACK_FRAME = b"\x00\x00\xff\x00\xff\x00"
NACK_FRAME = b"\x00\x00\xff\xff\x00\x00"
ERROR_FRAME = b"\x00\x00\xff\x01\xff\x7f\x81\x00"
#: libnfc's HSU wake-up: two 0x55 and enough zeros for the chip to wake (UM0701-02 §7.2.11).
WAKEUP = b"\x55\x55" + bytes(14)

TFI_HOST = 0xD4
TFI_CHIP = 0xD5

#: LEN of a normal frame counts TFI and the data: at most 255.
MAX_NORMAL = 255
#: The PN532's buffer: 265 bytes of TFI‖PD in an extended frame (UM0701-02 §6.2.1.3; libnfc
#: allows 264 after TFI, nfcpy 265 in all).
MAX_EXTENDED = 265


class Command(IntEnum):
    """PN532 command codes (UM0701-02 §7) that webpurse or libnfc use."""

    DIAGNOSE = 0x00
    GET_FIRMWARE_VERSION = 0x02
    GET_GENERAL_STATUS = 0x04
    READ_REGISTER = 0x06
    WRITE_REGISTER = 0x08
    READ_GPIO = 0x0C
    WRITE_GPIO = 0x0E
    SET_SERIAL_BAUD_RATE = 0x10
    SET_PARAMETERS = 0x12
    SAM_CONFIGURATION = 0x14
    POWER_DOWN = 0x16
    RF_CONFIGURATION = 0x32
    IN_DATA_EXCHANGE = 0x40
    IN_COMMUNICATE_THRU = 0x42
    IN_DESELECT = 0x44
    IN_LIST_PASSIVE_TARGET = 0x4A
    IN_SELECT = 0x54
    IN_RELEASE = 0x52
    IN_AUTO_POLL = 0x60


#: Status byte of InDataExchange & co. (UM0701-02 §7.1): error code in bits 0-5, More
#: Information (chaining) in bit 6, NAD in bit 7.
STATUS_ERROR_MASK = 0x3F
STATUS_MI = 0x40
#: "Time Out, the target has not answered" — the card is gone.
ERROR_TIMEOUT = 0x01
#: "The target has been released" / does not exist (InDataExchange to a bad Tg).
ERROR_NO_TARGET = 0x27
#: Tg byte of InDataExchange: bit 6 says more data follows (host-side chaining).
TG_MI = 0x40

#: Data per InDataExchange chunk: a normal frame holds TFI, cmd, Tg/status and 252 bytes.
CHUNK = MAX_NORMAL - 3


class Pn532FrameError(ValueError):
    """A frame broke UM0701-02 §6.2; ``code`` says how (stable, for logs and tests)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass(frozen=True, slots=True)
class Ack:
    """The receiver took the previous frame."""


@dataclass(frozen=True, slots=True)
class Nack:
    """The host asks the PN532 to send its last answer again."""


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """The PN532 refused a frame it could not parse (syntax error)."""


@dataclass(frozen=True, slots=True)
class Information:
    """A normal or extended information frame: ``TFI`` and ``PD0..PDn``."""

    tfi: int
    data: bytes

    @property
    def command(self) -> int:
        return self.data[0]

    @property
    def params(self) -> bytes:
        return self.data[1:]


@dataclass(frozen=True, slots=True)
class BadFrame:
    """Bytes that started like a frame but were not one; they are dropped."""

    code: str


Frame = Ack | Nack | ErrorFrame | Information
Event = Frame | BadFrame


def _sum(data: bytes) -> int:
    return sum(data) & 0xFF


def encode_frame(tfi: int, data: bytes) -> bytes:
    """An information frame carrying ``data`` (PD0 first); extended above 255 bytes."""
    body = bytes((tfi,)) + data
    if not data:
        raise Pn532FrameError("empty_frame", "an information frame carries a command code")
    if len(body) > MAX_EXTENDED:
        raise Pn532FrameError("too_long", f"{len(body)} bytes do not fit the PN532's buffer")
    dcs = (-_sum(body)) & 0xFF
    if len(body) <= MAX_NORMAL:
        head = bytes((len(body), (-len(body)) & 0xFF))
    else:
        hi, lo = len(body) >> 8, len(body) & 0xFF
        head = bytes((0xFF, 0xFF, hi, lo, (-(hi + lo)) & 0xFF))
    return b"\x00\x00\xff" + head + body + bytes((dcs, 0x00))


def command_frame(command: int, params: bytes = b"") -> bytes:
    """A host → PN532 command frame."""
    return encode_frame(TFI_HOST, bytes((command,)) + params)


def response_frame(command: int, params: bytes = b"") -> bytes:
    """A PN532 → host answer to ``command`` (its code is the command's + 1)."""
    return encode_frame(TFI_CHIP, bytes(((command + 1) & 0xFF,)) + params)


class FrameDecoder:
    """Reassembles frames from a byte stream; see the module docstring."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        """Add ``data``; return every frame (or bad frame) completed by it, in order."""
        self._buffer += data
        events: list[Event] = []
        while True:
            start = self._buffer.find(START)
            if start < 0:
                # keep a trailing 00: it may be the first half of a start code
                del self._buffer[: max(0, len(self._buffer) - 1)]
                if self._buffer and self._buffer[0] != 0:
                    self._buffer.clear()
                return events
            del self._buffer[:start]
            try:
                result = _parse(bytes(self._buffer))
            except Pn532FrameError as exc:
                events.append(BadFrame(exc.code))
                del self._buffer[:2]  # drop this start code, look for the next one
                continue
            if result is None:
                return events
            frame, used = result
            events.append(frame)
            del self._buffer[:used]


def _parse(buf: bytes) -> tuple[Frame, int] | None:
    """Parse the frame starting at ``buf`` (which starts with ``00 FF``).

    Returns the frame and the bytes it used, None if more bytes are needed; raises
    :class:`Pn532FrameError` if these bytes are not a frame. The postamble ``00`` is part of
    the frame (a missing one is refused); the preamble before ``00 FF`` is optional.
    """
    if len(buf) < 4:
        return None
    length, lcs = buf[2], buf[3]
    if length == 0x00 and lcs == 0xFF:
        return _short(buf, Ack())
    if length == 0xFF and lcs == 0x00:
        return _short(buf, Nack())
    if length == 0xFF and lcs == 0xFF:  # extended
        if len(buf) < 7:
            return None
        hi, lo, xcs = buf[4], buf[5], buf[6]
        if (hi + lo + xcs) & 0xFF:
            raise Pn532FrameError("bad_length_checksum", "LENM + LENL + LCS is not 0")
        length, offset = (hi << 8) | lo, 7
        if length <= MAX_NORMAL or length > MAX_EXTENDED:
            raise Pn532FrameError("bad_length", f"extended frame of {length} bytes")
    else:
        if (length + lcs) & 0xFF:
            raise Pn532FrameError("bad_length_checksum", "LEN + LCS is not 0")
        offset = 4
    if length == 1 and buf[offset : offset + 1] == b"\x7f":
        if len(buf) < offset + 3:
            return None
        if buf[offset + 1] != 0x81:
            raise Pn532FrameError("bad_data_checksum", "error frame with a bad DCS")
        return _postamble(buf, ErrorFrame(), offset + 2)
    end = offset + length
    if len(buf) < end + 2:
        return None
    body = buf[offset:end]
    if length < 2:
        raise Pn532FrameError("empty_frame", "an information frame carries a command code")
    if (_sum(body) + buf[end]) & 0xFF:
        raise Pn532FrameError("bad_data_checksum", "TFI + data + DCS is not 0")
    if body[0] not in (TFI_HOST, TFI_CHIP):
        raise Pn532FrameError("bad_tfi", f"frame identifier {body[0]:02X}")
    return _postamble(buf, Information(body[0], bytes(body[1:])), end + 1)


def _short(buf: bytes, frame: Frame) -> tuple[Frame, int] | None:
    if len(buf) < 5:
        return None
    return _postamble(buf, frame, 4)


def _postamble(buf: bytes, frame: Frame, at: int) -> tuple[Frame, int] | None:
    if len(buf) <= at:
        return None
    if buf[at] != 0x00:
        raise Pn532FrameError("bad_postamble", f"postamble {buf[at]:02X}, not 00")
    return frame, at + 1


def decode_frame(data: bytes) -> Frame:
    """Decode exactly one frame (preamble optional); raise :class:`Pn532FrameError`."""
    start = data.find(START)
    if start < 0 or any(data[:start]):
        raise Pn532FrameError("no_start_code", "no 00 FF start code")
    result = _parse(data[start:])
    if result is None:
        raise Pn532FrameError("truncated", "the frame is cut short")
    frame, used = result
    if start + used != len(data):
        raise Pn532FrameError("trailing_bytes", "bytes after the frame")
    return frame


# --- ISO 14443 type A target data (InListPassiveTarget, UM0701-02 §7.3.5) -------------


@dataclass(frozen=True, slots=True)
class TargetA:
    """A 106 kbps type A target as InListPassiveTarget reports it."""

    tg: int
    atqa: bytes  # SENS_RES, 2 bytes as on the wire
    sak: int  # SEL_RES
    uid: bytes  # NFCID1
    ats: bytes  # RATS answer, TL (its own length) first; empty if not ISO 14443-4

    def encode(self) -> bytes:
        """Tg ‖ SENS_RES ‖ SEL_RES ‖ NFCIDLength ‖ NFCID1 ‖ ATS."""
        head = bytes((self.tg,)) + self.atqa + bytes((self.sak, len(self.uid)))
        return head + self.uid + self.ats

    @property
    def historical(self) -> bytes:
        """The ATS's historical bytes (after TL, T0 and the TA/TB/TC that T0 announces)."""
        if len(self.ats) < 2:
            return b""
        t0 = self.ats[1]
        skip = 2 + sum(1 for bit in (0x10, 0x20, 0x40) if t0 & bit)
        return self.ats[skip : self.ats[0]]


def decode_list_passive_a(params: bytes) -> list[TargetA]:
    """The targets in an InListPassiveTarget answer (``NbTg`` first) for type A."""
    if not params:
        raise Pn532FrameError("bad_answer", "InListPassiveTarget answer without NbTg")
    count, rest = params[0], params[1:]
    targets = []
    for _ in range(count):
        if len(rest) < 5 or len(rest) < 5 + rest[4]:
            raise Pn532FrameError("bad_answer", "type A target data cut short")
        uid_len = rest[4]
        tg, atqa, sak = rest[0], rest[1:3], rest[3]
        uid = rest[5 : 5 + uid_len]
        rest = rest[5 + uid_len :]
        ats = b""
        if sak & 0x20 and rest:
            ats_len = rest[0]
            if ats_len < 1 or len(rest) < ats_len:
                raise Pn532FrameError("bad_answer", "ATS cut short")
            ats, rest = rest[:ats_len], rest[ats_len:]
        targets.append(TargetA(tg, bytes(atqa), sak, bytes(uid), bytes(ats)))
    return targets


def pcsc_atr(historical: bytes) -> bytes:
    """The ATR a PC/SC reader makes of a contactless ISO 14443-4 card's historical bytes
    (PC/SC part 3 §3.1.3.2.3): ``3B 8n 80 01`` ‖ historical ‖ TCK."""
    body = bytes((0x80 | len(historical), 0x80, 0x01)) + historical
    tck = 0
    for byte in body:
        tck ^= byte
    return b"\x3b" + body + bytes((tck,))


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    """``data`` cut into InDataExchange pieces (one empty piece for empty data)."""
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]
