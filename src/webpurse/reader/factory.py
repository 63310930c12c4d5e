"""``open_reader(spec)``: a local reader backend from a short text (the agent's ``--reader``).

Specs:
- ``sim:IMAGE`` — the card in image file ``IMAGE``, in an in-process reader (:class:`SimReader`);
- ``pcsc`` — the first PC/SC reader pcscd knows;
- ``pcsc:NAME`` — the PC/SC reader named ``NAME``, or the only one whose name contains it
  (e.g. ``pcsc:Virtual PCD 00 00`` for a card served by ``webpurse card serve``).
"""

from __future__ import annotations

from webpurse.card.image import CardBusy
from webpurse.reader.base import ReaderError
from webpurse.reader.pcsc import PcscReader
from webpurse.reader.sim import SimReader

LocalReader = SimReader | PcscReader


class ReaderSpecError(ReaderError, ValueError):
    """The reader spec names no known backend."""


def open_reader(spec: str) -> LocalReader:
    """Open the reader ``spec`` names; close it with ``await reader.close()``.

    Raises :class:`ReaderSpecError` for an unknown spec, ``ReaderError`` for a card image
    in use elsewhere, ``FileNotFoundError`` for a missing image, and ``PcscUnavailable`` /
    ``ReaderNotFound`` for PC/SC.
    """
    kind, _, argument = spec.partition(":")
    if kind == "sim":
        if not argument:
            raise ReaderSpecError("sim needs a card image: sim:IMAGE")
        try:
            return SimReader.from_image(argument)
        except CardBusy as exc:  # the card is "in another reader": a reader-level failure
            raise ReaderError(str(exc)) from exc
    if kind == "pcsc":
        return PcscReader(argument or None)
    raise ReaderSpecError(f"unknown reader {spec!r}: use sim:IMAGE, pcsc or pcsc:NAME")
