"""``open_reader(spec)``: a local reader backend from a short text (the agent's ``--reader``).

Specs:
- ``sim:IMAGE`` — the card in image file ``IMAGE``, in an in-process reader (:class:`SimReader`);
- ``pcsc`` — the first PC/SC reader pcscd knows;
- ``pcsc:NAME`` — the PC/SC reader named ``NAME``, or the only one whose name contains it
  (e.g. ``pcsc:Virtual PCD 00 00`` for a card served by ``webpurse card serve``);
- ``pn532:PORT`` or ``pn532:PORT:BAUD`` — an NXP PN532 on the serial line ``PORT`` (e.g.
  ``pn532:/dev/ttyUSB0``, default 115200 baud; ``webpurse card serve-pn532`` prints a pty to
  use), see ``docs/readers.md``.

The sim backend (and with it the card emulator) is imported only for a ``sim:`` spec, so
the terminal agent installed alone (``docs/agent.md``) runs without ``webpurse.card``; there
``sim:`` fails with :class:`ReaderSpecError` saying what is missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from webpurse.reader.base import Reader, ReaderError
from webpurse.reader.pcsc import PcscReader

if TYPE_CHECKING:
    from webpurse.reader.sim import SimReader


class LocalReader(Reader, Protocol):
    """What :func:`open_reader` returns (a :class:`PcscReader`, a ``Pn532Reader`` for
    ``pn532:``, or a ``SimReader`` for ``sim:``): a :class:`Reader` its owner closes."""

    async def close(self) -> None: ...


class ReaderSpecError(ReaderError, ValueError):
    """The reader spec names no known backend."""


def open_reader(spec: str) -> LocalReader:
    """Open the reader ``spec`` names; close it with ``await reader.close()``.

    Raises :class:`ReaderSpecError` for an unknown spec, ``ReaderError`` for a card image
    in use elsewhere, ``FileNotFoundError`` for a missing image, and ``PcscUnavailable`` /
    ``ReaderNotFound`` for PC/SC, ``Pn532Unavailable`` for a PN532 line that cannot be opened
    or where no PN532 answers.
    """
    kind, _, argument = spec.partition(":")
    if kind == "sim":
        if not argument:
            raise ReaderSpecError("sim needs a card image: sim:IMAGE")
        return _open_sim(argument)
    if kind == "pcsc":
        return PcscReader(argument or None)
    if kind == "pn532":
        if not argument:
            raise ReaderSpecError("pn532 needs a serial line: pn532:/dev/ttyUSB0[:BAUD]")
        from webpurse.reader.pn532 import Pn532Reader, parse_port

        try:
            port, baud = parse_port(argument)
        except ValueError as exc:
            raise ReaderSpecError(str(exc)) from None
        return Pn532Reader(port, baud)
    raise ReaderSpecError(
        f"unknown reader {spec!r}: use sim:IMAGE, pcsc, pcsc:NAME or pn532:PORT[:BAUD]"
    )


def _open_sim(image: str) -> SimReader:
    try:
        from webpurse.card.image import CardBusy
        from webpurse.reader.sim import SimReader
    except ImportError as exc:
        raise ReaderSpecError(
            f"sim:IMAGE needs the card emulator, which this install lacks ({exc}); "
            "install the full webpurse package, or use a PC/SC reader (pcsc)"
        ) from None
    try:
        return SimReader.from_image(image)
    except CardBusy as exc:  # the card is "in another reader": a reader-level failure
        raise ReaderError(str(exc)) from exc
