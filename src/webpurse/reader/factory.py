"""``open_reader(spec)``: a local reader backend from a short text (the agent's ``--reader``).

Specs:
- ``sim:IMAGE`` — the card in image file ``IMAGE``, in an in-process reader (:class:`SimReader`);
- ``pcsc`` — the first PC/SC reader pcscd knows;
- ``pcsc:NAME`` — the PC/SC reader named ``NAME``, or the only one whose name contains it
  (e.g. ``pcsc:Virtual PCD 00 00`` for a card served by ``webpurse card serve``).
"""

from __future__ import annotations

from webpurse.reader.base import ReaderError
from webpurse.reader.pcsc import PcscReader
from webpurse.reader.sim import SimReader

LocalReader = SimReader | PcscReader


class ReaderSpecError(ReaderError, ValueError):
    """The reader spec names no known backend."""


def open_reader(spec: str) -> LocalReader:
    """Open the reader ``spec`` names; close it with ``await reader.close()``."""
    kind, _, argument = spec.partition(":")
    if kind == "sim":
        if not argument:
            raise ReaderSpecError("sim needs a card image: sim:IMAGE")
        return SimReader.from_image(argument)
    if kind == "pcsc":
        return PcscReader(argument or None)
    raise ReaderSpecError(f"unknown reader {spec!r}: use sim:IMAGE, pcsc or pcsc:NAME")
