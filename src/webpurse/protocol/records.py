"""Typed records for the EP files: EF 0x15, EF 0x16 and the EF 0x18 log (spec §1).

Each record has ``from_bytes`` (strict: wrong length or non-BCD dates raise
:class:`FieldError`) and ``to_bytes``; the two are inverses.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from enum import IntEnum

from webpurse.protocol.errors import FieldError


class TransactionType(IntEnum):
    """Transaction types of spec §3 (P2 of GET TRANSACTION PROVE, the log's type byte)."""

    ED_LOAD = 0x01
    EP_LOAD = 0x02
    ED_PURCHASE = 0x05
    EP_PURCHASE = 0x06
    COMPOUND_PURCHASE = 0x09


class ApplicationType(IntEnum):
    ED = 0x01
    EP = 0x02
    ED_AND_EP = 0x03


def _bcd_digits(raw: bytes) -> str:
    digits = raw.hex()
    if not digits.isdigit():
        raise FieldError(f"{raw.hex().upper()} is not BCD")
    return digits


def encode_bcd_date(value: dt.date) -> bytes:
    return bytes.fromhex(value.strftime("%Y%m%d"))


def decode_bcd_date(raw: bytes) -> dt.date:
    """A 4-byte BCD date (YYYYMMDD); kept per value (dates recur: a batch's purchases share
    one, the cards of one issue share start and expiry dates)."""
    return _decode_bcd_date(raw if type(raw) is bytes else bytes(raw))


@functools.lru_cache(maxsize=1024)
def _decode_bcd_date(raw: bytes) -> dt.date:
    if len(raw) != 4:
        raise FieldError("a BCD date is 4 bytes")
    digits = _bcd_digits(raw)
    try:
        return dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError as exc:
        raise FieldError(f"{digits} is not a date: {exc}") from None


def encode_bcd_time(value: dt.time) -> bytes:
    return bytes.fromhex(value.strftime("%H%M%S"))


def decode_bcd_time(raw: bytes) -> dt.time:
    if len(raw) != 3:
        raise FieldError("a BCD time is 3 bytes")
    digits = _bcd_digits(raw)
    try:
        return dt.time(int(digits[:2]), int(digits[2:4]), int(digits[4:]))
    except ValueError as exc:
        raise FieldError(f"{digits} is not a time: {exc}") from None


def _need(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise FieldError(f"{name} must be {size} bytes, got {len(value)}")


@dataclass(frozen=True, slots=True)
class IssuerData:
    """EF 0x15, public application data, 30 bytes."""

    issuer_id: bytes
    application_type: int
    application_version: int
    serial: bytes
    start_date: dt.date
    expiry_date: dt.date
    issuer_defined: bytes = b"\x00\x00"

    SIZE = 30

    def __post_init__(self) -> None:
        if len(self.issuer_id) != 8 or len(self.serial) != 10 or len(self.issuer_defined) != 2:
            _need("issuer identifier", self.issuer_id, 8)
            _need("application serial number", self.serial, 10)
            _need("issuer-defined bytes", self.issuer_defined, 2)

    def to_bytes(self) -> bytes:
        return (
            self.issuer_id
            + bytes((self.application_type, self.application_version))
            + self.serial
            + encode_bcd_date(self.start_date)
            + encode_bcd_date(self.expiry_date)
            + self.issuer_defined
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> IssuerData:
        _need("EF 0x15", raw, cls.SIZE)
        return cls(
            issuer_id=bytes(raw[0:8]),
            application_type=raw[8],
            application_version=raw[9],
            serial=bytes(raw[10:20]),
            start_date=decode_bcd_date(raw[20:24]),
            expiry_date=decode_bcd_date(raw[24:28]),
            issuer_defined=bytes(raw[28:30]),
        )

    @property
    def card_number(self) -> str:
        return self.serial.hex().upper()


@dataclass(frozen=True, slots=True)
class CardholderData:
    """EF 0x16, cardholder data, 55 bytes; text fields are space padded (GBK-free ASCII)."""

    card_type: int = 0
    staff_flag: int = 0
    name: bytes = bytes(20)
    id_number: bytes = bytes(32)
    id_type: int = 0

    SIZE = 55

    def __post_init__(self) -> None:
        _need("cardholder name", self.name, 20)
        _need("cardholder id number", self.id_number, 32)

    def to_bytes(self) -> bytes:
        return (
            bytes((self.card_type, self.staff_flag))
            + self.name
            + self.id_number
            + bytes((self.id_type,))
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> CardholderData:
        _need("EF 0x16", raw, cls.SIZE)
        return cls(raw[0], raw[1], bytes(raw[2:22]), bytes(raw[22:54]), raw[54])


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One EF 0x18 record, 23 bytes: what the card logged for a load or purchase."""

    counter: int
    overdraft_limit: int
    amount: int
    transaction_type: int
    terminal_id: bytes
    date: dt.date
    time: dt.time

    SIZE = 23

    def __post_init__(self) -> None:
        _need("terminal id", self.terminal_id, 6)

    def to_bytes(self) -> bytes:
        return (
            self.counter.to_bytes(2, "big")
            + self.overdraft_limit.to_bytes(3, "big")
            + self.amount.to_bytes(4, "big")
            + bytes((self.transaction_type,))
            + self.terminal_id
            + encode_bcd_date(self.date)
            + encode_bcd_time(self.time)
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> LogRecord:
        _need("EF 0x18 record", raw, cls.SIZE)
        return cls(
            counter=int.from_bytes(raw[0:2], "big"),
            overdraft_limit=int.from_bytes(raw[2:5], "big"),
            amount=int.from_bytes(raw[5:9], "big"),
            transaction_type=raw[9],
            terminal_id=bytes(raw[10:16]),
            date=decode_bcd_date(raw[16:20]),
            time=decode_bcd_time(raw[20:23]),
        )
