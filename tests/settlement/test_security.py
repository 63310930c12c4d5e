"""The security module: keys encrypted at rest, never shown, MACs that match the card."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
from pathlib import Path

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.settlement.support import deterministic_random, ok
from webpurse.card import CardApplet, MemoryStore
from webpurse.protocol.commands import EP_AID, DebitForPurchase, InitializeForPurchase, Select
from webpurse.protocol.commands import DebitForPurchaseResponse as DebitResponse
from webpurse.protocol.commands import InitializeForPurchaseResponse as InitResponse
from webpurse.settlement.db import make_engine, make_session_factory, migrate
from webpurse.settlement.models import MasterKeyRecord
from webpurse.settlement.security import (
    SecurityError,
    SoftwareSecurityModule,
    create_kek_file,
    generate_master_keys,
    parse_kek,
    resolve_kek,
)
from webpurse.settlement.settings import Settings

NOW = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)


def test_kek_from_hex_or_base64_and_nothing_else() -> None:
    raw = secrets.token_bytes(32)
    import base64

    assert parse_kek(raw.hex()) == parse_kek(base64.b64encode(raw).decode()) == raw
    with pytest.raises(SecurityError):
        parse_kek("00" * 16)
    with pytest.raises(SecurityError):
        parse_kek("not a key!")


def test_init_creates_a_private_kek_file_and_refuses_a_readable_one(tmp_path: Path) -> None:
    settings = Settings(
        database_url="sqlite://", data_dir=tmp_path / "data", config_dir=tmp_path / "config"
    )
    kek = resolve_kek(settings, create=True)
    path = settings.default_kek_file
    assert path == tmp_path / "config" / "kek.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert resolve_kek(settings) == kek
    os.chmod(path, 0o644)
    with pytest.raises(SecurityError, match="chmod 600"):
        resolve_kek(settings)
    with pytest.raises(FileExistsError):
        create_kek_file(path)


def test_the_default_kek_lives_outside_the_data_folder(tmp_path: Path) -> None:
    env = {"WEBPURSE_DATA_DIR": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "x")}
    settings = Settings.from_env(env)
    assert settings.default_kek_file == tmp_path / "x" / "webpurse" / "kek.key"
    home = Settings.from_env({"HOME": str(tmp_path / "home")})
    assert home.default_kek_file == tmp_path / "home" / ".config" / "webpurse" / "kek.key"


def test_a_kek_inside_the_data_folder_is_refused_unless_asked_for(tmp_path: Path) -> None:
    data = tmp_path / "data"
    inside = Settings(database_url="sqlite://", data_dir=data, kek_file=data / "keys" / "kek.key")
    with pytest.raises(SecurityError, match="inside the data folder"):
        resolve_kek(inside, create=True)
    # An old install's data/kek.key is named, not silently used.
    create_kek_file(data / "kek.key")
    legacy = Settings(database_url="sqlite://", data_dir=data, config_dir=tmp_path / "config")
    with pytest.raises(SecurityError, match="move it there"):
        resolve_kek(legacy)
    asked = Settings(database_url="sqlite://", data_dir=data, kek_in_data_dir=True)
    assert asked.default_kek_file == data / "kek.key"
    assert len(resolve_kek(asked)) == 32


def test_master_keys_are_sealed_and_need_the_right_kek(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    migrate(engine)
    factory = make_session_factory(engine)
    kek = secrets.token_bytes(32)
    assert generate_master_keys(factory, kek, NOW)
    assert not generate_master_keys(factory, kek, NOW)  # idempotent
    module = SoftwareSecurityModule.load(factory, kek)
    with factory() as session:
        rows = session.query(MasterKeyRecord).all()
    assert sorted(r.kind for r in rows) == ["dlk", "dpk", "dtk"]
    assert all(len(r.ciphertext) == 16 + 16 for r in rows)  # key + GCM tag, no clear text
    assert "redacted" in repr(module)
    # no clear key survives anywhere in the stored rows
    clear = [module._card_key(kind, bytes(10), 1) for kind in ("dpk", "dlk", "dtk")]
    assert not any(key in row.ciphertext for key in clear for row in rows)
    with pytest.raises(SecurityError, match="wrong key-encryption key"):
        SoftwareSecurityModule.load(factory, secrets.token_bytes(32))
    engine.dispose()


def test_a_card_it_personalises_accepts_its_mac1_and_proves_with_mac2_and_tac(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    migrate(engine)
    factory = make_session_factory(engine)
    kek = secrets.token_bytes(32)
    generate_master_keys(factory, kek, NOW)
    module = SoftwareSecurityModule.load(factory, kek)
    serial = bytes.fromhex("0102030405060708090A")
    state = dataclasses.replace(module.personalise(serial, start=NOW.date()), balance=1_000)
    card = CardApplet(state, MemoryStore(state), deterministic_random(5))
    terminal = bytes.fromhex("112233445566")
    date, time = NOW.date(), dt.time(12, 0, 0)
    ok(card, Select(name=EP_AID).to_apdu())
    init = InitResponse.from_data(ok(card, InitializeForPurchase(1, 250, terminal).to_apdu()))
    mac1 = module.purchase_mac1(
        serial,
        module.key_version,
        random=init.random,
        offline_counter=init.offline_counter,
        terminal_seq=7,
        amount=250,
        terminal_id=terminal,
        date=date,
        time=time,
    )
    answer = DebitResponse.from_data(ok(card, DebitForPurchase(7, date, time, mac1).to_apdu()))

    def verify(mac2: bytes, tac: bytes) -> bool:
        return module.verify_purchase_mac2_and_tac(
            serial,
            module.key_version,
            random=init.random,
            offline_counter=init.offline_counter,
            terminal_seq=7,
            amount=250,
            terminal_id=terminal,
            date=date,
            time=time,
            mac2=mac2,
            tac=tac,
        )

    assert verify(answer.mac2, answer.tac)
    assert not verify(answer.tac, answer.mac2)
    assert card.state.balance == 750
    engine.dispose()


def test_cached_card_keys_are_the_diversified_keys_and_the_cache_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from webpurse.protocol.crypto import diversify

    master = secrets.token_bytes(16)
    keyset = dataclasses.make_dataclass("K", ["dpk", "dlk", "dtk"])(master, master, master)
    module = SoftwareSecurityModule({1: keyset}, 1)  # type: ignore[dict-item]
    monkeypatch.setattr(SoftwareSecurityModule, "CARD_KEY_CACHE", 2)
    serials = [secrets.token_bytes(10) for _ in range(4)]
    for _ in range(2):  # the second round is served partly from the cache
        for serial in serials:
            assert module._card_key("dpk", serial, 1) == diversify(master, serial)
    assert len(module._SoftwareSecurityModule__card_keys) == 2  # type: ignore[attr-defined]
    with pytest.raises(SecurityError):
        module._card_key("dpk", serials[0], 9)


@hypothesis.settings(max_examples=200, deadline=None)
@given(
    serial=st.binary(min_size=10, max_size=10),
    block=st.binary(min_size=8, max_size=8),
    data=st.binary(max_size=40),
    kind=st.sampled_from(["dpk", "dlk"]),
)
def test_macs_from_cached_encryptors_are_the_protocols_macs(
    serial: bytes, block: bytes, data: bytes, kind: str
) -> None:
    """The software module's MACs (card-key encryptors kept per card, CBC chained by hand)
    are exactly the protocol's: a session key from the card key, CBC-MAC, the TAC key."""
    from webpurse.protocol.cipher import DES_SUITE
    from webpurse.protocol.crypto import diversify, mac, tac_key

    master = bytes(range(16)) if kind == "dpk" else bytes(range(16, 32))
    keyset = dataclasses.make_dataclass("K", ["dpk", "dlk", "dtk"])(master, master, master[::-1])
    module = SoftwareSecurityModule({1: keyset}, 1)  # type: ignore[dict-item]
    card_key = diversify(master, serial)
    session = DES_SUITE.key_cipher.encrypt_ecb(card_key, block)
    for _ in range(2):  # built, then from the cache
        assert module._session_mac(kind, serial, 1, block, data) == mac(session, data)
        expected_tac = mac(tac_key(diversify(master[::-1], serial)), data)
        assert module._tac(serial, 1, data) == expected_tac
    with pytest.raises(SecurityError):
        module._tac(serial, 9, data)


