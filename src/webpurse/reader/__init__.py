"""webpurse.reader: the reader interface, its local backends and the batch runner.

``RemoteReader`` (the server side of the remote-reader protocol) lives in
``webpurse.reader.remote``.
"""

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
from webpurse.reader.sim import ApduEvent, ApduHook, Fault, Phase, SimReader

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
