"""Spec §8 worked examples A and B through the emulator, byte for byte."""

from __future__ import annotations

import datetime as dt

from tests.card.support import make_card, make_state
from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import ResponseApdu

KEY_A = bytes.fromhex("11223344556677888877665544332211")


def test_example_b_initialize_for_load_exchange() -> None:
    dlk = bytes.fromhex("3F013F013F013F013F013F013F013F01")
    state = make_state(
        dpk=dlk, dlk=dlk, dtk=dlk, key_index=0x00, key_version=0x00, algorithm_id=0x01
    )
    card = make_card(state, random=bytes.fromhex("F9CABA91"))
    assert card.process(bytes.fromhex("00A4040009A0000000038698070100")).endswith(b"\x90\x00")
    answer = card.process(bytes.fromhex("805000020B000000123400000000000110"))
    assert answer.hex().upper() == "0000000000000001F9CABA916C394D649000"


def test_example_a_load_then_purchase() -> None:
    state = make_state(dpk=KEY_A, dlk=KEY_A, dtk=KEY_A)
    card = make_card(state, random=bytes.fromhex("11223344"))
    terminal = bytes.fromhex("001122334455")

    def send(hex_apdu: str) -> ResponseApdu:
        return ResponseApdu.from_bytes(card.process(bytes.fromhex(hex_apdu)))

    assert send("00A4000002100100").ok
    init = send("805000020B010000100000112233445510")
    assert init.ok
    assert init.data[-4:].hex().upper() == "A5638AA0"  # EP load MAC1 of example A
    credit = send("805200000B20111221214822FDD12AF104")  # MAC2 of example A
    assert credit.ok and len(credit.data) == 4
    assert card.state.balance == 0x1000

    init = send("805001020B01000010000011223344550F")
    assert init.data.hex().upper() == "000010000000000000010011223344" and init.ok
    debit = cmd.DebitForPurchase(
        1, dt.date(2012, 2, 29), dt.time(13, 51, 0), bytes.fromhex("F15CAB75")
    ).to_apdu()
    answer = ResponseApdu.from_bytes(card.process(debit.to_bytes()))
    assert answer.ok
    assert answer.data[4:].hex().upper() == "56988A13"  # MAC2 of example A, after the TAC
    assert card.state.balance == 0
    assert card.state.log[0].terminal_id == terminal
