"""A :class:`~webpurse.settlement.security.SecurityModule` whose keys live in a PKCS#11 token.

Tested against SoftHSM2 2.6 (Debian ``softhsm2``) through PyKCS11; see
``docs/security-module.md`` for the design, and why each PBOC step is built the way it is:

* master keys (dpk, dlk, dtk per version) are token objects, two-key 3DES, sensitive, not
  extractable and derive-only (no encrypt, decrypt, wrap or sign);
* a card key is derived inside the token with ``CKM_DES3_ECB_ENCRYPT_DATA`` over
  ``D || NOT D`` (spec §2), as a sensitive, derive-only session object;
* a session key is derived from the card key with the same mechanism over ``B || B`` (B the
  spec §4 block), giving the double-length key ``S || S``: 3DES-CBC under ``S || S`` is
  single-DES CBC under ``S``, so ``CKM_DES3_CBC`` with a zero IV over the padded data ends
  in the ISO 9797-1 algorithm 1 MAC SoftHSM2 has no mechanism for;
* the TAC key (left half XOR right half of the card's DTK) cannot be made inside SoftHSM2
  (no mechanism XORs two secret values), so it is computed once, at issuance, where the
  card keys leave the token anyway, and stored as a per-card token object ``T || T``
  (sensitive, not extractable, encrypt-only).

Card keys leave the token only in :meth:`Pkcs11SecurityModule.personalise`, as a
personalisation bureau writes them into a card; they are never logged or kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webpurse.protocol.crypto import (
    MAC_LENGTH,
    diversification_data,
    pad,
    tac_key,
)
from webpurse.settlement.card_macs import SecurityModule
from webpurse.settlement.kek import KINDS, SecurityError

if TYPE_CHECKING:
    from webpurse.settlement.db import SessionFactory
    from webpurse.settlement.security import SoftwareSecurityModule
    from webpurse.settlement.settings import Settings

DEFAULT_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
LABEL_PREFIX = "webpurse"


def master_label(kind: str, version: int) -> str:
    return f"{LABEL_PREFIX}:{kind}:v{version}"


def tac_label(serial: bytes, version: int) -> str:
    return f"{LABEL_PREFIX}:tac:v{version}:{serial.hex()}"


def _pkcs11() -> Any:
    try:
        import PyKCS11
    except ImportError:  # pragma: no cover - the pkcs11 extra is in dev and in CI
        raise SecurityError(
            "WEBPURSE_SECURITY_MODULE=pkcs11 needs PyKCS11: install webpurse[pkcs11]"
        ) from None
    return PyKCS11


@dataclass(frozen=True)
class TokenConfig:
    """Where the token is: the PKCS#11 library, the token (label or slot), the PIN."""

    module: Path
    pin: str
    label: str | None = None
    slot: int | None = None

    def __repr__(self) -> str:
        return f"TokenConfig(module={self.module}, label={self.label}, slot={self.slot})"


def read_pin_file(path: Path) -> str:
    """The user PIN from a 0600 file (its first line)."""
    if not path.exists():
        raise SecurityError(f"no PKCS#11 PIN file at {path}")
    if path.stat().st_mode & 0o077:
        raise SecurityError(f"{path} must not be readable by others (chmod 600)")
    pin = path.read_text(encoding="utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    if not pin:
        raise SecurityError(f"the PIN file {path} is empty")
    return pin


def token_config(settings: Settings) -> TokenConfig:
    if settings.pkcs11_pin_file is None:
        raise SecurityError("WEBPURSE_SECURITY_MODULE=pkcs11 needs WEBPURSE_PKCS11_PIN_FILE")
    if settings.pkcs11_token_label is None and settings.pkcs11_slot is None:
        raise SecurityError(
            "WEBPURSE_SECURITY_MODULE=pkcs11 needs WEBPURSE_PKCS11_TOKEN_LABEL or"
            " WEBPURSE_PKCS11_SLOT"
        )
    return TokenConfig(
        module=settings.pkcs11_module or DEFAULT_MODULE,
        pin=read_pin_file(settings.pkcs11_pin_file),
        label=settings.pkcs11_token_label,
        slot=settings.pkcs11_slot,
    )


def initialise_token(module: Path, label: str, *, so_pin: str, pin: str) -> None:
    """Initialise a free slot's token as ``label`` with a user PIN (SoftHSM2 tests, bench,
    a demo token). A production token is initialised by its security officer."""
    p11 = _pkcs11()
    lib = p11.PyKCS11Lib()
    lib.load(str(module))
    free = next(
        (s for s in lib.getSlotList() if not lib.getTokenInfo(s).flags & p11.CKF_TOKEN_INITIALIZED),
        None,
    )
    if free is None:
        raise SecurityError(f"no free slot in {module} to initialise a token in")
    lib.initToken(free, so_pin, label)
    slot = next(
        s
        for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.rstrip("\x00 ") == label
    )
    session = lib.openSession(slot, p11.CKF_SERIAL_SESSION | p11.CKF_RW_SESSION)
    try:
        session.login(so_pin, p11.CKU_SO)
        session.initPin(pin)
        session.logout()
    finally:
        session.closeSession()


def softhsm2_config(folder: Path) -> Path:
    """Write a SoftHSM2 config whose tokens live in ``folder/tokens``; export its path as
    ``SOFTHSM2_CONF`` before the library is first loaded in the process."""
    (folder / "tokens").mkdir(parents=True, exist_ok=True)
    conf = folder / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n",
        encoding="ascii",
    )
    return conf


