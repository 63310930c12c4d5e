"""The security module: master keys and every MAC the host computes or checks (spec §2, §4).

Nothing outside this module ever holds a key. The interface is
:class:`~webpurse.settlement.card_macs.SecurityModule` (narrow on purpose, so a PKCS#11 HSM
can implement it; every MAC is written there once); :class:`SoftwareSecurityModule`
is the default: master keys per kind (dpk, dlk, dtk) and version, generated at init,
stored AES-256-GCM encrypted under a key-encryption key (KEK) from ``WEBPURSE_KEK``
(hex or base64) or the file ``WEBPURSE_KEK_FILE``. All crypto goes through
:mod:`webpurse.protocol.host` and :mod:`webpurse.protocol.crypto`.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select

from webpurse.protocol.cipher import Encrypt, kept_ecb
from webpurse.protocol.crypto import KeptMac, diversify, tac_key
from webpurse.protocol.errors import FieldError

if TYPE_CHECKING:
    from webpurse.settlement.db import SessionFactory
    from webpurse.settlement.settings import Settings

from webpurse.settlement.card_macs import SecurityModule as SecurityModule
from webpurse.settlement.kek import KEK_SIZE as KEK_SIZE
from webpurse.settlement.kek import KINDS as KINDS
from webpurse.settlement.kek import SecurityError as SecurityError
from webpurse.settlement.kek import parse_kek as parse_kek
from webpurse.settlement.models import MasterKeyRecord


def create_kek_file(path: Path) -> bytes:
    """Write a new random KEK to ``path`` with 0600 permissions; refuse to overwrite."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    kek = secrets.token_bytes(KEK_SIZE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(kek.hex() + "\n")
    return kek


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def resolve_kek(settings: Settings, *, create: bool = False) -> bytes:
    """The KEK from the settings (env value, env file, or the default file).

    The default file is in the user's config dir, never in the data folder: a KEK beside
    ``settlement.db`` would make one backup of ``data/`` open every master key. A KEK file
    inside the data folder is refused unless the operator asked for it
    (``WEBPURSE_KEK_IN_DATA_DIR=1``, e.g. the throwaway demo).
    """
    if settings.kek is not None:
        return settings.kek
    path = settings.kek_file or settings.default_kek_file
    if not settings.kek_in_data_dir and _inside(path, settings.data_dir):
        raise SecurityError(
            f"the KEK file {path} is inside the data folder {settings.data_dir}: a backup of"
            " the data would open the master keys. Keep it elsewhere (the default is"
            f" {settings.config_dir or 'the user config dir'}/kek.key), or set"
            " WEBPURSE_KEK_IN_DATA_DIR=1 to accept that"
        )
    legacy = settings.data_dir / "kek.key"
    if settings.kek_file is None and not path.exists() and legacy.exists():
        raise SecurityError(
            f"found a KEK in the data folder ({legacy}) but none at {path}: move it there"
            " (chmod 600), or set WEBPURSE_KEK_IN_DATA_DIR=1 to keep it where it is"
        )
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise SecurityError(f"{path} must not be readable by others (chmod 600)")
        return parse_kek(path.read_text(encoding="ascii"))
    if create and settings.kek_file is None:
        return create_kek_file(path)
    raise SecurityError(f"no key-encryption key: set WEBPURSE_KEK or create {path}")


def _aad(kind: str, version: int) -> bytes:
    return f"webpurse-master-key:{kind}:{version}".encode("ascii")


def generate_master_keys(
    session_factory: SessionFactory,
    kek: bytes,
    now: dt.datetime,
    *,
    version: int = 1,
    random: Callable[[int], bytes] = secrets.token_bytes,
) -> bool:
    """Create master keys of ``version`` for every kind if absent; True if created."""
    aead = AESGCM(kek)
    with session_factory() as session, session.begin():
        existing = {
            row.kind
            for row in session.scalars(
                select(MasterKeyRecord).where(MasterKeyRecord.version == version)
            )
        }
        if existing == set(KINDS):
            return False
        if existing:
            raise SecurityError(f"master keys of version {version} are incomplete: {existing}")
        for kind in KINDS:
            nonce = random(12)
            sealed = aead.encrypt(nonce, random(16), _aad(kind, version))
            session.add(
                MasterKeyRecord(
                    kind=kind, version=version, nonce=nonce, ciphertext=sealed, created_at=now
                )
            )
    return True


@dataclass(frozen=True, slots=True)
class _KeySet:
    dpk: bytes
    dlk: bytes
    dtk: bytes

    def __repr__(self) -> str:
        return "_KeySet(<redacted>)"


