"""Spec §8 worked examples A and B, byte for byte, through the host functions (§2, §4)."""

from __future__ import annotations

import datetime as dt

import pytest

from webpurse.protocol import crypto, host
from webpurse.protocol.errors import FieldError

KEY_A = bytes.fromhex("11223344556677888877665544332211")
TERMINAL_A = bytes.fromhex("001122334455")
RANDOM_A = bytes.fromhex("11223344")


def test_example_a_load_session_key_and_ed_macs() -> None:
    session = crypto.load_session_key(KEY_A, RANDOM_A, 0)
    assert session.hex().upper() == "9B1D924E05595603"
    assert (
        crypto.mac(session, bytes.fromhex("000000000000100001001122334455")).hex().upper()
        == "2988AE5A"
    )
    assert (
        crypto.mac(session, bytes.fromhex("000010000100112233445520111221214822")).hex().upper()
        == "3A845BF0"
    )


def test_example_a_ep_load_through_host_functions() -> None:
    mac1 = host.load_mac1(
        KEY_A, random=RANDOM_A, online_counter=0, balance=0, amount=0x1000, terminal_id=TERMINAL_A
    )
    assert mac1.hex().upper() == "A5638AA0"
    assert host.verify_load_mac1(
        KEY_A,
        bytes.fromhex("A5638AA0"),
        random=RANDOM_A,
        online_counter=0,
        balance=0,
        amount=0x1000,
        terminal_id=TERMINAL_A,
    )
    mac2 = host.load_mac2(
        KEY_A,
        random=RANDOM_A,
        online_counter=0,
        amount=0x1000,
        terminal_id=TERMINAL_A,
        date=dt.date(2011, 12, 21),
        time=dt.time(21, 48, 22),
    )
    assert mac2.hex().upper() == "FDD12AF1"


def test_example_a_ed_load_type_01_through_host_functions() -> None:
    mac1 = host.load_mac1(
        KEY_A,
        random=RANDOM_A,
        online_counter=0,
        balance=0,
        amount=0x1000,
        terminal_id=TERMINAL_A,
        transaction_type=0x01,
    )
    assert mac1.hex().upper() == "2988AE5A"


def test_example_a_purchase() -> None:
    session = crypto.purchase_session_key(KEY_A, RANDOM_A, 0, 1)
    assert session.hex().upper() == "003238ABC57659DD"
    when = {"date": dt.date(2012, 2, 29), "time": dt.time(13, 51, 0)}
    mac1 = host.purchase_mac1(
        KEY_A,
        random=RANDOM_A,
        offline_counter=0,
        terminal_seq=1,
        amount=0x1000,
        terminal_id=TERMINAL_A,
        **when,
    )
    assert mac1.hex().upper() == "F15CAB75"
    args = {"random": RANDOM_A, "offline_counter": 0, "terminal_seq": 1, "amount": 0x1000}
    assert host.purchase_mac2(KEY_A, **args).hex().upper() == "56988A13"  # type: ignore[arg-type]
    assert host.verify_purchase_mac2(KEY_A, bytes.fromhex("56988A13"), **args)  # type: ignore[arg-type]
    assert not host.verify_purchase_mac2(KEY_A, bytes.fromhex("56988A14"), **args)  # type: ignore[arg-type]


def test_example_b_real_card_load() -> None:
    dlk = bytes.fromhex("3F013F013F013F013F013F013F013F01")
    random = bytes.fromhex("F9CABA91")
    assert crypto.load_session_key(dlk, random, 0).hex().upper() == "03015BEA347EA231"
    mac1 = host.load_mac1(
        dlk,
        random=random,
        online_counter=0,
        balance=0,
        amount=0x1234,
        terminal_id=bytes.fromhex("000000000001"),
    )
    assert mac1.hex().upper() == "6C394D64"


def test_padding_is_always_added() -> None:
    assert crypto.pad(b"") == bytes.fromhex("8000000000000000")
    assert crypto.pad(bytes(8)) == bytes(8) + bytes.fromhex("8000000000000000")
    assert crypto.pad(bytes(7)) == bytes(7) + b"\x80"


def test_tac_key_is_xor_of_halves() -> None:
    dtk = bytes(range(16))
    assert crypto.tac_key(dtk) == bytes(a ^ b for a, b in zip(dtk[:8], dtk[8:], strict=True))


def test_diversify_is_left_and_complement_halves() -> None:
    master = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    serial = bytes.fromhex("00001122334455667788")
    card_key = crypto.diversify(master, serial)
    assert len(card_key) == 16
    from webpurse.protocol.cipher import TRIPLE_DES

    assert card_key[:8] == TRIPLE_DES.encrypt_ecb(master, serial[2:])
    assert card_key[8:] == TRIPLE_DES.encrypt_ecb(master, bytes(b ^ 0xFF for b in serial[2:]))
    # Another serial, another key: diversification really depends on the card.
    assert crypto.diversify(master, bytes.fromhex("00001122334455667789")) != card_key


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: crypto.load_session_key(bytes(15), bytes(4), 0), "DLK"),
        (lambda: crypto.load_session_key(bytes(16), bytes(3), 0), "random"),
        (lambda: crypto.mac(bytes(16), b"x"), "MAC key"),
        (lambda: crypto.diversify(bytes(16), bytes(9)), "serial"),
    ],
)
def test_wrong_sizes_are_refused(call: object, message: str) -> None:
    with pytest.raises(FieldError, match=message):
        call()  # type: ignore[operator]
