"""The key-encryption key (KEK) and the master-key kinds it wraps; the security error.

Its own module, below both :mod:`.settings` (which parses ``WEBPURSE_KEK``) and
:mod:`.security` / :mod:`.pkcs11` (which use it), so none of them imports another in a cycle.
"""

from __future__ import annotations

import base64
import binascii

KINDS = ("dpk", "dlk", "dtk")
KEK_SIZE = 32


class SecurityError(Exception):
    """The security module cannot work: no KEK, wrong KEK, missing master key."""


def parse_kek(text: str) -> bytes:
    """A 32-byte KEK from 64 hex digits or base64."""
    text = text.strip()
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SecurityError("the KEK must be 32 bytes in hex or base64") from None
    if len(raw) != KEK_SIZE:
        raise SecurityError(f"the KEK must be {KEK_SIZE} bytes, got {len(raw)}")
    return raw
