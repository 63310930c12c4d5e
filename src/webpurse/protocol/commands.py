"""One class per command of pboc-epurse.md §3: build it, parse it, and parse its answer.

A terminal builds ``Command(...).to_apdu()`` and reads ``Response.from_data(data)``;
the card parses ``Command.from_apdu(apdu)``. ``from_apdu`` checks CLA/INS, P1/P2 and the
lengths, raising :class:`ApduFormatError` for a wrong Lc (SW 6700) and
:class:`WrongParameters` for wrong P1/P2 (SW 6A86), so both sides agree byte for byte.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import ClassVar

from webpurse.protocol import status
from webpurse.protocol.apdu import CommandApdu
from webpurse.protocol.errors import ApduFormatError, FieldError, ProtocolError
from webpurse.protocol.records import (
    TransactionType,
    decode_bcd_date,
    decode_bcd_time,
    encode_bcd_date,
    encode_bcd_time,
)

PSE_NAME = b"1PAY.SYS.DDF01"
EP_AID = bytes.fromhex("A00000000386980701")
EP_FID = bytes.fromhex("1001")
MF_FID = bytes.fromhex("3F00")

SFI_DIRECTORY = 0x01
SFI_ISSUER = 0x15
SFI_CARDHOLDER = 0x16
SFI_LOG = 0x18

CLA_ISO = 0x00
CLA_PROPRIETARY = 0x80

INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_READ_RECORD = 0xB2
INS_VERIFY = 0x20
INS_GET_BALANCE = 0x5C
INS_INITIALIZE = 0x50
INS_CREDIT_FOR_LOAD = 0x52
INS_DEBIT_FOR_PURCHASE = 0x54
INS_GET_TRANSACTION_PROVE = 0x5A

P2_EP = 0x02
P2_ED = 0x01

MAX_AMOUNT = 0xFFFFFFFF


class WrongParameters(ProtocolError):
    """P1/P2 not allowed for the command (SW 6A86)."""


def _need_len(name: str, data: bytes, size: int) -> None:
    if len(data) != size:
        raise ApduFormatError(f"{name} takes {size} data bytes, got {len(data)}")


def _check_amount(amount: int) -> None:
    if not 0 <= amount <= MAX_AMOUNT:
        raise FieldError(f"amount {amount} does not fit 4 bytes")


def _check_terminal(terminal_id: bytes) -> None:
    if len(terminal_id) != 6:
        raise FieldError(f"terminal id must be 6 bytes, got {len(terminal_id)}")


@dataclass(frozen=True, slots=True)
class Select:
    """SELECT by DF name (P1 04) or by file id (P1 00)."""

    name: bytes | None = None
    fid: bytes | None = None

    INS: ClassVar[int] = INS_SELECT

    def to_apdu(self) -> CommandApdu:
        if self.name is not None:
            return CommandApdu(CLA_ISO, INS_SELECT, 0x04, 0x00, self.name, 0x00)
        if self.fid is not None:
            return CommandApdu(CLA_ISO, INS_SELECT, 0x00, 0x00, self.fid, 0x00)
        raise FieldError("SELECT needs a name or a file id")

    @classmethod
    def from_apdu(cls, apdu: CommandApdu) -> Select:
        if apdu.p2 not in (0x00, 0x0C):
            raise WrongParameters("SELECT P2 must be 00 (first occurrence)")
        if apdu.p1 == 0x04:
            if not 1 <= len(apdu.data) <= 16:
                raise ApduFormatError("SELECT by name takes a 1 to 16 byte name")
            return cls(name=apdu.data)
        if apdu.p1 == 0x00:
            _need_len("SELECT by file id", apdu.data, 2)
            return cls(fid=apdu.data)
        raise WrongParameters("SELECT P1 must be 00 or 04")


@dataclass(frozen=True, slots=True)
class ReadBinary:
    """READ BINARY with a short file identifier: ``00 B0 (80|SFI) offset Le``."""

    sfi: int
    offset: int = 0
    le: int = 0

    INS: ClassVar[int] = INS_READ_BINARY

    def to_apdu(self) -> CommandApdu:
        return CommandApdu(CLA_ISO, INS_READ_BINARY, 0x80 | self.sfi, self.offset, b"", self.le)

    @classmethod
    def from_apdu(cls, apdu: CommandApdu) -> ReadBinary:
        if apdu.data:
            raise ApduFormatError("READ BINARY takes no data")
        if not apdu.p1 & 0x80 or apdu.p1 & 0x60:
            raise WrongParameters("READ BINARY supports only P1 = 80|SFI")
        return cls(apdu.p1 & 0x1F, apdu.p2, 0 if apdu.le is None else apdu.le)


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """READ RECORD by number: ``00 B2 nn (SFI<<3 | 4) Le``."""

    sfi: int
    record: int
    le: int = 0

    INS: ClassVar[int] = INS_READ_RECORD

    def to_apdu(self) -> CommandApdu:
        return CommandApdu(CLA_ISO, INS_READ_RECORD, self.record, (self.sfi << 3) | 4, b"", self.le)

    @classmethod
    def from_apdu(cls, apdu: CommandApdu) -> ReadRecord:
        if apdu.data:
            raise ApduFormatError("READ RECORD takes no data")
        if apdu.p2 & 0x07 != 0x04 or apdu.p1 == 0:
            raise WrongParameters("READ RECORD supports only P1 = record, P2 = SFI<<3|4")
        return cls(apdu.p2 >> 3, apdu.p1, 0 if apdu.le is None else apdu.le)


@dataclass(frozen=True, slots=True)
class Verify:
    """VERIFY (PIN): ``00 20 00 00 Lc PIN``, the PIN in BCD, 2 to 6 bytes."""

    pin: bytes

    INS: ClassVar[int] = INS_VERIFY

    def to_apdu(self) -> CommandApdu:
        return CommandApdu(CLA_ISO, INS_VERIFY, 0x00, 0x00, self.pin)

    @classmethod
    def from_apdu(cls, apdu: CommandApdu) -> Verify:
        if apdu.p1 != 0 or apdu.p2 != 0:
            raise WrongParameters("VERIFY P1/P2 must be 00 00")
        if not 2 <= len(apdu.data) <= 6:
            raise ApduFormatError("VERIFY takes a 2 to 6 byte PIN")
        return cls(apdu.data)

    @classmethod
    def from_digits(cls, digits: str) -> Verify:
        if not digits.isdigit() or not 4 <= len(digits) <= 12:
            raise FieldError("a PIN is 4 to 12 digits")
        if len(digits) % 2:
            digits += "F"
        return cls(bytes.fromhex(digits))


@dataclass(frozen=True, slots=True)
class GetBalance:
    """GET BALANCE ``80 5C 00 02 04`` (P2 02 = EP)."""

    INS: ClassVar[int] = INS_GET_BALANCE

    def to_apdu(self) -> CommandApdu:
        return CommandApdu(CLA_PROPRIETARY, INS_GET_BALANCE, 0x00, P2_EP, b"", 0x04)

    @classmethod
    def from_apdu(cls, apdu: CommandApdu) -> GetBalance:
        if apdu.data:
            raise ApduFormatError("GET BALANCE takes no data")
        if apdu.p1 != 0 or apdu.p2 != P2_EP:
            raise WrongParameters("GET BALANCE supports P1 00, P2 02 (EP)")
        return cls()


@dataclass(frozen=True, slots=True)
class BalanceResponse:
    balance: int

    @classmethod
    def from_data(cls, data: bytes) -> BalanceResponse:
        _need_len("GET BALANCE response", data, 4)
        return cls(int.from_bytes(data, "big"))

    def to_data(self) -> bytes:
        return self.balance.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class _Initialize:
    key_index: int
    amount: int
    terminal_id: bytes

    P1: ClassVar[int]
    LE: ClassVar[int]

    def __post_init__(self) -> None:
        _check_amount(self.amount)
        _check_terminal(self.terminal_id)
        if not 0 <= self.key_index <= 0xFF:
            raise FieldError("key index is one byte")

    def to_apdu(self) -> CommandApdu:
        data = bytes((self.key_index,)) + self.amount.to_bytes(4, "big") + self.terminal_id
        return CommandApdu(CLA_PROPRIETARY, INS_INITIALIZE, self.P1, P2_EP, data, self.LE)


@dataclass(frozen=True, slots=True)
class InitializeForLoad(_Initialize):
    """INITIALIZE FOR LOAD ``80 50 00 02 0B keyIdx amount terminal 10``."""

    P1: ClassVar[int] = 0x00
    LE: ClassVar[int] = 0x10


@dataclass(frozen=True, slots=True)
class InitializeForPurchase(_Initialize):
    """INITIALIZE FOR PURCHASE ``80 50 01 02 0B keyIdx amount terminal 0F``."""

    P1: ClassVar[int] = 0x01
    LE: ClassVar[int] = 0x0F


def parse_initialize(apdu: CommandApdu) -> InitializeForLoad | InitializeForPurchase:
    """The card's parser for INS 50; P2 01 (ED) is not supported here (spec §3)."""
    if apdu.p1 not in (0x00, 0x01) or apdu.p2 != P2_EP:
        raise WrongParameters("INITIALIZE supports P1 00/01 with P2 02 (EP)")
    _need_len("INITIALIZE", apdu.data, 11)
    key_index = apdu.data[0]
    amount = int.from_bytes(apdu.data[1:5], "big")
    terminal_id = bytes(apdu.data[5:11])
    if apdu.p1 == 0x00:
        return InitializeForLoad(key_index, amount, terminal_id)
    return InitializeForPurchase(key_index, amount, terminal_id)


