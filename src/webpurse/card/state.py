"""The card's persistent state, as the emulator knows it: defined in
:mod:`webpurse.protocol.purse` (the issuer produces it too) and re-exported here."""

from webpurse.protocol.purse import (
    DEFAULT_MAX_BALANCE,
    FORMAT_VERSION,
    LOG_RECORDS,
    MAC_FAILURE_LIMIT,
    MAX_COUNTER,
    PIN_TRIES,
    CardKey,
    CardState,
    KeyKind,
    Proof,
    default_dates,
)

__all__ = [
    "DEFAULT_MAX_BALANCE",
    "FORMAT_VERSION",
    "LOG_RECORDS",
    "MAC_FAILURE_LIMIT",
    "MAX_COUNTER",
    "PIN_TRIES",
    "CardKey",
    "CardState",
    "KeyKind",
    "Proof",
    "default_dates",
]
