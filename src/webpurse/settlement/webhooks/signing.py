"""Standard Webhooks signing and verification (pure): secrets, signatures, headers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime

from webpurse.settlement.webhooks.errors import (
    InvalidSecretError,
    InvalidSignatureError,
    InvalidTimestampError,
    MissingHeaderError,
)

SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE = 300
"""Seconds a delivery's timestamp may differ from the receiver's clock (5 minutes)."""


HEADER_ID = "webhook-id"
HEADER_TIMESTAMP = "webhook-timestamp"
HEADER_SIGNATURE = "webhook-signature"


def new_secret(random_bytes: bytes | None = None) -> str:
    """A fresh endpoint secret, ``whsec_<base64 of 32 random bytes>``."""
    raw = random_bytes if random_bytes is not None else secrets.token_bytes(32)
    if len(raw) < 24:
        raise InvalidSecretError("a webhook secret needs at least 24 random bytes")
    return SECRET_PREFIX + base64.b64encode(raw).decode("ascii")


def secret_key(secret: str) -> bytes:
    """The HMAC key bytes of a ``whsec_…`` secret (the base64-decoded part after the prefix)."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidSecretError("a webhook secret starts with 'whsec_'")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidSecretError("a webhook secret is whsec_ followed by base64") from exc
    if not key:
        raise InvalidSecretError("a webhook secret must not be empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value ``v1,<base64 HMAC-SHA256>`` over ``id.timestamp.body``."""
    signed = msg_id.encode("utf-8") + b"." + str(int(timestamp)).encode("ascii") + b"." + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def _unix_seconds(now: datetime | float) -> float:
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        return now.timestamp()
    return float(now)


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    now: datetime | float,
    tolerance: int = DEFAULT_TOLERANCE,
) -> None:
    """Check a delivery: raise a :class:`WebhookVerificationError` subclass unless it is genuine.

    ``headers`` may use any letter case; ``body`` must be the raw bytes as received (parse
    JSON only after verifying). ``now`` is the receiver's clock (unix seconds or an aware
    datetime). A timestamp more than ``tolerance`` seconds away from ``now`` is refused so a
    captured delivery cannot be replayed later. Signatures compare in constant time; any one
    ``v1`` signature of the space-separated list may match (secret rotation).
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    msg_id = lowered.get(HEADER_ID, "").strip()
    timestamp_text = lowered.get(HEADER_TIMESTAMP, "").strip()
    signatures = lowered.get(HEADER_SIGNATURE, "").strip()
    for name, value in (
        (HEADER_ID, msg_id),
        (HEADER_TIMESTAMP, timestamp_text),
        (HEADER_SIGNATURE, signatures),
    ):
        if not value:
            raise MissingHeaderError(f"missing header {name}")
    if not re.fullmatch(r"[0-9]{1,12}", timestamp_text):
        raise InvalidTimestampError("webhook-timestamp is not unix seconds")
    timestamp = int(timestamp_text)
    skew = _unix_seconds(now) - timestamp
    if skew > tolerance:
        raise InvalidTimestampError(f"webhook-timestamp is {int(skew)} s old (stale)")
    if skew < -tolerance:
        raise InvalidTimestampError(f"webhook-timestamp is {int(-skew)} s in the future")
    expected = sign(secret, msg_id, timestamp, body).encode("ascii")
    matched = False
    for candidate in signatures.split():
        # No early exit: every candidate is compared, each in constant time.
        matched |= hmac.compare_digest(candidate.encode("utf-8", "replace"), expected)
    if not matched:
        raise InvalidSignatureError("no webhook-signature matches the body")


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers (plus content type) for one delivery attempt."""
    return {
        HEADER_ID: msg_id,
        HEADER_TIMESTAMP: str(int(timestamp)),
        HEADER_SIGNATURE: sign(secret, msg_id, timestamp, body),
        "content-type": "application/json",
    }