@hypothesis.settings(max_examples=100, deadline=None)
@given(messages=st.lists(st.binary(max_size=40), min_size=1, max_size=6))
def test_a_kept_cbc_chain_gives_each_mac_a_zero_iv(messages: list[bytes]) -> None:
    """One kept CBC encryptor serves MAC after MAC (of any lengths, one session key and one
    TAC key): each is the spec's zero-IV CBC-MAC, whatever the MACs before it left."""
    from webpurse.protocol.cipher import DES_SUITE
    from webpurse.protocol.crypto import diversify, mac, tac_key

    master = bytes(range(16))
    keyset = dataclasses.make_dataclass("K", ["dpk", "dlk", "dtk"])(master, master, master)
    module = SoftwareSecurityModule({1: keyset}, 1)  # type: ignore[dict-item]
    serial, block = bytes(range(10)), bytes(range(8))
    session = DES_SUITE.key_cipher.encrypt_ecb(diversify(master, serial), block)
    for data in messages:
        assert module._session_mac("dpk", serial, 1, block, data) == mac(session, data)
        assert module._tac(serial, 1, data) == mac(tac_key(diversify(master, serial)), data)


def test_the_mac_encryptor_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    master = secrets.token_bytes(16)
    keyset = dataclasses.make_dataclass("K", ["dpk", "dlk", "dtk"])(master, master, master)
    module = SoftwareSecurityModule({1: keyset}, 1)  # type: ignore[dict-item]
    monkeypatch.setattr(SoftwareSecurityModule, "CARD_KEY_CACHE", 3)
    for _ in range(2):
        for serial in [secrets.token_bytes(10) for _ in range(5)]:
            module._session_mac("dpk", serial, 1, bytes(8), b"data")
            module._tac(serial, 1, b"data")
    assert len(module._SoftwareSecurityModule__encryptors) == 3  # type: ignore[attr-defined]
    assert len(module._SoftwareSecurityModule__sessions) == 3  # type: ignore[attr-defined]
    assert len(module._SoftwareSecurityModule__tacs) == 3  # type: ignore[attr-defined]
    assert "encryptor" not in repr(module).lower() and master.hex() not in repr(module)
