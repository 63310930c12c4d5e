"""Command and response APDUs (ISO 7816-4 short form) and the status words of spec §5."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from webpurse.protocol.errors import ApduFormatError


class StatusWord(IntEnum):
    """The status words of pboc-epurse.md §5, plus the ISO ones a reader path produces."""

    SUCCESS = 0x9000
    WRONG_LENGTH = 0x6700
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    PIN_BLOCKED = 0x6983
    CONDITIONS_NOT_SATISFIED = 0x6985
    WRONG_DATA = 0x6A80
    APPLICATION_BLOCKED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    RECORD_NOT_FOUND = 0x6A83
    WRONG_P1P2 = 0x6A86
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    MEMORY_FAILURE = 0x6581
    NO_PRECISE_DIAGNOSIS = 0x6F00
    MAC_INVALID = 0x9302
    APPLICATION_LOCKED = 0x9303
    INSUFFICIENT_FUNDS = 0x9401
    COUNTER_AT_MAXIMUM = 0x9402
    KEY_INDEX_NOT_SUPPORTED = 0x9403
    PROOF_NOT_AVAILABLE = 0x9406


_NAMES: dict[int, str] = {
    0x9000: "success",
    0x6700: "wrong length",
    0x6982: "security status not satisfied (PIN needed)",
    0x6983: "PIN blocked",
    0x6985: "conditions not satisfied",
    0x6A80: "wrong data",
    0x6A81: "application blocked",
    0x6A82: "file not found",
    0x6A83: "record not found",
    0x6A86: "wrong P1/P2",
    0x6D00: "INS not supported",
    0x6E00: "CLA not supported",
    0x6581: "memory failure",
    0x6F00: "no precise diagnosis",
    0x9302: "MAC invalid",
    0x9303: "application permanently locked",
    0x9401: "insufficient funds",
    0x9402: "transaction counter at its maximum",
    0x9403: "key index not supported",
    0x9406: "MAC/TAC not available",
}


def describe_sw(sw: int) -> str:
    """A human name for a status word, including the parameterised 61xx, 6Cxx and 63Cx."""
    if sw in _NAMES:
        return _NAMES[sw]
    hi, lo = sw >> 8, sw & 0xFF
    if hi == 0x61:
        return f"{lo} more bytes available (GET RESPONSE)"
    if hi == 0x6C:
        return f"wrong Le, {lo} bytes available"
    if hi == 0x63 and lo & 0xF0 == 0xC0:
        return f"wrong PIN, {lo & 0x0F} tries left"
    return "unknown status word"


def is_success(sw: int) -> bool:
    return sw == StatusWord.SUCCESS


@dataclass(frozen=True, slots=True)
class CommandApdu:
    """A short command APDU. ``le`` None means no Le byte; 0 means "up to 256" (ISO)."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise ApduFormatError(f"{name} {value} is not a byte")
        if len(self.data) > 255:
            raise ApduFormatError(f"{len(self.data)} data bytes do not fit a short APDU")
        if self.le is not None and not 0 <= self.le <= 0xFF:
            raise ApduFormatError(f"Le {self.le} is not a byte")

    def to_bytes(self) -> bytes:
        out = bytes((self.cla, self.ins, self.p1, self.p2))
        if self.data:
            out += bytes((len(self.data),)) + self.data
        if self.le is not None:
            out += bytes((self.le,))
        return out

    @classmethod
    def from_bytes(cls, raw: bytes) -> CommandApdu:
        """Parse the four ISO 7816-4 short cases; anything else is ``ApduFormatError``."""
        n = len(raw)
        if n < 4:
            raise ApduFormatError(f"a command APDU needs 4 header bytes, got {n}")
        cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
        if n == 4:
            return cls(cla, ins, p1, p2)
        if n == 5:
            return cls(cla, ins, p1, p2, b"", raw[4])
        lc = raw[4]
        if lc == 0:
            raise ApduFormatError("Lc of 00 with data following (extended APDUs unsupported)")
        if n == 5 + lc:
            return cls(cla, ins, p1, p2, bytes(raw[5:]))
        if n == 6 + lc:
            return cls(cla, ins, p1, p2, bytes(raw[5 : 5 + lc]), raw[-1])
        raise ApduFormatError(f"Lc {lc} does not match the {n - 5} bytes after it")

    @property
    def expected_length(self) -> int | None:
        """Le as a byte count: 0 means 256 in a short APDU."""
        if self.le is None:
            return None
        return 256 if self.le == 0 else self.le

    def __str__(self) -> str:
        return self.to_bytes().hex().upper()


@dataclass(frozen=True, slots=True)
class ResponseApdu:
    """A response APDU: data then the two status bytes."""

    data: bytes
    sw: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> ResponseApdu:
        if len(raw) < 2:
            raise ApduFormatError(f"a response APDU needs 2 status bytes, got {len(raw)}")
        return cls(bytes(raw[:-2]), int.from_bytes(raw[-2:], "big"))

    def to_bytes(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    @property
    def ok(self) -> bool:
        return self.sw == StatusWord.SUCCESS

    @property
    def sw_name(self) -> str:
        return describe_sw(self.sw)

    def __str__(self) -> str:
        sw = f"{self.sw:04X}"
        return f"{self.data.hex().upper()} {sw}" if self.data else sw
