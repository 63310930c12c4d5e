"""``open_reader(spec)``: a local reader backend from a short text (the agent's ``--reader``).

Specs:
- ``sim:IMAGE`` — the card in image file ``IMAGE``, in an in-process reader (:class:`SimReader`);
- ``pcsc`` — the first PC/SC reader pcscd knows;
- ``pcsc:NAME`` — the PC/SC reader named ``NAME``, or the only one whose name contains it
  (e.g. ``pcsc:Virtual PCD 00 00`` for a card served by ``webpurse card serve``).

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
    """What :func:`open_reader` returns (a :class:`PcscReader`, or a ``SimReader`` for
    ``sim:``): a :class:`Reader` its owner closes."""

    async def close(self) -> None: ...


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
        return _open_sim(argument)
    if kind == "pcsc":
        return PcscReader(argument or None)
    raise ReaderSpecError(f"unknown reader {spec!r}: use sim:IMAGE, pcsc or pcsc:NAME")


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