@dataclass(frozen=True, slots=True)
class InitializeForLoadResponse:
    """old balance 4 || online counter 2 || key version 1 || alg id 1 || random 4 || MAC1 4."""

    balance: int
    online_counter: int
    key_version: int
    algorithm_id: int
    random: bytes
    mac1: bytes

    SIZE: ClassVar[int] = 16

    @classmethod
    def from_data(cls, data: bytes) -> InitializeForLoadResponse:
        _need_len("INITIALIZE FOR LOAD response", data, cls.SIZE)
        return cls(
            balance=int.from_bytes(data[0:4], "big"),
            online_counter=int.from_bytes(data[4:6], "big"),
            key_version=data[6],
            algorithm_id=data[7],
            random=bytes(data[8:12]),
            mac1=bytes(data[12:16]),
        )

    def to_data(self) -> bytes:
        return (
            self.balance.to_bytes(4, "big")
            + self.online_counter.to_bytes(2, "big")
            + bytes((self.key_version, self.algorithm_id))
            + self.random
            + self.mac1
        )


@dataclass(frozen=True, slots=True)
class InitializeForPurchaseResponse:
    """balance 4 || offline counter 2 || overdraft 3 || key version 1 || alg id 1 || random 4."""

    balance: int
    offline_counter: int
    overdraft_limit: int
    key_version: int
    algorithm_id: int
    random: bytes

    SIZE: ClassVar[int] = 15

    @classmethod
    def from_data(cls, data: bytes) -> InitializeForPurchaseResponse:
        _need_len("INITIALIZE FOR PURCHASE response", data, cls.SIZE)
        return cls(  # balance, offline counter, overdraft, key version, algorithm, random
            int.from_bytes(data[0:4], "big"),
            int.from_bytes(data[4:6], "big"),
            int.from_bytes(data[6:9], "big"),
            data[9],
            data[10],
            bytes(data[11:15]),
        )

    def to_data(self) -> bytes:
        return (
            self.balance.to_bytes(4, "big")
            + self.offline_counter.to_bytes(2, "big")
            + self.overdraft_limit.to_bytes(3, "big")
            + bytes((self.key_version, self.algorithm_id))
            + self.random
        )


