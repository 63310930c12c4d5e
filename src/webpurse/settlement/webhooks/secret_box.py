"""Endpoint secrets at rest: sealed with AES-256-GCM under a key derived from the KEK."""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from webpurse.settlement.webhooks.errors import WebhookError


class SecretBox:
    """Encrypts endpoint secrets at rest with AES-256-GCM (the endpoint id as associated data).

    The key is derived from the settlement key-encryption key (``WEBPURSE_KEK``) with HKDF,
    so a database dump alone reveals no secret. The API shows a secret once, at creation.
    """

    _INFO = b"webpurse webhook endpoint secrets v1"

    def __init__(self, kek: bytes) -> None:
        if len(kek) < 16:
            raise ValueError("the key-encryption key must have at least 16 bytes")
        self._key = HKDF(algorithm=SHA256(), length=32, salt=None, info=self._INFO).derive(kek)

    def seal(self, endpoint_id: str, secret: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = AESGCM(self._key).encrypt(nonce, secret.encode("ascii"), endpoint_id.encode())
        return "v1:" + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, endpoint_id: str, sealed: str) -> str:
        if not sealed.startswith("v1:"):
            raise WebhookError("unknown webhook secret encoding")
        blob = base64.b64decode(sealed[3:])
        plain = AESGCM(self._key).decrypt(blob[:12], blob[12:], endpoint_id.encode())
        return plain.decode("ascii")
