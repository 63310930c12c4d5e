"""A purchase over a PN532 serial line: bytes on the wire, their time at 115200 baud, the pty.

The purchase is :func:`~bench.cards.in_process_purchase` (SELECT, READ BINARY, INITIALIZE,
DEBIT and the host's MAC work) with each APDU sent through ``Pn532Reader`` → a pty → the
simulated PN532 (``webpurse.card.pn532sim``) → the card emulator (memory store), and the same
purchase straight on the card for comparison. Bytes are counted at the reader's end of the line,
both directions, frames, ACKs and all. A pty has no baud rate, so the time those bytes take on
a real 115200 baud UART is computed (10 bits a byte: start, 8 data, stop); the card's own time
on the air (ISO 14443 at 106 kbit/s) comes on top on real hardware. The PC/SC comparison is
the ``latency`` benchmark's ``pcsc via agent`` rows (a whole purchase through pcscd + vpcd).
"""

from __future__ import annotations

import asyncio
import time

from bench.cards import in_process_purchase, memory_card
from bench.harness import Context, Measurement
from webpurse.card.pn532sim import Pn532Chip, PtyServer
from webpurse.reader.base import Step
from webpurse.reader.pn532 import Pn532Reader

NAME = "pn532"
BAUD = 115200
APDUS_PER_PURCHASE = 4
ANY = frozenset(range(0x10000))


class _OverTheLine:
    """A ``card.process`` that sends each APDU through the PN532 reader."""

    def __init__(self, reader: Pn532Reader, loop: asyncio.AbstractEventLoop) -> None:
        self._reader = reader
        self._loop = loop

    def process(self, apdu: bytes) -> bytes:
        [response] = self._loop.run_until_complete(self._reader.transmit([Step(apdu, ANY)]))
        return response.to_bytes()


def _row(metric: str, value: float, unit: str, path: str) -> Measurement:
    return Measurement(NAME, metric, round(value, 3), unit, {"line": path})


def run(ctx: Context) -> list[Measurement]:
    purchases = 20 if ctx.quick else 200
    card = memory_card()
    loop = asyncio.new_event_loop()
    try:
        with PtyServer(Pn532Chip(card)) as server:
            reader = Pn532Reader(server.path)
            try:
                line = _OverTheLine(reader, loop)
                in_process_purchase(line, 1, 1)  # type: ignore[arg-type]  # warm up, activate
                before = reader.line_stats.written + reader.line_stats.read
                started = time.perf_counter()
                with ctx.task("pn532 purchases over a pty", purchases) as advance:
                    for seq in range(2, purchases + 2):
                        in_process_purchase(line, 1, seq)  # type: ignore[arg-type]
                        advance()
                pty_seconds = (time.perf_counter() - started) / purchases
                wire = (reader.line_stats.written + reader.line_stats.read - before) / purchases
            finally:
                loop.run_until_complete(reader.close())
        started = time.perf_counter()
        for seq in range(purchases + 2, 2 * purchases + 2):
            in_process_purchase(card, 1, seq)
        direct_seconds = (time.perf_counter() - started) / purchases
    finally:
        loop.close()
    path = "pty (simulated PN532)"
    return [
        _row("bytes on the wire per purchase", wire, "B", path),
        _row("bytes on the wire per APDU", wire / APDUS_PER_PURCHASE, "B", path),
        _row("purchase at 115200 baud (computed)", wire * 10 / BAUD * 1000, "ms", "UART 115200"),
        _row("purchase over the pty (measured)", pty_seconds * 1000, "ms", path),
        _row("purchase on the card in process", direct_seconds * 1000, "ms", "no reader"),
    ]
