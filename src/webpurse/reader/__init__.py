"""webpurse.reader: the reader interface, its local backends and the batch runner.

``RemoteReader`` (the server side of the remote-reader protocol) lives in
``webpurse.reader.remote``. The simulated reader (:class:`SimReader` and its fault
injection) runs the card emulator in-process, so it is loaded only when first named
(``webpurse.reader.SimReader``, or ``open_reader("sim:…")``): importing this package, or
the terminal agent, loads nothing from ``webpurse.card``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from webpurse.reader.base import (
    SUCCESS,
    BatchRefused,
    CardInfo,
    CardRemoved,
    NoCard,
    OutcomeUnknown,
    Reader,
    ReaderDisconnected,
    ReaderError,
    ReaderTimeout,
    Step,
)
from webpurse.reader.batch import LinkBroken, run_batch
from webpurse.reader.factory import LocalReader, ReaderSpecError, open_reader
from webpurse.reader.pcsc import (
    PcscError,
    PcscReader,
    PcscUnavailable,
    ReaderNotFound,
    list_readers,
)

if TYPE_CHECKING:
    from webpurse.reader.sim import ApduEvent, ApduHook, Fault, Phase, SimReader

_SIM_NAMES = frozenset({"ApduEvent", "ApduHook", "Fault", "Phase", "SimReader"})


def __getattr__(name: str) -> Any:
    """The sim backend's names, imported on first use (it needs the card emulator)."""
    if name in _SIM_NAMES:
        from webpurse.reader import sim

        return getattr(sim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SUCCESS",
    "ApduEvent",
    "ApduHook",
    "BatchRefused",
    "CardInfo",
    "CardRemoved",
    "Fault",
    "LinkBroken",
    "LocalReader",
    "NoCard",
    "OutcomeUnknown",
    "PcscError",
    "PcscReader",
    "PcscUnavailable",
    "Phase",
    "Reader",
    "ReaderDisconnected",
    "ReaderError",
    "ReaderNotFound",
    "ReaderSpecError",
    "ReaderTimeout",
    "SimReader",
    "Step",
    "list_readers",
    "open_reader",
    "run_batch",
]