class SoftwareSecurityModule(SecurityModule):
    """Master keys decrypted into memory from the database; the default keystore."""

    # Diversified card keys kept for reuse (a card's capture needs the keys its
    # authorisation derived). Only this object holds them, beside the master keys they
    # come from, so caching adds no exposure; the bound keeps memory flat.
    CARD_KEY_CACHE = 4096

    def __init__(self, keysets: dict[int, _KeySet], current_version: int) -> None:
        self.__keysets = keysets
        self._current = current_version
        self.__card_keys: OrderedDict[tuple[str, bytes, int], bytes] = OrderedDict()
        self.__card_keys_lock = threading.Lock()
        # ECB encryptors of card keys (by kind) for the session keys.
        self.__encryptors: OrderedDict[tuple[str, bytes, int], Encrypt] = OrderedDict()
        # The CBC-MACs of the cards' TAC keys, by (serial, version).
        self.__tacs: OrderedDict[tuple[bytes, int], KeptMac] = OrderedDict()
        # Session-key CBC-MACs by (kind, serial, version, session block): a purchase's
        # MAC1 and MAC2 are under the same session key. Oldest first out, like the above.
        self.__sessions: OrderedDict[tuple[str, bytes, int, bytes], KeptMac] = OrderedDict()

    def __repr__(self) -> str:
        return f"SoftwareSecurityModule(versions={sorted(self.__keysets)}, keys=<redacted>)"

    @classmethod
    def load(cls, session_factory: SessionFactory, kek: bytes) -> SoftwareSecurityModule:
        aead = AESGCM(kek)
        found: dict[int, dict[str, bytes]] = {}
        with session_factory() as session:
            for row in session.scalars(select(MasterKeyRecord)):
                try:
                    key = aead.decrypt(row.nonce, row.ciphertext, _aad(row.kind, row.version))
                except InvalidTag:
                    raise SecurityError(
                        "cannot decrypt the master keys: wrong key-encryption key"
                    ) from None
                found.setdefault(row.version, {})[row.kind] = key
        keysets = {
            version: _KeySet(keys["dpk"], keys["dlk"], keys["dtk"])
            for version, keys in found.items()
            if set(keys) == set(KINDS)
        }
        if not keysets:
            raise SecurityError("no master keys: run `webpurse settlement init`")
        return cls(keysets, max(keysets))

    @classmethod
    def from_settings(
        cls, settings: Settings, session_factory: SessionFactory
    ) -> SoftwareSecurityModule:
        return cls.load(session_factory, resolve_kek(settings))

    @property
    def key_version(self) -> int:
        return self._current

    def export_master_keys(self) -> dict[tuple[str, int], bytes]:
        """Every master key value by (kind, version): only for the one-time migration into
        a PKCS#11 token (``webpurse settlement migrate-keys-to-token``)."""
        return {
            (kind, version): getattr(keyset, kind)
            for version, keyset in self.__keysets.items()
            for kind in KINDS
        }

    def card_dtk(self, serial: bytes, key_version: int) -> bytes:
        """A card's DTK: only for the migration, which stores each issued card's TAC key."""
        return self._card_key("dtk", serial, key_version)

    def _card_key(self, kind: str, serial: bytes, key_version: int) -> bytes:
        cache_key = (kind, bytes(serial), key_version)
        with self.__card_keys_lock:
            cached = self.__card_keys.get(cache_key)
            if cached is not None:
                self.__card_keys.move_to_end(cache_key)
                return cached
        keyset = self.__keysets.get(key_version)
        if keyset is None:
            raise SecurityError(f"no master keys of version {key_version}")
        master: bytes = getattr(keyset, kind)
        key = diversify(master, serial)
        with self.__card_keys_lock:
            self.__card_keys[cache_key] = key
            if len(self.__card_keys) > self.CARD_KEY_CACHE:
                self.__card_keys.popitem(last=False)
        return key

    def _card_keys_to_issue(self, serial: bytes) -> tuple[int, dict[str, bytes]]:
        version = self._current
        return version, {kind: self._card_key(kind, serial, version) for kind in KINDS}

    def _encryptor(self, kind: str, serial: bytes, version: int) -> Encrypt:
        """The ECB encryptor of the card key ``kind``, kept; use it only while holding the
        lock (an encryptor is not to be shared across threads)."""
        cache_key = (kind, bytes(serial), version)
        with self.__card_keys_lock:
            encryptor = self.__encryptors.get(cache_key)
            if encryptor is not None:
                self.__encryptors.move_to_end(cache_key)
                return encryptor
        encryptor = kept_ecb(self._card_key(kind, serial, version))
        with self.__card_keys_lock:
            self.__encryptors[cache_key] = encryptor
            if len(self.__encryptors) > self.CARD_KEY_CACHE:
                self.__encryptors.popitem(last=False)
        return encryptor

    def _session_mac(
        self, kind: str, serial: bytes, version: int, block: bytes, data: bytes
    ) -> bytes:
        if len(block) != 8:
            raise FieldError(f"a session block is 8 bytes, got {len(block)}")
        cache_key = (kind, bytes(serial), version, bytes(block))
        with self.__card_keys_lock:
            session = self.__sessions.get(cache_key)
            if session is not None:
                return session.mac(data)
        card = self._encryptor(kind, serial, version)
        with self.__card_keys_lock:
            session = KeptMac(card(block))
            self.__sessions[cache_key] = session
            if len(self.__sessions) > self.CARD_KEY_CACHE:
                self.__sessions.popitem(last=False)
            return session.mac(data)

    def _tac(self, serial: bytes, version: int, data: bytes) -> bytes:
        cache_key = (bytes(serial), version)
        with self.__card_keys_lock:
            chain = self.__tacs.get(cache_key)
            if chain is not None:
                self.__tacs.move_to_end(cache_key)
                return chain.mac(data)
        key = tac_key(self._card_key("dtk", serial, version))
        with self.__card_keys_lock:
            chain = self.__tacs.setdefault(cache_key, KeptMac(key))
            if len(self.__tacs) > self.CARD_KEY_CACHE:
                self.__tacs.popitem(last=False)
            return chain.mac(data)