@dataclass(frozen=True, slots=True)
class CreditForLoad:
    """CREDIT FOR LOAD ``80 52 00 00 0B date 4 || time 3 || MAC2 4, Le 04`` → TAC 4."""

    date: dt.date
    time: dt.time
    mac2: bytes

    INS: ClassVar[int] = INS_CREDIT_FOR_LOAD

    def to_apdu(self) -> CommandApdu:
        data = encode_bcd_date(self.date) + encode_bcd_time(self.time) + self.mac2
        return CommandApdu(CLA_PROPRIETARY, INS_CREDIT_FOR_LOAD, 0x00, 0x00, data, 0x04)

    @classmethod
    def from_apdu(cls, apdu: CommandApdu) -> CreditForLoad:
        if apdu.p1 != 0 or apdu.p2 != 0:
            raise WrongParameters("CREDIT FOR LOAD P1/P2 must be 00 00")
        _need_len("CREDIT FOR LOAD", apdu.data, 11)
        return cls(decode_bcd_date(apdu.data[0:4]), decode_bcd_time(apdu.data[4:7]), apdu.data[7:])


@dataclass(frozen=True, slots=True)
class CreditForLoadResponse:
    tac: bytes

    @classmethod
    def from_data(cls, data: bytes) -> CreditForLoadResponse:
        _need_len("CREDIT FOR LOAD response", data, 4)
        return cls(bytes(data))

    def to_data(self) -> bytes:
        return self.tac


