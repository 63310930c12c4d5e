"""Pairings in Redis: any shop process issues a token and code, any other redeems it.

The async twin of :class:`~webpurse.reader.remote.pairing.Pairings` (same record, same
hashes: Redis holds only SHA-256 of tokens and codes). A record lives under its token
hash, its code hash points at it; both expire with the pairing. Redeeming is single use
across processes: ``GETDEL`` lets one taker win.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets

from webpurse.reader.remote.pairing import (
    CODE_ALPHABET,
    CODE_LENGTH,
    PAIRING_LIFETIME,
    Clock,
    Pairing,
    PairingRecord,
    digest,
    normalise_code,
    redeemed,
    utc_now,
)
from webpurse.reader.remote.shared import SharedState


def _encode(record: PairingRecord) -> str:
    return json.dumps(
        {
            "token": record.token_hash.hex(),
            "code": record.code_hash.hex(),
            "binding": record.binding,
            "display": record.display,
            "expires_at": record.expires_at.isoformat(),
            "wrong": record.wrong_codes_at_issue,
        }
    )


def _decode(raw: bytes | str) -> PairingRecord:
    data = json.loads(raw)
    return PairingRecord(
        token_hash=bytes.fromhex(data["token"]),
        code_hash=bytes.fromhex(data["code"]),
        binding=str(data["binding"]),
        display=data["display"],
        expires_at=dt.datetime.fromisoformat(data["expires_at"]),
        wrong_codes_at_issue=int(data["wrong"]),
    )


class RedisPairings:
    """Issues and redeems pairings in the shop's Redis (see :class:`Pairings`)."""

    def __init__(
        self,
        shared: SharedState,
        *,
        clock: Clock = utc_now,
        lifetime: dt.timedelta = PAIRING_LIFETIME,
    ) -> None:
        self._shared = shared
        self._clock = clock
        self._lifetime = lifetime

    def _record_key(self, token_hash: bytes) -> str:
        return self._shared.key("pairing", "token", token_hash.hex())

    def _code_key(self, code_hash: bytes) -> str:
        return self._shared.key("pairing", "code", code_hash.hex())

    async def _put(self, record: PairingRecord) -> bool:
        ttl = max(1, int((record.expires_at - self._clock()).total_seconds() * 1000))
        redis = self._shared.redis
        with self._shared.guard("storing a pairing"):
            if not await redis.set(
                self._record_key(record.token_hash), _encode(record), nx=True, px=ttl
            ):
                return False
            if not await redis.set(
                self._code_key(record.code_hash), record.token_hash.hex(), nx=True, px=ttl
            ):
                await redis.delete(self._record_key(record.token_hash))
                return False
        return True

    async def issue(
        self, binding: str, *, display: str | None = None, wrong_codes: int = 0
    ) -> Pairing:
        expires = self._clock() + self._lifetime
        while True:
            token = secrets.token_urlsafe(32)
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
            record = PairingRecord(
                digest(token), digest(code), binding, display, expires, wrong_codes
            )
            if await self._put(record):
                return Pairing(token, code, binding, expires)

    async def retire_code(self, record: PairingRecord) -> None:
        """Put ``record`` (taken by its code) back with its token only."""
        fresh = PairingRecord(
            record.token_hash,
            digest(secrets.token_urlsafe(32)),
            record.binding,
            record.display,
            record.expires_at,
            record.wrong_codes_at_issue,
        )
        await self._put(fresh)

    async def _take_by_token(self, token_hash: bytes) -> PairingRecord | None:
        redis = self._shared.redis
        with self._shared.guard("redeeming a pairing"):
            raw = await redis.getdel(self._record_key(token_hash))
            if raw is None:
                return None
            record = _decode(raw)
            await redis.delete(self._code_key(record.code_hash))
        return record

    async def _take_by_code(self, code_hash: bytes) -> PairingRecord | None:
        with self._shared.guard("redeeming a pairing"):
            token_hex = await self._shared.redis.getdel(self._code_key(code_hash))
        if token_hex is None:
            return None
        if isinstance(token_hex, bytes):
            token_hex = token_hex.decode()
        return await self._take_by_token(bytes.fromhex(token_hex))

    async def redeem(self, *, token: str | None = None, code: str | None = None) -> PairingRecord:
        """Spend a token or a code; raises :class:`PairingError` if unknown, used or expired."""
        if token is not None:
            record = await self._take_by_token(digest(token))
        elif code is not None:
            record = await self._take_by_code(digest(normalise_code(code)))
        else:
            record = None
        return redeemed(record, self._clock())
