"""Key diversification, session keys, MAC and TAC (pboc-epurse.md §2 and §4).

Pure functions over bytes. The suite defaults to 3DES/DES; pass another
:class:`~webpurse.protocol.cipher.CipherSuite` for another algorithm.
"""

from __future__ import annotations

import hmac

from webpurse.protocol.cipher import DES_SUITE, CipherSuite, kept_cbc
from webpurse.protocol.errors import FieldError

MAC_LENGTH = 4


def _need(name: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise FieldError(f"{name} must be {size} bytes, got {len(value)}")


def diversification_data(serial: bytes) -> bytes:
    """The right-most 8 bytes of the 10-byte application serial number (spec §1, §2)."""
    _need("application serial number", serial, 10)
    return serial[-8:]


def diversify(master_key: bytes, serial: bytes, suite: CipherSuite = DES_SUITE) -> bytes:
    """card_key = 3DES(MK, D) || 3DES(MK, NOT D), D from the serial (spec §2)."""
    _need("master key", master_key, suite.key_cipher.key_size)
    d = diversification_data(serial)
    not_d = bytes(b ^ 0xFF for b in d)
    return suite.key_cipher.encrypt_ecb(master_key, d) + suite.key_cipher.encrypt_ecb(
        master_key, not_d
    )


def load_session_block(random: bytes, online_counter: int) -> bytes:
    """What the DLK encrypts into the load session key: random 4 || online counter 2 || 80 00."""
    _need("card random", random, 4)
    return random + online_counter.to_bytes(2, "big") + b"\x80\x00"


def purchase_session_block(random: bytes, offline_counter: int, terminal_seq: int) -> bytes:
    """What the DPK encrypts into the purchase session key: random 4 || offline counter 2 ||
    last 2 bytes of the terminal transaction sequence number."""
    _need("card random", random, 4)
    return random + offline_counter.to_bytes(2, "big") + terminal_seq.to_bytes(4, "big")[2:]


def load_session_key(
    dlk: bytes, random: bytes, online_counter: int, suite: CipherSuite = DES_SUITE
) -> bytes:
    """3DES(DLK, random 4 || online counter 2 || 80 00) (spec §4)."""
    _need("DLK", dlk, suite.key_cipher.key_size)
    return suite.key_cipher.encrypt_ecb(dlk, load_session_block(random, online_counter))


def purchase_session_key(
    dpk: bytes,
    random: bytes,
    offline_counter: int,
    terminal_seq: int,
    suite: CipherSuite = DES_SUITE,
) -> bytes:
    """3DES(DPK, random 4 || offline counter 2 || last 2 bytes of terminal txn seq) (§4)."""
    _need("DPK", dpk, suite.key_cipher.key_size)
    block = purchase_session_block(random, offline_counter, terminal_seq)
    return suite.key_cipher.encrypt_ecb(dpk, block)


def pad(data: bytes, block_size: int = 8) -> bytes:
    """Append 80 then 00 up to a whole block, always (spec §4)."""
    padded = data + b"\x80"
    return padded + bytes(-len(padded) % block_size)


def mac(key: bytes, data: bytes, suite: CipherSuite = DES_SUITE) -> bytes:
    """CBC-MAC with a zero IV over the padded data; the first 4 bytes (spec §4)."""
    cipher = suite.mac_cipher
    _need("MAC key", key, cipher.key_size)
    return cipher.cbc_last_block(key, pad(data, cipher.block_size))[:MAC_LENGTH]


class KeptMac:
    """:func:`mac` under one 8- or 16-byte DES-family key (the 3DES/DES suite), the
    cipher kept: one call into it per MAC, not a new key schedule per MAC nor one call per
    block (issue 20: the card's and the security module's MACs).

    The CBC encryptor is never finalised, so its chaining value runs on from one MAC into
    the next: the last ciphertext block ``C`` of the previous MAC is the IV of the next.
    XOR-ing ``C`` into the next message's first block cancels it (``E(P1 ^ C ^ C)`` is
    ``E(P1)``), so every MAC is one of a zero IV, as spec §4 says. Not thread-safe: its
    owner serialises its use (the security module under its lock; an applet is one card).
    """

    __slots__ = ("_chain", "_update")

    def __init__(self, key: bytes) -> None:
        self._update = kept_cbc(key)
        self._chain = 0  # the encryptor's chaining value: the last block it produced

    def __repr__(self) -> str:
        return "KeptMac(<redacted>)"

    def mac(self, data: bytes) -> bytes:
        padded = pad(data)
        if self._chain:
            first = (int.from_bytes(padded[:8], "big") ^ self._chain).to_bytes(8, "big")
            padded = first + padded[8:]
        last = self._update(padded)[-8:]
        self._chain = int.from_bytes(last, "big")
        return last[:MAC_LENGTH]


def tac_key(dtk: bytes) -> bytes:
    """DTK left half XOR right half (spec §4)."""
    if len(dtk) % 2:
        raise FieldError("DTK must have an even length")
    half = len(dtk) // 2
    return bytes(a ^ b for a, b in zip(dtk[:half], dtk[half:], strict=True))


def macs_equal(expected: bytes, received: bytes) -> bool:
    """Compare MACs in constant time."""
    return hmac.compare_digest(expected, received)