class Pkcs11SecurityModule(SecurityModule):
    """The security module on a PKCS#11 token: no key value ever enters this process
    except the card keys :meth:`personalise` hands to the card being issued."""

    CARD_KEY_CACHE = 1024

    def __init__(self, config: TokenConfig) -> None:
        p11 = _pkcs11()
        self._p11 = p11
        self._lib = p11.PyKCS11Lib()
        try:
            self._lib.load(str(config.module))
        except p11.PyKCS11Error as exc:
            raise SecurityError(f"cannot load the PKCS#11 module {config.module}: {exc}") from None
        self._slot = self._find_slot(config)
        self._session = self._lib.openSession(
            self._slot, p11.CKF_SERIAL_SESSION | p11.CKF_RW_SESSION
        )
        try:
            self._session.login(config.pin)
        except p11.PyKCS11Error as exc:
            if exc.value != p11.CKR_USER_ALREADY_LOGGED_IN:
                raise SecurityError(f"the token refused the PIN: {exc}") from None
        # One PKCS#11 session, used by one thread at a time.
        self._lock = threading.RLock()
        self._card_keys: OrderedDict[tuple[str, bytes, int], Any] = OrderedDict()
        self._tac_keys: OrderedDict[tuple[bytes, int], Any] = OrderedDict()
        self._imported: dict[tuple[str, bytes, int], Any] = {}
        self._masters: dict[tuple[str, int], Any] = {}
        self._current = 0
        self.refresh()

    def __repr__(self) -> str:
        return f"Pkcs11SecurityModule(slot={self._slot}, versions={self.versions})"

    @classmethod
    def from_settings(cls, settings: Settings) -> Pkcs11SecurityModule:
        module = cls(token_config(settings))
        if not module.versions:
            module.close()
            raise SecurityError("no master keys in the token: run `webpurse settlement init`")
        return module

    def _find_slot(self, config: TokenConfig) -> int:
        slots = self._lib.getSlotList(tokenPresent=True)
        if config.slot is not None:
            if config.slot not in slots:
                raise SecurityError(f"no token in PKCS#11 slot {config.slot}")
            return int(config.slot)
        for slot in slots:
            if self._lib.getTokenInfo(slot).label.rstrip("\x00 ") == config.label:
                return int(slot)
        raise SecurityError(f"no PKCS#11 token labelled {config.label!r}")

    def close(self) -> None:
        with self._lock:
            self._flush_cache()
            # No logout: the login belongs to the token, shared by every session this
            # process has open on it; closing the last session ends it.
            self._session.closeSession()

    # --- master keys -------------------------------------------------------------------

    def _find(self, label: str) -> Any | None:
        p11 = self._p11
        found = self._session.findObjects(
            [(p11.CKA_CLASS, p11.CKO_SECRET_KEY), (p11.CKA_LABEL, label)]
        )
        return found[0] if found else None

    def refresh(self) -> None:
        """Read which master keys the token holds; the newest complete version is current.

        A master key that is not sensitive, not unextractable or not derive-only (made by
        hand, or by another tool) is refused rather than used."""
        p11 = self._p11
        with self._lock:
            masters: dict[tuple[str, int], Any] = {}
            for handle in self._session.findObjects(
                [(p11.CKA_CLASS, p11.CKO_SECRET_KEY), (p11.CKA_TOKEN, True)]
            ):
                (label,) = self._session.getAttributeValue(handle, [p11.CKA_LABEL])
                parts = str(label).split(":")
                if len(parts) == 3 and parts[0] == LABEL_PREFIX and parts[1] in KINDS:
                    self._check_master(handle, str(label))
                    masters[(parts[1], int(parts[2].removeprefix("v")))] = handle
            self._masters = masters
            complete = [
                version
                for version in {v for _, v in masters}
                if all((kind, version) in masters for kind in KINDS)
            ]
            self._current = max(complete, default=0)

    def _check_master(self, handle: Any, label: str) -> None:
        p11 = self._p11
        wanted = {
            "CKA_SENSITIVE": True,
            "CKA_EXTRACTABLE": False,
            "CKA_DERIVE": True,
            "CKA_ENCRYPT": False,
            "CKA_DECRYPT": False,
            "CKA_WRAP": False,
        }
        values = self._session.getAttributeValue(handle, [getattr(p11, n) for n in wanted])
        wrong = [
            name for (name, want), got in zip(wanted.items(), values, strict=True) if got != want
        ]
        if wrong:
            raise SecurityError(
                f"the token's master key {label} has unsafe attributes ({', '.join(wrong)}):"
                " refusing to use it; a master key must be sensitive, unextractable and"
                " derive-only (docs/security-module.md)"
            )

    @property
    def versions(self) -> list[int]:
        return sorted({v for _, v in self._masters if all((k, v) in self._masters for k in KINDS)})

    @property
    def key_version(self) -> int:
        if not self._current:
            raise SecurityError("no master keys in the token: run `webpurse settlement init`")
        return self._current

    def _key_template(
        self,
        *,
        encrypt: bool,
        token: bool,
        label: str | None = None,
        value: bytes | None = None,
        export: bool = False,
    ) -> list[tuple[int, Any]]:
        """The attributes of every key this module makes: two-key 3DES with one use only,
        derive (master and card keys) or encrypt (session and TAC keys), never decrypt,
        wrap, unwrap, sign or verify; sensitive and unextractable unless ``export`` (a card
        key read out for issuance). A token object is also private and frozen (neither
        modifiable nor copyable)."""
        p11 = self._p11
        template: list[tuple[int, Any]] = [
            (p11.CKA_CLASS, p11.CKO_SECRET_KEY),
            (p11.CKA_KEY_TYPE, p11.CKK_DES2),
            (p11.CKA_TOKEN, token),
            (p11.CKA_SENSITIVE, not export),
            (p11.CKA_EXTRACTABLE, export),
            (p11.CKA_DERIVE, not encrypt),
            (p11.CKA_ENCRYPT, encrypt),
            (p11.CKA_DECRYPT, False),
            (p11.CKA_WRAP, False),
            (p11.CKA_UNWRAP, False),
            (p11.CKA_SIGN, False),
            (p11.CKA_VERIFY, False),
        ]
        if token:
            template += [
                (p11.CKA_PRIVATE, True),
                (p11.CKA_MODIFIABLE, False),
                (p11.CKA_COPYABLE, False),
            ]
        if label is not None:
            template.append((p11.CKA_LABEL, label))
        if value is not None:
            template.append((p11.CKA_VALUE, value))
        return template

    def _master_template(self, kind: str, version: int) -> list[tuple[int, Any]]:
        return self._key_template(encrypt=False, token=True, label=master_label(kind, version))

    def generate_master_keys(self, version: int = 1) -> bool:
        """Generate dpk, dlk and dtk of ``version`` inside the token if absent."""
        p11 = self._p11
        with self._lock:
            present = {kind for kind in KINDS if (kind, version) in self._masters}
            if present == set(KINDS):
                return False
            if present:
                raise SecurityError(f"master keys of version {version} are incomplete: {present}")
            for kind in KINDS:
                self._session.generateKey(
                    self._master_template(kind, version), p11.Mechanism(p11.CKM_DES2_KEY_GEN)
                )
            self.refresh()
        return True

    def import_master_keys(self, keys: dict[tuple[str, int], bytes]) -> None:
        """Import master key values (migration from the software module; tests). Refuses
        a version the token already holds, so a migration runs once."""
        p11 = self._p11
        with self._lock:
            clash = sorted({v for _, v in keys if any((k, v) in self._masters for k in KINDS)})
            if clash:
                raise SecurityError(f"the token already holds master keys of versions {clash}")
            for (kind, version), value in sorted(keys.items()):
                if kind not in KINDS or len(value) != 16:
                    raise SecurityError(f"bad master key {kind} v{version}")
                self._session.createObject(
                    [*self._master_template(kind, version), (p11.CKA_VALUE, value)]
                )
            self.refresh()

    # --- derivation --------------------------------------------------------------------

    def _derive(self, base: Any, data: bytes, *, encrypt: bool, export: bool = False) -> Any:
        p11 = self._p11
        mechanism = p11.KEY_DERIVATION_STRING_DATA_MechanismBase(
            data, p11.CKM_DES3_ECB_ENCRYPT_DATA
        )
        template = self._key_template(encrypt=encrypt, token=False, export=export)
        return self._session.deriveKey(base, template, mechanism)

    def _master(self, kind: str, version: int) -> Any:
        handle = self._masters.get((kind, version))
        if handle is None:
            raise SecurityError(f"no master keys of version {version} in the token")
        return handle

    def _card_key(self, kind: str, serial: bytes, version: int) -> Any:
        """The card key as a session object (derive-only), cached by serial."""
        cache_key = (kind, bytes(serial), version)
        imported = self._imported.get(cache_key)
        if imported is not None:
            return imported
        cached = self._card_keys.get(cache_key)
        if cached is not None:
            self._card_keys.move_to_end(cache_key)
            return cached
        d = diversification_data(serial)
        handle = self._derive(
            self._master(kind, version), d + bytes(b ^ 0xFF for b in d), encrypt=False
        )
        self._card_keys[cache_key] = handle
        if len(self._card_keys) > self.CARD_KEY_CACHE:
            _, old = self._card_keys.popitem(last=False)
            self._session.destroyObject(old)
        return handle

    def import_card_key(self, kind: str, serial: bytes, version: int, value: bytes) -> None:
        """Use ``value`` as the card key of ``kind`` for this card (sensitive, derive-only
        session object), instead of deriving it: a card personalised elsewhere, whose card
        keys are all there is (the spec's worked examples)."""
        if kind not in KINDS or len(value) != 16:
            raise SecurityError(f"bad card key {kind}")
        with self._lock:
            handle = self._session.createObject(
                self._key_template(encrypt=False, token=False, value=value)
            )
            self._imported[(kind, bytes(serial), version)] = handle
        if kind == "dtk":
            self.store_tac_key(serial, version, value)

    def _flush_cache(self) -> None:
        for handle in self._imported.values():
            self._session.destroyObject(handle)
        self._imported.clear()
        for handle in self._card_keys.values():
            self._session.destroyObject(handle)
        self._card_keys.clear()
        self._tac_keys.clear()

    def _cbc_mac(self, key: Any, data: bytes) -> bytes:
        """ISO 9797-1 algorithm 1 (zero IV, 80 00.. padding) as 3DES-CBC under K || K."""
        p11 = self._p11
        out = bytes(
            self._session.encrypt(key, pad(data), p11.Mechanism(p11.CKM_DES3_CBC, bytes(8)))
        )
        return out[-8:][:MAC_LENGTH]

    @contextmanager
    def _token_call(self) -> Iterator[None]:
        """The module's lock; a token failure (removed, logged out, out of memory) becomes
        a :class:`SecurityError` naming the PKCS#11 return code, never a key."""
        with self._lock:
            try:
                yield
            except self._p11.PyKCS11Error as exc:
                raise SecurityError(f"the PKCS#11 token failed: {exc}") from None

    def _session_mac(
        self, kind: str, serial: bytes, version: int, block: bytes, data: bytes
    ) -> bytes:
        with self._token_call():
            session_key = self._derive(
                self._card_key(kind, serial, version), block * 2, encrypt=True
            )
            try:
                return self._cbc_mac(session_key, data)
            finally:
                self._session.destroyObject(session_key)

    def _tac_key(self, serial: bytes, version: int) -> Any:
        cache_key = (bytes(serial), version)
        handle = self._tac_keys.get(cache_key)
        if handle is None:
            handle = self._find(tac_label(serial, version))
            if handle is None:
                raise SecurityError(
                    f"no TAC key for card {serial.hex().upper()} (v{version}) in the token:"
                    " cards issued before the migration need `webpurse settlement"
                    " migrate-keys-to-token`"
                )
            self._tac_keys[cache_key] = handle
            if len(self._tac_keys) > self.CARD_KEY_CACHE:
                self._tac_keys.popitem(last=False)
        return handle

    def _tac(self, serial: bytes, version: int, data: bytes) -> bytes:
        with self._token_call():
            return self._cbc_mac(self._tac_key(serial, version), data)

    def store_tac_key(self, serial: bytes, version: int, dtk: bytes) -> None:
        """Keep the card's TAC key (DTK left XOR right) as a token object ``T || T``:
        sensitive, not extractable, encrypt-only. Replaces one already there."""
        key = tac_key(dtk)
        with self._lock:
            old = self._find(tac_label(serial, version))
            if old is not None:
                self._session.destroyObject(old)
            self._tac_keys.pop((bytes(serial), version), None)
            self._session.createObject(
                self._key_template(
                    encrypt=True, token=True, label=tac_label(serial, version), value=key + key
                )
            )

    def tac_key_count(self) -> int:
        p11 = self._p11
        with self._lock:
            handles = self._session.findObjects([(p11.CKA_CLASS, p11.CKO_SECRET_KEY)])
            labels = [str(self._session.getAttributeValue(h, [p11.CKA_LABEL])[0]) for h in handles]
        return sum(1 for label in labels if label.startswith(f"{LABEL_PREFIX}:tac:"))

    def _export_card_key(self, kind: str, serial: bytes, version: int) -> bytes:
        """Derive the card key as an extractable session object, read it, destroy it:
        the one place a key value leaves the token (issuance)."""
        p11 = self._p11
        d = diversification_data(serial)
        handle = self._derive(
            self._master(kind, version), d + bytes(b ^ 0xFF for b in d), encrypt=False, export=True
        )
        try:
            (value,) = self._session.getAttributeValue(handle, [p11.CKA_VALUE], allAsBinary=True)
            return bytes(value)
        finally:
            self._session.destroyObject(handle)

    # --- the SecurityModule interface --------------------------------------------------

    def _card_keys_to_issue(self, serial: bytes) -> tuple[int, dict[str, bytes]]:
        with self._token_call():
            version = self.key_version
            keys = {kind: self._export_card_key(kind, serial, version) for kind in KINDS}
            self.store_tac_key(serial, version, keys["dtk"])
        return version, keys

    # --- inspection (tests, docs) ------------------------------------------------------

    def master_key_attributes(self, kind: str, version: int) -> dict[str, object]:
        """The security-relevant attributes of a master key, as the token reports them."""
        p11 = self._p11
        names = (
            "CKA_LABEL",
            "CKA_KEY_TYPE",
            "CKA_TOKEN",
            "CKA_PRIVATE",
            "CKA_SENSITIVE",
            "CKA_ALWAYS_SENSITIVE",
            "CKA_EXTRACTABLE",
            "CKA_NEVER_EXTRACTABLE",
            "CKA_LOCAL",
            "CKA_DERIVE",
            "CKA_ENCRYPT",
            "CKA_DECRYPT",
            "CKA_WRAP",
            "CKA_UNWRAP",
            "CKA_SIGN",
            "CKA_VERIFY",
            "CKA_MODIFIABLE",
            "CKA_COPYABLE",
            "CKA_VALUE",
        )
        with self._lock:
            values = self._session.getAttributeValue(
                self._master(kind, version), [getattr(p11, name) for name in names]
            )
        out: dict[str, object] = {}
        for name, value in zip(names, values, strict=True):
            if name == "CKA_KEY_TYPE":
                out[name] = p11.CKK[value]
            elif name == "CKA_VALUE":
                out[name] = "<refused: CKR_ATTRIBUTE_SENSITIVE>" if value is None else "<READABLE>"
            else:
                out[name] = value
        return out

    @contextmanager
    def raw_session(self) -> Iterator[Any]:
        """The PKCS#11 session under the module's lock (tests that probe the token)."""
        with self._lock:
            yield self._session

    def master_key_handle(self, kind: str, version: int) -> Any:
        return self._master(kind, version)


def migrate_cards(module: Pkcs11SecurityModule, cards: Iterable[tuple[bytes, int, bytes]]) -> int:
    """Store the TAC key of each (serial, key version, DTK) in the token; the count."""
    count = 0
    for serial, version, dtk in cards:
        module.store_tac_key(serial, version, dtk)
        count += 1
    return count


def migrate_from_software(
    software: SoftwareSecurityModule, token: Pkcs11SecurityModule, factory: SessionFactory
) -> tuple[list[int], int]:
    """The one-time migration: the software module's master keys into the token (refused
    if the token already holds any of those versions), then the TAC key of every
    registered card. Returns (versions imported, cards)."""
    from sqlalchemy import select

    from webpurse.settlement.models import Card

    keys = software.export_master_keys()
    token.import_master_keys(keys)
    with factory() as session:
        rows = [
            (bytes.fromhex(c.card_number), c.key_version) for c in session.scalars(select(Card))
        ]
    count = migrate_cards(token, ((serial, v, software.card_dtk(serial, v)) for serial, v in rows))
    return sorted({v for _, v in keys}), count
