"""Attacks on the PKCS#11 security module's keys (docs/security-module.md), on a real
SoftHSM2 token. The attacker holds the token's user PIN and a session on it: the worst case
short of physical access, e.g. code running as the settlement service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proof.conftest import Proof
from tests.settlement.pkcs11_support import new_token
from webpurse.protocol.crypto import diversify
from webpurse.settlement.pkcs11 import Pkcs11SecurityModule
from webpurse.settlement.security import SoftwareSecurityModule, _KeySet

pytestmark = pytest.mark.pkcs11

SUITE = "attacks_security_module"
SERIAL = bytes.fromhex("0000000000000000B001")


@pytest.fixture
def token(tmp_path: Path) -> Iterator[Pkcs11SecurityModule]:
    module = Pkcs11SecurityModule(new_token(tmp_path))
    try:
        module.generate_master_keys()
        yield module
    finally:
        module.close()


def _code(exc: BaseException) -> str:
    import PyKCS11

    return str(PyKCS11.CKR[getattr(exc, "value", -1)])


def _d_and_not_d() -> bytes:
    d = SERIAL[-8:]
    return d + bytes(b ^ 0xFF for b in d)


def test_encrypting_the_diversification_data_under_a_master_key_is_refused(
    token: Pkcs11SecurityModule, proof: Proof
) -> None:
    import PyKCS11

    with proof.row(
        SUITE,
        "PIN holder: C_Encrypt(D || NOT D) with the DPK master key (3DES-ECB), i.e. compute a"
        " card's DPK",
        expected="refused CKR_KEY_FUNCTION_NOT_PERMITTED (master keys are derive-only)",
    ) as row:
        with token.raw_session() as session, pytest.raises(PyKCS11.PyKCS11Error) as refused:
            session.encrypt(
                token.master_key_handle("dpk", 1),
                _d_and_not_d(),
                PyKCS11.Mechanism(PyKCS11.CKM_DES3_ECB),
            )
        assert _code(refused.value) == "CKR_KEY_FUNCTION_NOT_PERMITTED"
        row.observed = _code(refused.value)


def test_exporting_a_master_key_is_refused(token: Pkcs11SecurityModule, proof: Proof) -> None:
    import PyKCS11

    with proof.row(
        SUITE,
        "PIN holder: export a master key (wrap it under an AES key of one's own; read"
        " CKA_VALUE; set CKA_EXTRACTABLE back to true)",
        expected="wrap CKR_KEY_UNEXTRACTABLE; value not returned (sensitive); attribute change"
        " CKR_ACTION_PROHIBITED",
    ) as row:
        master = token.master_key_handle("dtk", 1)
        with token.raw_session() as session:
            mine = session.generateKey(
                [
                    (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                    (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                    (PyKCS11.CKA_VALUE_LEN, 32),
                    (PyKCS11.CKA_TOKEN, False),
                    (PyKCS11.CKA_WRAP, True),
                ],
                PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN),
            )
            with pytest.raises(PyKCS11.PyKCS11Error) as wrap:
                session.wrapKey(mine, master, PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_WRAP))
            value = session.getAttributeValue(master, [PyKCS11.CKA_VALUE])
            with pytest.raises(PyKCS11.PyKCS11Error) as flip:
                session.setAttributeValue(master, [(PyKCS11.CKA_EXTRACTABLE, True)])
        assert _code(wrap.value) == "CKR_KEY_UNEXTRACTABLE"
        assert value == [None]  # CKR_ATTRIBUTE_SENSITIVE
        assert _code(flip.value) == "CKR_ACTION_PROHIBITED"
        row.observed = f"wrap {_code(wrap.value)}; value None; flip {_code(flip.value)}"


def test_a_pin_holder_can_still_derive_a_card_key_out_documented_limit(
    tmp_path: Path, proof: Proof
) -> None:
    """Not a defence: the limit docs/security-module.md states ("The PIN")."""
    import PyKCS11

    with proof.row(
        SUITE,
        "PIN holder: C_DeriveKey(master, CKM_DES3_ECB_ENCRYPT_DATA, D || NOT D) into an"
        " extractable key, then read it (SoftHSM2 has no derive policy)",
        expected="KNOWN LIMIT, succeeds: the card key comes out (issuance needs this"
        " derivation); the master key itself never does. The PIN guards card keys",
    ) as row:
        software = SoftwareSecurityModule({1: _KeySet(*(bytes([i]) * 16 for i in (1, 2, 3)))}, 1)
        module = Pkcs11SecurityModule(new_token(tmp_path))
        try:
            module.import_master_keys(software.export_master_keys())
            with module.raw_session() as session:
                handle = session.deriveKey(
                    module.master_key_handle("dpk", 1),
                    [
                        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_DES2),
                        (PyKCS11.CKA_TOKEN, False),
                        (PyKCS11.CKA_SENSITIVE, False),
                        (PyKCS11.CKA_EXTRACTABLE, True),
                    ],
                    PyKCS11.KEY_DERIVATION_STRING_DATA_MechanismBase(
                        _d_and_not_d(), PyKCS11.CKM_DES3_ECB_ENCRYPT_DATA
                    ),
                )
                (value,) = session.getAttributeValue(handle, [PyKCS11.CKA_VALUE], allAsBinary=True)
                session.destroyObject(handle)
        finally:
            module.close()
        expected = diversify(software.export_master_keys()[("dpk", 1)], SERIAL)
        # The same DES key; SoftHSM2 sets each byte's parity bit (DES ignores it).
        assert bytes(b & 0xFE for b in bytes(value)) == bytes(b & 0xFE for b in expected)
        row.observed = "card DPK read out (parity-adjusted); master key still unreadable"
