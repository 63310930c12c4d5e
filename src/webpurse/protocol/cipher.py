"""Block ciphers behind one small interface (spec §2, §4).

The PBOC e-purse uses two-key 3DES to diversify keys and derive session keys, and
single-DES CBC-MAC for MAC1/MAC2/TAC. Callers name a :class:`CipherSuite`, never a
cipher, so an SM4 suite (algorithm id 04 in later PBOC editions) can be added here
without touching them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from webpurse.protocol.errors import FieldError


class BlockCipher(Protocol):
    """What the e-purse cryptography needs from a block cipher."""

    @property
    def name(self) -> str: ...

    @property
    def block_size(self) -> int: ...

    @property
    def key_size(self) -> int: ...

    def encrypt_ecb(self, key: bytes, data: bytes) -> bytes:
        """Encrypt whole blocks in ECB mode."""
        ...

    def cbc_last_block(self, key: bytes, data: bytes) -> bytes:
        """Encrypt whole blocks in CBC mode with a zero IV and return the last block."""
        ...


def _ede(key: bytes) -> TripleDES:
    # Two-key 3DES (K1||K2) warns in cryptography; K1||K2||K1 is the same cipher (spec §4)
    # and does not, so no warning filter is needed here (changing the filters on every new
    # session key cost 2.7 % of the settlement server's CPU, issue 20's profile). An 8-byte
    # key K is single DES as K||K||K.
    if len(key) == 16:
        key = key + key[:8]
    elif len(key) == 8:
        key = key * 3
    return TripleDES(key)


_tdes_key = lru_cache(maxsize=4096)(_ede)


Encrypt = Callable[[bytes], bytes]
"""Encrypts whole 8-byte blocks (a kept encryptor's ``update``, never finalised)."""

_ZERO_IV = modes.CBC(bytes(8))  # immutable: shared, as building one is a third of a key's cost


def kept_ecb(key: bytes) -> Encrypt:
    """A DES-family ECB encryption under an 8- or 16-byte ``key``, its cipher kept by the
    caller: ECB of whole blocks keeps no state between updates, so one encryptor serves
    every block it is given. Building one is most of a MAC's cost (issue 20), so the card
    and the security module keep theirs per key instead of calling :meth:`encrypt_ecb`."""
    return Cipher(_ede(key), modes.ECB()).encryptor().update  # noqa: S305 - spec §2


def kept_cbc(key: bytes) -> Encrypt:
    """A DES-family CBC encryption with a zero IV under ``key``, kept and never finalised:
    its chaining value runs on from one call into the next (see ``crypto.KeptMac``)."""
    return Cipher(_ede(key), _ZERO_IV).encryptor().update


@dataclass(frozen=True)
class _DesFamily:
    name: str
    key_size: int
    block_size: int = 8

    def _check(self, key: bytes, data: bytes) -> None:
        if len(key) != self.key_size:
            raise FieldError(f"{self.name} needs a {self.key_size}-byte key, got {len(key)}")
        if not data or len(data) % self.block_size:
            raise FieldError(f"{self.name} needs whole {self.block_size}-byte blocks")

    def encrypt_ecb(self, key: bytes, data: bytes) -> bytes:
        self._check(key, data)
        encryptor = Cipher(_tdes_key(key), modes.ECB()).encryptor()  # noqa: S305 - spec §2
        return encryptor.update(data) + encryptor.finalize()

    def cbc_last_block(self, key: bytes, data: bytes) -> bytes:
        self._check(key, data)
        encryptor = Cipher(_tdes_key(key), modes.CBC(bytes(self.block_size))).encryptor()
        out = encryptor.update(data) + encryptor.finalize()
        return out[-self.block_size :]


TRIPLE_DES: BlockCipher = _DesFamily("3DES", 16)
"""Two-key triple DES, EDE, 16-byte keys (spec §2)."""

SINGLE_DES: BlockCipher = _DesFamily("DES", 8)
"""Single DES, 8-byte keys: the MAC cipher (spec §4)."""


@dataclass(frozen=True)
class CipherSuite:
    """The cipher used to derive keys and the one used for MACs, as one choice."""

    name: str
    key_cipher: BlockCipher
    mac_cipher: BlockCipher


DES_SUITE = CipherSuite("3des", TRIPLE_DES, SINGLE_DES)

SUITES: dict[str, CipherSuite] = {DES_SUITE.name: DES_SUITE}


def suite_named(name: str) -> CipherSuite:
    try:
        return SUITES[name]
    except KeyError:
        raise FieldError(f"unknown cipher suite {name!r}") from None
