"""The card's persistent state: what an e-purse keeps in its EEPROM (spec §1, §2, §5).

It lives in ``protocol`` because both sides need it: the emulator (``webpurse.card``) runs
on it, and the issuer (settlement's security module) produces it when it personalises a
card, without importing the emulator (docs/architecture.md, import contracts).

A frozen value; every change makes a new one, so a commit is "replace the old value by
the new one", all or nothing. Encoded as JSON with hex bytes for the card image file.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field, replace
from typing import Any

from webpurse.protocol.records import CardholderData, IssuerData, LogRecord

MAX_COUNTER = 0xFFFF
LOG_RECORDS = 10
MAC_FAILURE_LIMIT = 10
PIN_TRIES = 3
DEFAULT_MAX_BALANCE = 100_000
FORMAT_VERSION = 1


class KeyKind:
    PURCHASE = "dpk"
    LOAD = "dlk"
    TAC = "dtk"
    MAINTENANCE = "dmk"


@dataclass(frozen=True, slots=True)
class CardKey:
    """A card key under an index, with the version and algorithm id the card reports."""

    kind: str
    index: int
    version: int
    algorithm_id: int
    value: bytes
    suite: str = "3des"


@dataclass(frozen=True, slots=True)
class Proof:
    """The stored MAC2 and TAC of the last transaction of one type, and its counter after."""

    counter_after: int
    mac2: bytes
    tac: bytes


@dataclass(frozen=True, slots=True)
class CardState:
    issuer: IssuerData
    cardholder: CardholderData
    keys: tuple[CardKey, ...]
    balance: int = 0
    online_counter: int = 0
    offline_counter: int = 0
    max_balance: int = DEFAULT_MAX_BALANCE
    overdraft_limit: int = 0
    log: tuple[LogRecord, ...] = ()
    load_proof: Proof | None = None
    purchase_proof: Proof | None = None
    mac_failures: int = 0
    locked: bool = False
    blocked: bool = False
    pin: bytes | None = None
    pin_tries_left: int = PIN_TRIES
    pin_required_for_load: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def serial(self) -> bytes:
        return self.issuer.serial

    def key(self, kind: str, index: int) -> CardKey | None:
        for key in self.keys:
            if key.kind == kind and key.index == index:
                return key
        return None

    def tac_key(self) -> CardKey:
        for key in self.keys:
            if key.kind == KeyKind.TAC:
                return key
        raise LookupError("card has no TAC key")

    def with_log(self, record: LogRecord) -> CardState:
        return replace(self, log=((record, *self.log))[:LOG_RECORDS])

    # --- encoding ----------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(_encode(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CardState:
        return _decode(json.loads(text))


def _proof_to(proof: Proof | None) -> dict[str, Any] | None:
    if proof is None:
        return None
    return {"counter_after": proof.counter_after, "mac2": proof.mac2.hex(), "tac": proof.tac.hex()}


def _proof_from(raw: dict[str, Any] | None) -> Proof | None:
    if raw is None:
        return None
    return Proof(int(raw["counter_after"]), bytes.fromhex(raw["mac2"]), bytes.fromhex(raw["tac"]))


def _encode(state: CardState) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "ef15": state.issuer.to_bytes().hex(),
        "ef16": state.cardholder.to_bytes().hex(),
        "keys": [
            {
                "kind": k.kind,
                "index": k.index,
                "version": k.version,
                "algorithm_id": k.algorithm_id,
                "suite": k.suite,
                "value": k.value.hex(),
            }
            for k in state.keys
        ],
        "balance": state.balance,
        "online_counter": state.online_counter,
        "offline_counter": state.offline_counter,
        "max_balance": state.max_balance,
        "overdraft_limit": state.overdraft_limit,
        "log": [r.to_bytes().hex() for r in state.log],
        "load_proof": _proof_to(state.load_proof),
        "purchase_proof": _proof_to(state.purchase_proof),
        "mac_failures": state.mac_failures,
        "locked": state.locked,
        "blocked": state.blocked,
        "pin": state.pin.hex() if state.pin is not None else None,
        "pin_tries_left": state.pin_tries_left,
        "pin_required_for_load": state.pin_required_for_load,
        "extra": state.extra,
    }


def _decode(raw: dict[str, Any]) -> CardState:
    if raw.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported card image format {raw.get('format')!r}")
    return CardState(
        issuer=IssuerData.from_bytes(bytes.fromhex(raw["ef15"])),
        cardholder=CardholderData.from_bytes(bytes.fromhex(raw["ef16"])),
        keys=tuple(
            CardKey(
                kind=k["kind"],
                index=int(k["index"]),
                version=int(k["version"]),
                algorithm_id=int(k["algorithm_id"]),
                value=bytes.fromhex(k["value"]),
                suite=k.get("suite", "3des"),
            )
            for k in raw["keys"]
        ),
        balance=int(raw["balance"]),
        online_counter=int(raw["online_counter"]),
        offline_counter=int(raw["offline_counter"]),
        max_balance=int(raw["max_balance"]),
        overdraft_limit=int(raw["overdraft_limit"]),
        log=tuple(LogRecord.from_bytes(bytes.fromhex(r)) for r in raw["log"]),
        load_proof=_proof_from(raw["load_proof"]),
        purchase_proof=_proof_from(raw["purchase_proof"]),
        mac_failures=int(raw["mac_failures"]),
        locked=bool(raw["locked"]),
        blocked=bool(raw["blocked"]),
        pin=bytes.fromhex(raw["pin"]) if raw["pin"] is not None else None,
        pin_tries_left=int(raw["pin_tries_left"]),
        pin_required_for_load=bool(raw["pin_required_for_load"]),
        extra=dict(raw.get("extra", {})),
    )


def default_dates(today: dt.date, years: int = 5) -> tuple[dt.date, dt.date]:
    try:
        expiry = today.replace(year=today.year + years)
    except ValueError:  # 29 February
        expiry = today.replace(year=today.year + years, day=28)
    return today, expiry
