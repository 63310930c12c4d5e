"""Exceptions of the protocol package.

Each maps to one status word at the card edge (see ``webpurse.card``) and to one clear
message elsewhere.
"""

from __future__ import annotations

from webpurse.protocol.status import describe_sw


class ProtocolError(Exception):
    """Base class: bytes that do not form what the spec (pboc-epurse.md) says they must."""


class ApduFormatError(ProtocolError):
    """A command or response APDU whose length fields do not add up (maps to SW 6700)."""


class FieldError(ProtocolError):
    """A field with a value outside its range: a non-BCD date, a wrong-sized key, ..."""


class StatusError(ProtocolError):
    """A card answered with a status word that the caller did not accept."""

    def __init__(self, sw: int, command: str = "") -> None:
        self.sw = sw
        self.command = command
        where = f"{command}: " if command else ""
        super().__init__(f"{where}card answered {sw:04X} ({describe_sw(sw)})")
