"""One builder/parser per command of spec §3, and the typed records of §1."""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import CommandApdu
from webpurse.protocol.errors import ApduFormatError, FieldError, ProtocolError
from webpurse.protocol.records import CardholderData, IssuerData, LogRecord

TERMINAL = bytes.fromhex("000000000001")


def test_spec_example_b_initialize_for_load_bytes() -> None:
    apdu = cmd.InitializeForLoad(0x00, 0x1234, TERMINAL).to_apdu()
    assert apdu.to_bytes().hex().upper() == "805000020B0000001234000000000001" + "10"
    response = cmd.InitializeForLoadResponse.from_data(
        bytes.fromhex("0000000000000001F9CABA916C394D64")
    )
    assert response.balance == 0
    assert response.online_counter == 0
    assert (response.key_version, response.algorithm_id) == (0, 1)
    assert response.random == bytes.fromhex("F9CABA91")
    assert response.mac1 == bytes.fromhex("6C394D64")


@pytest.mark.parametrize(
    ("command", "hex_apdu"),
    [
        (cmd.GetBalance(), "805C000204"),
        (cmd.InitializeForPurchase(1, 100, TERMINAL), "805001020B01000000640000000000010F"),
        (
            cmd.CreditForLoad(
                dt.date(2011, 12, 21), dt.time(21, 48, 22), bytes.fromhex("FDD12AF1")
            ),
            "805200000B20111221214822FDD12AF104",
        ),
        (
            cmd.DebitForPurchase(
                1, dt.date(2012, 2, 29), dt.time(13, 51), bytes.fromhex("F15CAB75")
            ),
            "805401000F0000000120120229135100F15CAB7508",
        ),
        (cmd.GetTransactionProve(0x06, 1), "805A000602000108"),
        (cmd.ReadBinary(0x15), "00B0950000"),
        (cmd.ReadRecord(0x18, 1), "00B201C400"),
        (cmd.Select(name=cmd.PSE_NAME), "00A404000E315041592E5359532E444446303100"),
        (cmd.Select(fid=cmd.EP_FID), "00A4000002100100"),
        (cmd.Verify.from_digits("123456"), "0020000003123456"),
    ],
)
def test_builders_match_the_spec_bytes(command: object, hex_apdu: str) -> None:
    apdu = command.to_apdu()  # type: ignore[attr-defined]
    assert apdu.to_bytes().hex().upper() == hex_apdu
    # and the card-side parser reads back the same command
    parsed = CommandApdu.from_bytes(bytes.fromhex(hex_apdu))
    if isinstance(command, cmd.InitializeForPurchase):
        assert cmd.parse_initialize(parsed) == command
    else:
        assert type(command).from_apdu(parsed) == command  # type: ignore[attr-defined]


def test_wrong_p1p2_and_lengths_are_distinguished() -> None:
    with pytest.raises(cmd.WrongParameters):
        cmd.GetBalance.from_apdu(CommandApdu(0x80, 0x5C, 0x00, 0x01, b"", 4))
    with pytest.raises(ApduFormatError):
        cmd.parse_initialize(CommandApdu(0x80, 0x50, 0x01, 0x02, bytes(10), 0x0F))
    with pytest.raises(FieldError):
        cmd.DebitForPurchase.from_apdu(
            CommandApdu(0x80, 0x54, 0x01, 0x00, bytes.fromhex("000000012012AA29135100") + bytes(4))
        )


def test_responses_round_trip() -> None:
    init = cmd.InitializeForPurchaseResponse(5000, 7, 0, 1, 0, bytes.fromhex("01020304"))
    assert cmd.InitializeForPurchaseResponse.from_data(init.to_data()) == init
    debit = cmd.DebitForPurchaseResponse(bytes.fromhex("AABBCCDD"), bytes.fromhex("11223344"))
    assert debit.to_data() == bytes.fromhex("AABBCCDD11223344")  # TAC then MAC2
    proof = cmd.TransactionProof.from_data(bytes.fromhex("11223344AABBCCDD"))  # MAC2 then TAC
    assert (proof.mac2, proof.tac) == (bytes.fromhex("11223344"), bytes.fromhex("AABBCCDD"))
    with pytest.raises(ApduFormatError):
        cmd.TransactionProof.from_data(bytes(7))


def test_records_round_trip() -> None:
    issuer = IssuerData(
        b"WEBPURSE", 2, 1, bytes(range(10)), dt.date(2026, 1, 1), dt.date(2031, 1, 1), b"\x00\x00"
    )
    raw = issuer.to_bytes()
    assert len(raw) == 30
    assert raw[10:20] == bytes(range(10))
    assert raw[20:24] == bytes.fromhex("20260101")
    assert IssuerData.from_bytes(raw) == issuer
    holder = CardholderData()
    assert len(holder.to_bytes()) == 55
    assert CardholderData.from_bytes(holder.to_bytes()) == holder
    record = LogRecord(3, 0, 1250, 6, TERMINAL, dt.date(2026, 11, 27), dt.time(9, 30, 5))
    assert len(record.to_bytes()) == 23
    assert record.to_bytes()[16:] == bytes.fromhex("20261127093005")
    assert LogRecord.from_bytes(record.to_bytes()) == record


@given(st.binary(min_size=0, max_size=64))
def test_record_parsers_refuse_cleanly(raw: bytes) -> None:
    for parser in (IssuerData.from_bytes, CardholderData.from_bytes, LogRecord.from_bytes):
        with contextlib.suppress(ProtocolError):
            parser(raw)


@given(st.binary(min_size=4, max_size=40))
def test_command_parsers_refuse_cleanly(raw: bytes) -> None:
    try:
        apdu = CommandApdu.from_bytes(raw)
    except ApduFormatError:
        return
    parsers = (
        cmd.Select.from_apdu,
        cmd.ReadBinary.from_apdu,
        cmd.ReadRecord.from_apdu,
        cmd.Verify.from_apdu,
        cmd.GetBalance.from_apdu,
        cmd.parse_initialize,
        cmd.CreditForLoad.from_apdu,
        cmd.DebitForPurchase.from_apdu,
        cmd.GetTransactionProve.from_apdu,
    )
    for parser in parsers:
        with contextlib.suppress(ProtocolError):
            parser(apdu)
