"""Serving the card emulator to ``pcscd`` through the vsmartcard ``vpcd`` driver.

Then every PC/SC program (pyscard, ``pcsc_scan``, ``opensc-tool``) sees the emulated card
in the reader "Virtual PCD 00 00" (see ``docs/pcsc.md`` and
``/work/shared/design/pcsc-vpcd.md``).

The wire (vsmartcard 3.3, default mode): ``vpcd`` inside pcscd listens on TCP port 35963
(slot 0) and 35964 (slot 1); the card connects. Each message is a 2-byte big-endian
length and that many bytes. A 1-byte message is a control code (``00`` power off, ``01``
power on, ``02`` reset, ``04`` get ATR, answered with the ATR); anything longer is a
command APDU, answered with the response APDU. Connected and ATR answered = card present;
socket closed = card removed.

Split as h11 does: :class:`FrameDecoder`, :func:`encode_frame` and :class:`VpcdSession`
are pure (bytes in, bytes out); :class:`VpcdClient` is the thin socket loop. Latency: vpcd
writes the length and the body separately, so the loop sets ``TCP_NODELAY``, answers in
one write and re-arms ``TCP_QUICKACK`` after every receive; otherwise each APDU waits
~40 ms for a delayed ACK.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import reduce
from typing import Protocol

from webpurse.card.serving import readable_until_stopped

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 35963  # slot 0; slot 1 is 35964
HEADER = 2
MAX_PAYLOAD = 0xFFFF


def _atr(historical: bytes) -> bytes:
    """A PC/SC-style ATR of a contactless ISO 14443-4 card (PC/SC part 3 §3.1.3.2.3).

    ``3B 8n 80 01`` ‖ historical bytes ‖ TCK: T=1, no interface bytes to negotiate.
    """
    body = bytes((0x80 | len(historical), 0x80, 0x01)) + historical
    return b"\x3b" + body + bytes((reduce(lambda a, b: a ^ b, body, 0),))


#: The emulated card's ATR: historical bytes "WEBPURSE". Readers of contactless cards
#: build an ATR of this shape; the applet itself never sees it.
CARD_ATR = _atr(b"WEBPURSE")


class Control(IntEnum):
    """vpcd's 1-byte control messages."""

    POWER_OFF = 0x00
    POWER_ON = 0x01
    RESET = 0x02
    GET_ATR = 0x04


class VpcdProtocolError(Exception):
    """The peer broke the framing (e.g. an empty message)."""


def encode_frame(payload: bytes) -> bytes:
    """Length-prefix ``payload``: one buffer, so it goes out in one write."""
    if len(payload) > MAX_PAYLOAD:
        raise VpcdProtocolError(f"{len(payload)} bytes do not fit a vpcd frame")
    return len(payload).to_bytes(HEADER, "big") + payload


class FrameDecoder:
    """Reassembles length-prefixed frames from a byte stream split anywhere."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete payloads, in order."""
        self._buffer += data
        frames: list[bytes] = []
        while len(self._buffer) >= HEADER:
            length = int.from_bytes(self._buffer[:HEADER], "big")
            if length == 0:
                raise VpcdProtocolError("empty vpcd message")
            if len(self._buffer) < HEADER + length:
                break
            frames.append(bytes(self._buffer[HEADER : HEADER + length]))
            del self._buffer[: HEADER + length]
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)


class Card(Protocol):
    """What vpcd drives: :class:`~webpurse.card.CardApplet` fits."""

    def process(self, apdu: bytes) -> bytes: ...

    def reset(self) -> None: ...


@dataclass
class SessionStats:
    apdus: int = 0
    power_cycles: int = 0


class VpcdSession:
    """The card's side of one vpcd connection: received bytes in, bytes to send out."""

    def __init__(self, card: Card, atr: bytes = CARD_ATR) -> None:
        self._card = card
        self._atr = atr
        self._decoder = FrameDecoder()
        self.stats = SessionStats()

    def receive(self, data: bytes) -> bytes:
        """Handle ``data`` from vpcd; return what to write back (maybe nothing)."""
        out = bytearray()
        for payload in self._decoder.feed(data):
            answer = self.handle(payload)
            if answer is not None:
                out += encode_frame(answer)
        return bytes(out)

    def handle(self, payload: bytes) -> bytes | None:
        """One vpcd message: the answer's payload, or None when it takes no answer."""
        if len(payload) == 1:
            code = payload[0]
            if code == Control.GET_ATR:
                return self._atr
            if code in (Control.POWER_OFF, Control.POWER_ON, Control.RESET):
                # Power is lost or cycled: the card forgets everything not in EEPROM.
                self._card.reset()
                self.stats.power_cycles += 1
                return None
            log.warning("vpcd sent unknown control code %02X; ignored", code)
            return None
        self.stats.apdus += 1
        return self._card.process(payload)


class VpcdClient:
    """Keeps the card connected to vpcd until :meth:`stop`; reconnects if pcscd restarts.

    Closing the socket is taking the card out of the reader.
    """

    def __init__(
        self,
        card: Card,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        atr: bytes = CARD_ATR,
        retry_interval: float = 0.5,
        on_status: Callable[[str], None] | None = None,
    ) -> None:
        self._card = card
        self._address = (host, port)
        self._atr = atr
        self._retry = retry_interval
        self._on_status = on_status or (lambda message: log.info("%s", message))
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False

    def stop(self) -> None:
        """Ask :meth:`run` to take the card out and return. Safe from signal handlers."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def _wait_for_stop(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`stop`; True if it came."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            selector.select(timeout)
        return self._stopping

    def _connect(self) -> socket.socket | None:
        """Connect to vpcd, retrying while it is not there; None once stopped."""
        announced = False
        while not self._stopping:
            try:
                sock = socket.create_connection(self._address, timeout=5)
            except OSError as exc:
                if not announced:
                    self._on_status(
                        f"waiting for vpcd at {self._address[0]}:{self._address[1]} ({exc})"
                    )
                    announced = True
                if self._wait_for_stop(self._retry):
                    return None
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        return None

    def run(self) -> None:
        """Serve until :meth:`stop`."""
        while not self._stopping:
            sock = self._connect()
            if sock is None:
                break
            self._on_status(f"card inserted into vpcd at {self._address[0]}:{self._address[1]}")
            try:
                self._serve(sock)
            finally:
                sock.close()
                self._card.reset()
            self._on_status("card removed")

    def _serve(self, sock: socket.socket) -> None:
        session = VpcdSession(self._card, self._atr)
        quickack = getattr(socket, "TCP_QUICKACK", None)
        for _ in readable_until_stopped(sock, self._wake_r, lambda: self._stopping):
            try:
                data = sock.recv(65536)
            except OSError as exc:
                self._on_status(f"vpcd connection lost: {exc}")
                return
            if not data:
                self._on_status("vpcd closed the connection (pcscd stopped?)")
                return
            if quickack is not None:
                sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
            try:
                out = session.receive(data)
            except VpcdProtocolError as exc:
                self._on_status(f"vpcd protocol error: {exc}; reconnecting")
                return
            if out:
                sock.sendall(out)
