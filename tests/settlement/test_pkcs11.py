"""The PKCS#11 security module on a real SoftHSM2 token (docs/security-module.md).

The attacks on the token's keys (encrypt with, export, derive out) are proof rows in
tests/proof/test_attacks_security_module.py.

Each test gets a fresh token. The settlement payment, load and refund suites also run on a
token (tests/settlement/conftest.py); these tests show what those cannot: the master keys'
attributes and refusals, the spec's worked examples, and that the token module produces
the same purchase and load, byte for byte, as the software module it was migrated from.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.settlement.pkcs11_support import new_token
from tests.settlement.support import deterministic_random, ok
from webpurse.card import CardApplet, MemoryStore
from webpurse.protocol import host
from webpurse.protocol.commands import (
    EP_AID,
    CreditForLoad,
    CreditForLoadResponse,
    DebitForPurchase,
    DebitForPurchaseResponse,
    InitializeForLoad,
    InitializeForLoadResponse,
    InitializeForPurchase,
    InitializeForPurchaseResponse,
    Select,
)
from webpurse.settlement.pkcs11 import Pkcs11SecurityModule, migrate_cards
from webpurse.settlement.security import KINDS, SecurityError, SoftwareSecurityModule, _KeySet

pytestmark = pytest.mark.pkcs11

SERIAL = bytes.fromhex("0000000000000000A001")
TERMINAL = bytes.fromhex("001122334455")
WHEN = {"date": dt.date(2026, 12, 6), "time": dt.time(5, 30, 0)}


@pytest.fixture
def token(tmp_path: Path) -> Iterator[Pkcs11SecurityModule]:
    module = Pkcs11SecurityModule(new_token(tmp_path))
    try:
        yield module
    finally:
        module.close()


def _software() -> SoftwareSecurityModule:
    keys = _KeySet(*(secrets.token_bytes(16) for _ in KINDS))
    return SoftwareSecurityModule({1: keys}, 1)


# --- the master keys ---------------------------------------------------------------


def test_master_keys_are_generated_sensitive_unextractable_and_derive_only(
    token: Pkcs11SecurityModule,
) -> None:
    assert token.generate_master_keys() is True
    assert token.generate_master_keys() is False  # idempotent, as `settlement init`
    assert token.key_version == 1
    dump = {kind: token.master_key_attributes(kind, 1) for kind in KINDS}
    print(json.dumps(dump, indent=2))  # the attribute dump docs/security-module.md quotes
    for kind, attributes in dump.items():
        assert attributes["CKA_LABEL"] == f"webpurse:{kind}:v1"
        assert attributes["CKA_KEY_TYPE"] == "CKK_DES2"
        assert attributes["CKA_TOKEN"] is True
        assert attributes["CKA_SENSITIVE"] is True
        assert attributes["CKA_ALWAYS_SENSITIVE"] is True
        assert attributes["CKA_EXTRACTABLE"] is False
        assert attributes["CKA_NEVER_EXTRACTABLE"] is True
        assert attributes["CKA_LOCAL"] is True  # generated inside the token
        assert attributes["CKA_DERIVE"] is True
        for use in ("CKA_ENCRYPT", "CKA_DECRYPT", "CKA_WRAP", "CKA_UNWRAP", "CKA_SIGN"):
            assert attributes[use] is False, use
        assert attributes["CKA_MODIFIABLE"] is False
        assert attributes["CKA_COPYABLE"] is False
        assert attributes["CKA_VALUE"] == "<refused: CKR_ATTRIBUTE_SENSITIVE>"


def test_key_rotation_makes_the_new_version_current_and_keeps_the_old(
    token: Pkcs11SecurityModule,
) -> None:
    token.generate_master_keys(1)
    old_card = token.personalise(SERIAL, start=WHEN["date"])
    token.generate_master_keys(2)
    assert token.versions == [1, 2] and token.key_version == 2
    assert token.personalise(bytes.fromhex("0000000000000000A002"), start=WHEN["date"])
    # A card of version 1 still pays: its keys derive from the version-1 masters.
    applet = _applet(old_card)
    assert _load(applet, token, amount=100)["verified"] is True
    assert _purchase(applet, token, amount=60)["verified"] is True


def test_a_migration_runs_once(token: Pkcs11SecurityModule) -> None:
    software = _software()
    token.import_master_keys(software.export_master_keys())
    with pytest.raises(SecurityError, match="already holds master keys of versions \\[1\\]"):
        token.import_master_keys(software.export_master_keys())
    attributes = token.master_key_attributes("dpk", 1)
    assert attributes["CKA_LOCAL"] is False  # imported, and says so
    assert attributes["CKA_SENSITIVE"] is True and attributes["CKA_EXTRACTABLE"] is False


def test_a_token_failure_is_a_security_error_naming_the_return_code(
    token: Pkcs11SecurityModule,
) -> None:
    token.import_master_keys(_software().export_master_keys())
    with token.raw_session() as session:
        session.logout()  # as if the token had been reset under the server
    with pytest.raises(SecurityError, match="PKCS#11 token failed: CKR_"):
        token.load_mac2(
            SERIAL,
            1,
            random=bytes(4),
            online_counter=0,
            amount=1,
            terminal_id=TERMINAL,
            **WHEN,  # type: ignore[arg-type]
        )


def test_a_master_key_that_could_encrypt_or_be_exported_is_refused(tmp_path: Path) -> None:
    """A key labelled as a master key but made by hand with encryption allowed."""
    import PyKCS11

    config = new_token(tmp_path)
    module = Pkcs11SecurityModule(config)
    try:
        with module.raw_session() as session:
            session.generateKey(
                [
                    (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                    (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_DES2),
                    (PyKCS11.CKA_TOKEN, True),
                    (PyKCS11.CKA_LABEL, "webpurse:dpk:v1"),
                    (PyKCS11.CKA_SENSITIVE, True),
                    (PyKCS11.CKA_EXTRACTABLE, True),
                    (PyKCS11.CKA_DERIVE, True),
                    (PyKCS11.CKA_ENCRYPT, True),
                ],
                PyKCS11.Mechanism(PyKCS11.CKM_DES2_KEY_GEN),
            )
        with pytest.raises(
            SecurityError, match="unsafe attributes \\(CKA_EXTRACTABLE, CKA_ENCRYPT"
        ):
            module.refresh()
    finally:
        module.close()


def test_a_card_without_a_tac_key_in_the_token_is_an_operator_error(
    token: Pkcs11SecurityModule,
) -> None:
    token.import_master_keys(_software().export_master_keys())
    with pytest.raises(SecurityError, match="no TAC key for card 0000000000000000A001"):
        token.verify_load_tac(
            SERIAL,
            1,
            new_balance=1,
            online_counter=0,
            amount=1,
            terminal_id=TERMINAL,
            tac=bytes(4),
            **WHEN,  # type: ignore[arg-type]
        )


# --- the spec's worked examples (§8) with their card keys imported --------------------

KEY_A = bytes.fromhex("11223344556677888877665544332211")
RANDOM_A = bytes.fromhex("11223344")


def test_worked_example_a_through_the_token(token: Pkcs11SecurityModule) -> None:
    for kind in KINDS:
        token.import_card_key(kind, SERIAL, 1, KEY_A)
    load = {"random": RANDOM_A, "online_counter": 0, "amount": 0x1000, "terminal_id": TERMINAL}
    assert token.verify_load_mac1(SERIAL, 1, balance=0, mac1=bytes.fromhex("A5638AA0"), **load)  # type: ignore[arg-type]
    assert not token.verify_load_mac1(SERIAL, 1, balance=0, mac1=bytes.fromhex("A5638AA1"), **load)  # type: ignore[arg-type]
    mac2 = token.load_mac2(SERIAL, 1, date=dt.date(2011, 12, 21), time=dt.time(21, 48, 22), **load)  # type: ignore[arg-type]
    assert mac2.hex().upper() == "FDD12AF1"
    purchase = {"random": RANDOM_A, "offline_counter": 0, "terminal_seq": 1, "amount": 0x1000}
    when = {"date": dt.date(2012, 2, 29), "time": dt.time(13, 51, 0)}
    mac1 = token.purchase_mac1(SERIAL, 1, terminal_id=TERMINAL, **purchase, **when)  # type: ignore[arg-type]
    assert mac1.hex().upper() == "F15CAB75"
    tac = host.purchase_tac(KEY_A, amount=0x1000, terminal_id=TERMINAL, terminal_seq=1, **when)
    assert token.verify_purchase_mac2_and_tac(
        SERIAL,
        1,
        terminal_id=TERMINAL,
        mac2=bytes.fromhex("56988A13"),
        tac=tac,
        **purchase,
        **when,  # type: ignore[arg-type]
    )
    assert not token.verify_purchase_mac2_and_tac(
        SERIAL,
        1,
        terminal_id=TERMINAL,
        mac2=bytes.fromhex("56988A14"),
        tac=tac,
        **purchase,
        **when,  # type: ignore[arg-type]
    )


def test_worked_example_b_real_card_load_through_the_token(token: Pkcs11SecurityModule) -> None:
    token.import_card_key("dlk", SERIAL, 1, bytes.fromhex("3F013F013F013F013F013F013F013F01"))
    assert token.verify_load_mac1(
        SERIAL,
        1,
        random=bytes.fromhex("F9CABA91"),
        online_counter=0,
        balance=0,
        amount=0x1234,
        terminal_id=bytes.fromhex("000000000001"),
        mac1=bytes.fromhex("6C394D64"),
    )


# --- the same purchase and load with either module ------------------------------------


def _applet(state: Any, seed: int = 7) -> CardApplet:
    applet = CardApplet(state, MemoryStore(state), deterministic_random(seed))
    ok(applet, Select(name=EP_AID).to_apdu())
    return applet


def _purchase(applet: CardApplet, module: Any, *, amount: int) -> dict[str, Any]:
    serial = applet.state.issuer.serial
    init_apdu = InitializeForPurchase(1, amount, TERMINAL).to_apdu()
    init = InitializeForPurchaseResponse.from_data(ok(applet, init_apdu))
    seq = 42
    mac1 = module.purchase_mac1(
        serial,
        init.key_version,
        random=init.random,
        offline_counter=init.offline_counter,
        terminal_seq=seq,
        amount=amount,
        terminal_id=TERMINAL,
        **WHEN,
    )
    debit_apdu = DebitForPurchase(seq, WHEN["date"], WHEN["time"], mac1).to_apdu()  # type: ignore[arg-type]
    answer = DebitForPurchaseResponse.from_data(ok(applet, debit_apdu))
    verified = module.verify_purchase_mac2_and_tac(
        serial,
        init.key_version,
        random=init.random,
        offline_counter=init.offline_counter,
        terminal_seq=seq,
        amount=amount,
        terminal_id=TERMINAL,
        mac2=answer.mac2,
        tac=answer.tac,
        **WHEN,
    )
    return {
        "apdus": [
            init_apdu.to_bytes().hex(),
            init.to_data().hex(),
            debit_apdu.to_bytes().hex(),
            answer.to_data().hex(),
        ],
        "verified": verified,
    }


def _load(applet: CardApplet, module: Any, *, amount: int) -> dict[str, Any]:
    serial = applet.state.issuer.serial
    init_apdu = InitializeForLoad(1, amount, TERMINAL).to_apdu()
    init = InitializeForLoadResponse.from_data(ok(applet, init_apdu))
    common = {
        "random": init.random,
        "online_counter": init.online_counter,
        "amount": amount,
        "terminal_id": TERMINAL,
    }
    mac1_ok = module.verify_load_mac1(
        serial, init.key_version, balance=init.balance, mac1=init.mac1, **common
    )
    mac2 = module.load_mac2(serial, init.key_version, **common, **WHEN)
    credit_apdu = CreditForLoad(WHEN["date"], WHEN["time"], mac2).to_apdu()  # type: ignore[arg-type]
    answer = CreditForLoadResponse.from_data(ok(applet, credit_apdu))
    tac_ok = module.verify_load_tac(
        serial,
        init.key_version,
        new_balance=init.balance + amount,
        online_counter=init.online_counter,
        amount=amount,
        terminal_id=TERMINAL,
        tac=answer.tac,
        **WHEN,
    )
    return {
        "apdus": [
            init_apdu.to_bytes().hex(),
            init.to_data().hex(),
            credit_apdu.to_bytes().hex(),
            answer.to_data().hex(),
        ],
        "verified": mac1_ok and tac_ok,
    }


def test_the_same_load_and_purchase_byte_for_byte_with_either_module(
    token: Pkcs11SecurityModule,
) -> None:
    """A card issued by the software module; its keys migrated into the token; the same
    card (twice, same random numbers), the same terminal: the same APDUs, MACs and TAC."""
    software = _software()
    state = software.personalise(SERIAL, start=WHEN["date"])
    token.import_master_keys(software.export_master_keys())
    assert migrate_cards(token, [(SERIAL, 1, software.card_dtk(SERIAL, 1))]) == 1
    by_software, by_token = _applet(state), _applet(state)
    runs = {}
    for name, applet, module in (("software", by_software, software), ("pkcs11", by_token, token)):
        runs[name] = [_load(applet, module, amount=5000), _purchase(applet, module, amount=1234)]
    print(json.dumps(runs, indent=2))
    assert runs["software"] == runs["pkcs11"]
    assert all(step["verified"] for step in runs["pkcs11"])


def test_a_card_issued_by_the_token_pays_and_the_software_module_agrees(
    token: Pkcs11SecurityModule,
) -> None:
    """Issuance from the token (card keys leave it once, into the card) gives a card whose
    MACs the software module with the same master keys computes identically."""
    software = _software()
    token.import_master_keys(software.export_master_keys())
    state = token.personalise(SERIAL, start=WHEN["date"])
    assert token.tac_key_count() == 1
    runs = []
    for module in (software, token):
        applet = _applet(state)
        runs.append([_load(applet, module, amount=700), _purchase(applet, module, amount=300)])
    assert runs[0] == runs[1]
    assert all(step["verified"] for step in runs[1])


def test_a_forged_tac_or_mac_is_refused_by_the_token(token: Pkcs11SecurityModule) -> None:
    token.generate_master_keys()
    applet = _applet(token.personalise(SERIAL, start=WHEN["date"]))
    init = InitializeForLoadResponse.from_data(
        ok(applet, InitializeForLoad(1, 100, TERMINAL).to_apdu())
    )
    common = {
        "random": init.random,
        "online_counter": init.online_counter,
        "amount": 100,
        "terminal_id": TERMINAL,
    }
    forged = bytes(b ^ 1 for b in init.mac1)
    assert token.verify_load_mac1(SERIAL, 1, balance=0, mac1=init.mac1, **common)  # type: ignore[arg-type]
    assert not token.verify_load_mac1(SERIAL, 1, balance=0, mac1=forged, **common)  # type: ignore[arg-type]
    mac2 = token.load_mac2(SERIAL, 1, **common, **WHEN)  # type: ignore[arg-type]
    tac = CreditForLoadResponse.from_data(
        ok(applet, CreditForLoad(WHEN["date"], WHEN["time"], mac2).to_apdu())  # type: ignore[arg-type]
    ).tac
    kwargs = {"new_balance": 100, "online_counter": 0, "amount": 100, "terminal_id": TERMINAL}
    assert token.verify_load_tac(SERIAL, 1, tac=tac, **kwargs, **WHEN)  # type: ignore[arg-type]
    assert not token.verify_load_tac(SERIAL, 1, tac=bytes(b ^ 1 for b in tac), **kwargs, **WHEN)  # type: ignore[arg-type]


# --- the operator's commands --------------------------------------------------------


def test_init_on_a_token_and_the_one_time_migration_from_the_software_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import text
    from typer.testing import CliRunner

    from webpurse.cli import app
    from webpurse.settlement.db import make_engine

    for name in ("WEBPURSE_DATABASE_URL", "WEBPURSE_KEK", "WEBPURSE_KEK_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WEBPURSE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    runner = CliRunner()

    # A fresh install on a token: init generates the master keys inside it.
    fresh = new_token(tmp_path)
    monkeypatch.setenv("WEBPURSE_SECURITY_MODULE", "pkcs11")
    monkeypatch.setenv("WEBPURSE_PKCS11_TOKEN_LABEL", str(fresh.label))
    monkeypatch.setenv("WEBPURSE_PKCS11_PIN_FILE", str(tmp_path / f"{fresh.label}.pin"))
    made = runner.invoke(app, ["settlement", "init"])
    assert made.exit_code == 0 and "master keys created" in made.output, made.output
    again = runner.invoke(app, ["settlement", "init"])
    assert again.exit_code == 0 and "master keys present" in again.output
    # The master keys are in the token, not the database (the KEK seals webhook secrets).
    with make_engine(f"sqlite:///{tmp_path / 'data' / 'settlement.db'}").connect() as db:
        assert db.execute(text("select count(*) from master_keys")).scalar() == 0
    issued = runner.invoke(
        app, ["settlement", "card", "issue", str(tmp_path / "t.json"), "--serial", "00" * 9 + "01"]
    )
    assert issued.exit_code == 0, issued.output
    # The server the settings describe (as `serve` builds it) uses the token.
    from webpurse.settlement.app import create_app
    from webpurse.settlement.settings import Settings

    server = create_app(Settings.from_env())
    assert isinstance(server.state.settlement.security, Pkcs11SecurityModule)
    server.state.settlement.security.close()
    server.state.settlement.engine.dispose()

    # An install that ran on the software module moves to a second token, once.
    monkeypatch.setenv("WEBPURSE_DATA_DIR", str(tmp_path / "data2"))
    monkeypatch.setenv("WEBPURSE_SECURITY_MODULE", "software")
    assert runner.invoke(app, ["settlement", "init"]).exit_code == 0
    old = runner.invoke(
        app, ["settlement", "card", "issue", str(tmp_path / "s.json"), "--serial", "00" * 9 + "02"]
    )
    assert old.exit_code == 0, old.output
    target = new_token(tmp_path)
    monkeypatch.setenv("WEBPURSE_PKCS11_TOKEN_LABEL", str(target.label))
    monkeypatch.setenv("WEBPURSE_PKCS11_PIN_FILE", str(tmp_path / f"{target.label}.pin"))
    moved = runner.invoke(app, ["settlement", "migrate-keys-to-token"])
    assert moved.exit_code == 0, moved.output
    assert "versions [1]" in moved.output and "TAC keys of 1 cards" in moved.output
    twice = runner.invoke(app, ["settlement", "migrate-keys-to-token"])
    assert twice.exit_code == 2 and "already holds master keys" in twice.output

    # The card issued before the migration checks out against the token.
    from webpurse.card.image import ImageFile

    state = ImageFile(tmp_path / "s.json").load()
    module = Pkcs11SecurityModule(target)
    try:
        applet = _applet(state)
        assert _load(applet, module, amount=500)["verified"] is True
        assert _purchase(applet, module, amount=200)["verified"] is True
    finally:
        module.close()


def test_a_bad_pin_file_or_module_choice_is_refused(tmp_path: Path) -> None:
    from webpurse.settlement.pkcs11 import read_pin_file
    from webpurse.settlement.settings import Settings

    with pytest.raises(SecurityError, match="software or pkcs11"):
        Settings.from_env({"WEBPURSE_SECURITY_MODULE": "hsm"})
    loose = tmp_path / "pin"
    loose.write_text("1234\n")
    loose.chmod(0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        read_pin_file(loose)
    with pytest.raises(SecurityError, match="no PKCS#11 PIN file"):
        read_pin_file(tmp_path / "absent")
