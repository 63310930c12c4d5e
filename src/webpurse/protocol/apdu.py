"""Command and response APDUs (ISO 7816-4 short form); status words are in :mod:`.status`."""

from __future__ import annotations

from dataclasses import dataclass

from webpurse.protocol.errors import ApduFormatError
from webpurse.protocol.status import StatusWord, describe_sw, is_success

_new = object.__new__
_set = object.__setattr__

__all__ = [
    "CommandApdu",
    "ResponseApdu",
    "StatusWord",
    "describe_sw",
    "is_success",
]


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
            return cls._parsed(cla, ins, p1, p2, b"", None)
        if n == 5:
            return cls._parsed(cla, ins, p1, p2, b"", raw[4])
        lc = raw[4]
        if lc == 0:
            raise ApduFormatError("Lc of 00 with data following (extended APDUs unsupported)")
        if n == 5 + lc:
            return cls._parsed(cla, ins, p1, p2, bytes(raw[5:]), None)
        if n == 6 + lc:
            return cls._parsed(cla, ins, p1, p2, bytes(raw[5 : 5 + lc]), raw[-1])
        raise ApduFormatError(f"Lc {lc} does not match the {n - 5} bytes after it")

    @classmethod
    def _parsed(
        cls, cla: int, ins: int, p1: int, p2: int, data: bytes, le: int | None
    ) -> CommandApdu:
        """The APDU :meth:`from_bytes` parsed, built without ``__post_init__``'s checks: each
        field is one byte of the APDU (or its ≤ 255 data bytes) and holds them already. The
        card parses every command it gets (issue 20: 2.6 → 1.0 µs an APDU)."""
        if cls is not CommandApdu:  # a subclass may check more: let it
            return cls(cla, ins, p1, p2, data, le)
        apdu = _new(cls)
        _set(apdu, "cla", cla)
        _set(apdu, "ins", ins)
        _set(apdu, "p1", p1)
        _set(apdu, "p2", p2)
        _set(apdu, "data", data)
        _set(apdu, "le", le)
        return apdu

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