@dataclass(frozen=True, slots=True)
class DebitForPurchase:
    """DEBIT FOR PURCHASE ``80 54 01 00 0F seq 4 || date 4 || time 3 || MAC1 4, Le 08``."""

    terminal_seq: int
    date: dt.date
    time: dt.time
    mac1: bytes

    INS: ClassVar[int] = INS_DEBIT_FOR_PURCHASE

    def to_apdu(self) -> CommandApdu:
        data = (
            self.terminal_seq.to_bytes(4, "big")
            + encode_bcd_date(self.date)
            + encode_bcd_time(self.time)
            + self.mac1
        )
        return CommandApdu(CLA_PROPRIETARY, INS_DEBIT_FOR_PURCHASE, 0x01, 0x00, data, 0x08)

    @classmethod
    def from_apdu(cls, apdu: CommandApdu) -> DebitForPurchase:
        if apdu.p1 != 0x01 or apdu.p2 != 0x00:
            raise WrongParameters("DEBIT FOR PURCHASE P1/P2 must be 01 00")
        _need_len("DEBIT FOR PURCHASE", apdu.data, 15)
        d = apdu.data
        return cls(
            int.from_bytes(d[0:4], "big"), decode_bcd_date(d[4:8]), decode_bcd_time(d[8:11]), d[11:]
        )


@dataclass(frozen=True, slots=True)
class DebitForPurchaseResponse:
    """TAC 4 || MAC2 4 (spec §3: the reverse of GET TRANSACTION PROVE)."""

    tac: bytes
    mac2: bytes

    @classmethod
    def from_data(cls, data: bytes) -> DebitForPurchaseResponse:
        _need_len("DEBIT FOR PURCHASE response", data, 8)
        return cls(bytes(data[0:4]), bytes(data[4:8]))

    def to_data(self) -> bytes:
        return self.tac + self.mac2


@dataclass(frozen=True, slots=True)
class GetTransactionProve:
    """GET TRANSACTION PROVE ``80 5A 00 tt 02 counter 08``; counter = the card's current one."""

    transaction_type: int
    counter: int

    INS: ClassVar[int] = INS_GET_TRANSACTION_PROVE

    def to_apdu(self) -> CommandApdu:
        return CommandApdu(
            CLA_PROPRIETARY,
            INS_GET_TRANSACTION_PROVE,
            0x00,
            self.transaction_type,
            self.counter.to_bytes(2, "big"),
            0x08,
        )

    @classmethod
    def from_apdu(cls, apdu: CommandApdu) -> GetTransactionProve:
        if apdu.p1 != 0 or apdu.p2 not in set(TransactionType):
            raise WrongParameters("GET TRANSACTION PROVE P1 must be 00 and P2 a transaction type")
        _need_len("GET TRANSACTION PROVE", apdu.data, 2)
        return cls(apdu.p2, int.from_bytes(apdu.data, "big"))


@dataclass(frozen=True, slots=True)
class TransactionProof:
    """GET TRANSACTION PROVE's answer: MAC2 4 || TAC 4."""

    mac2: bytes
    tac: bytes

    @classmethod
    def from_data(cls, data: bytes) -> TransactionProof:
        _need_len("GET TRANSACTION PROVE response", data, 8)
        return cls(bytes(data[0:4]), bytes(data[4:8]))

    def to_data(self) -> bytes:
        return self.mac2 + self.tac


def prove_counter(counter_before: int) -> int:
    """The counter GET TRANSACTION PROVE names for a transaction that started at
    ``counter_before`` (the counter its INITIALIZE reported): the card's counter after that
    transaction, ``counter_before + 1`` (spec §3). A proof exists only if the card's counter
    moved; for any other value the card answers 9406."""
    return counter_before + 1


_STATUSES_BY_INS: dict[int, status.CommandStatuses] = {
    INS_SELECT: status.SELECT,
    INS_READ_BINARY: status.READ_BINARY,
    INS_READ_RECORD: status.READ_RECORD,
    INS_VERIFY: status.VERIFY,
    INS_GET_BALANCE: status.GET_BALANCE,
    INS_CREDIT_FOR_LOAD: status.CREDIT_FOR_LOAD,
    INS_DEBIT_FOR_PURCHASE: status.DEBIT_FOR_PURCHASE,
    INS_GET_TRANSACTION_PROVE: status.GET_TRANSACTION_PROVE,
}


def statuses_for(apdu: CommandApdu) -> status.CommandStatuses:
    """The status-word table of the command ``apdu`` is (spec §5): INITIALIZE's by its P1;
    an instruction the e-purse does not know gets only the common answers."""
    if apdu.ins == INS_INITIALIZE:
        if apdu.p1 == InitializeForLoad.P1:
            return status.INITIALIZE_FOR_LOAD
        return status.INITIALIZE_FOR_PURCHASE
    return _STATUSES_BY_INS.get(apdu.ins, status.UNKNOWN_COMMAND)
