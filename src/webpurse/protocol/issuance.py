"""Personalisation: turn issuer master keys and a serial number into a new card (spec §2).

The personalisation bureau's view: master keys in, a card state out. The settlement
server does the same from its security module and registers the card in one step; so
this lives in ``protocol``, shared by the emulator and the issuer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from webpurse.protocol.crypto import diversify
from webpurse.protocol.errors import FieldError
from webpurse.protocol.purse import (
    DEFAULT_MAX_BALANCE,
    CardKey,
    CardState,
    KeyKind,
    default_dates,
)
from webpurse.protocol.records import ApplicationType, CardholderData, IssuerData

DEFAULT_ISSUER_ID = b"WEBPURSE"
DEFAULT_KEY_INDEX = 0x01
DEFAULT_KEY_VERSION = 0x01
DEFAULT_ALGORITHM_ID = 0x00


@dataclass(frozen=True)
class MasterKeys:
    """Issuer master keys, one per kind: purchase (DPK), load (DLK), TAC (DTK)."""

    dpk: bytes
    dlk: bytes
    dtk: bytes

    def __post_init__(self) -> None:
        for name in ("dpk", "dlk", "dtk"):
            if len(getattr(self, name)) != 16:
                raise FieldError(f"master key {name} must be 16 bytes")

    def __repr__(self) -> str:  # never print keys
        return "MasterKeys(<redacted>)"

    @classmethod
    def from_json(cls, text: str) -> MasterKeys:
        try:
            raw = json.loads(text)
            return cls(*(bytes.fromhex(raw[name]) for name in ("dpk", "dlk", "dtk")))
        except (ValueError, KeyError, TypeError) as exc:
            raise FieldError(f"master keys need hex dpk, dlk and dtk: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> MasterKeys:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def parse_serial(text: str) -> bytes:
    try:
        serial = bytes.fromhex(text)
    except ValueError:
        raise FieldError(f"serial {text!r} is not hex") from None
    if len(serial) != 10:
        raise FieldError(f"the application serial number is 10 bytes, got {len(serial)}")
    return serial


def personalise_with_card_keys(
    serial: bytes,
    *,
    dpk: bytes,
    dlk: bytes,
    dtk: bytes,
    start: dt.date,
    expiry: dt.date | None = None,
    key_index: int = DEFAULT_KEY_INDEX,
    key_version: int = DEFAULT_KEY_VERSION,
    algorithm_id: int = DEFAULT_ALGORITHM_ID,
    max_balance: int = DEFAULT_MAX_BALANCE,
    issuer_id: bytes = DEFAULT_ISSUER_ID,
    pin: bytes | None = None,
    pin_required_for_load: bool = False,
) -> CardState:
    """A card from already-diversified card keys (the test path of spec §8)."""
    if expiry is None:
        start, expiry = default_dates(start)
    if not 0 < max_balance <= 0xFFFFFFFF:
        raise FieldError("maximum balance must fit 4 bytes")
    issuer = IssuerData(
        issuer_id=issuer_id,
        application_type=ApplicationType.EP,
        application_version=0x01,
        serial=serial,
        start_date=start,
        expiry_date=expiry,
    )
    keys = (
        CardKey(KeyKind.PURCHASE, key_index, key_version, algorithm_id, dpk),
        CardKey(KeyKind.LOAD, key_index, key_version, algorithm_id, dlk),
        CardKey(KeyKind.TAC, 0x00, key_version, algorithm_id, dtk),
    )
    return CardState(
        issuer=issuer,
        cardholder=CardholderData(),
        keys=keys,
        max_balance=max_balance,
        pin=pin,
        pin_required_for_load=pin_required_for_load,
    )


def personalise(
    master: MasterKeys,
    serial: bytes,
    *,
    start: dt.date,
    expiry: dt.date | None = None,
    max_balance: int = DEFAULT_MAX_BALANCE,
    issuer_id: bytes = DEFAULT_ISSUER_ID,
    pin: bytes | None = None,
) -> CardState:
    """A new card: each card key is diversified from its master key by the serial."""
    return personalise_with_card_keys(
        serial,
        dpk=diversify(master.dpk, serial),
        dlk=diversify(master.dlk, serial),
        dtk=diversify(master.dtk, serial),
        start=start,
        expiry=expiry,
        max_balance=max_balance,
        issuer_id=issuer_id,
        pin=pin,
    )
