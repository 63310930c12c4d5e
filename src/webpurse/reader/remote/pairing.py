"""Pairing: the single-use token (and its short code) that binds one agent to one payment
or load, behind a small :class:`PairingStore` (in memory by default), with an injected
clock."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from webpurse.reader.messages import ErrorCode

Clock = Callable[[], dt.datetime]

PAIRING_LIFETIME = dt.timedelta(minutes=5)
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"  # no 0/O, 1/I/L, U: easy to type
CODE_LENGTH = 8


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def digest(secret: str) -> bytes:
    """Stores keep only hashes of tokens, codes and resume tokens: a dump reveals none."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def normalise_code(code: str) -> str:
    """What the shopper typed, without separators and case: ``abcd-efgh`` → ``ABCDEFGH``."""
    return "".join(ch for ch in code.upper() if ch not in " -")


class PairingError(Exception):
    """A token or code that is unknown, already used or expired (``token_invalid``)."""

    code = ErrorCode.TOKEN_INVALID


@dataclass(frozen=True, slots=True)
class Pairing:
    """What the merchant hands the payment page: the token, the code, and when they lapse.

    ``token`` and ``code`` are secrets: show them to the shopper's page only, never log.
    """

    token: str
    code: str
    binding: str
    expires_at: dt.datetime

    @property
    def display_code(self) -> str:
        return f"{self.code[:4]}-{self.code[4:]}"

    def __repr__(self) -> str:
        return f"Pairing(binding={self.binding!r}, expires_at={self.expires_at.isoformat()})"


@dataclass(frozen=True, slots=True)
class PairingRecord:
    token_hash: bytes
    code_hash: bytes
    binding: str
    display: str | None
    expires_at: dt.datetime
    # The hub's count of wrong codes when this pairing was issued (CODE_GUESS_BUDGET).
    wrong_codes_at_issue: int = 0


class PairingStore(Protocol):
    """Where issued pairings wait to be redeemed. ``take_*`` removes atomically."""

    def put(self, record: PairingRecord) -> bool:
        """Store it; False if its token or code hash is already taken."""
        ...

    def take_by_token(self, token_hash: bytes) -> PairingRecord | None: ...

    def take_by_code(self, code_hash: bytes) -> PairingRecord | None: ...

    def purge(self, now: dt.datetime) -> None:
        """Forget records that expired before ``now``."""
        ...


class MemoryPairingStore:
    """The default store: one process, nothing survives a restart (a pairing lives 5 min)."""

    def __init__(self) -> None:
        self._by_token: dict[bytes, PairingRecord] = {}
        self._by_code: dict[bytes, PairingRecord] = {}

    def put(self, record: PairingRecord) -> bool:
        if record.token_hash in self._by_token or record.code_hash in self._by_code:
            return False
        self._by_token[record.token_hash] = record
        self._by_code[record.code_hash] = record
        return True

    def _remove(self, record: PairingRecord) -> PairingRecord:
        self._by_token.pop(record.token_hash, None)
        self._by_code.pop(record.code_hash, None)
        return record

    def take_by_token(self, token_hash: bytes) -> PairingRecord | None:
        record = self._by_token.get(token_hash)
        return None if record is None else self._remove(record)

    def take_by_code(self, code_hash: bytes) -> PairingRecord | None:
        record = self._by_code.get(code_hash)
        return None if record is None else self._remove(record)

    def purge(self, now: dt.datetime) -> None:
        for record in [r for r in self._by_token.values() if r.expires_at <= now]:
            self._remove(record)


def redeemed(record: PairingRecord | None, now: dt.datetime) -> PairingRecord:
    """The record a token or code was just taken from its store by (``None``: no such
    token or code, or it was used); raises :class:`PairingError` unless it may pair now."""
    if record is None:
        raise PairingError("pairing token or code unknown or already used")
    if now >= record.expires_at:
        raise PairingError("pairing token or code expired")
    return record


class Pairings:
    """Issues and redeems pairings: token (256 bits) and code (8 characters), single use,
    one shared lifetime, bound to one payment or load id. Redeeming either spends both."""

    def __init__(
        self,
        store: PairingStore | None = None,
        *,
        clock: Clock = utc_now,
        lifetime: dt.timedelta = PAIRING_LIFETIME,
    ) -> None:
        self._store: PairingStore = store if store is not None else MemoryPairingStore()
        self._clock = clock
        self._lifetime = lifetime

    def issue(self, binding: str, *, display: str | None = None, wrong_codes: int = 0) -> Pairing:
        """A new pairing for ``binding`` (e.g. ``pay_…``); ``display`` is shown by the agent
        as secondary text (the trusted lines are the origin and the card's amount);
        ``wrong_codes`` is the hub's count of wrong codes now (:data:`CODE_GUESS_BUDGET`)."""
        now = self._clock()
        self._store.purge(now)
        expires = now + self._lifetime
        while True:
            token = secrets.token_urlsafe(32)
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
            record = PairingRecord(
                digest(token), digest(code), binding, display, expires, wrong_codes
            )
            if self._store.put(record):
                return Pairing(token, code, binding, expires)

    def retire_code(self, record: PairingRecord) -> None:
        """Put ``record`` (taken by its code) back with its token only: the code is dead,
        the link and the token still pair."""
        dead = replace(record, code_hash=digest(secrets.token_urlsafe(32)))
        self._store.put(dead)

    def redeem(self, *, token: str | None = None, code: str | None = None) -> PairingRecord:
        """Spend a token or a code; raises :class:`PairingError` if unknown, used or expired."""
        if token is not None:
            record = self._store.take_by_token(digest(token))
        elif code is not None:
            record = self._store.take_by_code(digest(normalise_code(code)))
        else:
            record = None
        return redeemed(record, self._clock())
