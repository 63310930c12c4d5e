"""APDU encoding (ISO 7816-4 short cases) and status-word names (spec §5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webpurse.protocol.apdu import CommandApdu, ResponseApdu, StatusWord, describe_sw
from webpurse.protocol.errors import ApduFormatError


@pytest.mark.parametrize(
    ("hex_apdu", "data", "le"),
    [
        ("805C000204", b"", 4),  # case 2
        ("00A4000002100100", bytes.fromhex("1001"), 0),  # case 4
        ("00A40000021001", bytes.fromhex("1001"), None),  # case 3
        ("00B0950000", b"", 0),
    ],
)
def test_cases_round_trip(hex_apdu: str, data: bytes, le: int | None) -> None:
    apdu = CommandApdu.from_bytes(bytes.fromhex(hex_apdu))
    assert apdu.data == data
    assert apdu.le == le
    assert apdu.to_bytes().hex().upper() == hex_apdu


def test_header_only_case_1() -> None:
    apdu = CommandApdu.from_bytes(bytes.fromhex("00A40000"))
    assert (apdu.data, apdu.le) == (b"", None)


@pytest.mark.parametrize("hex_apdu", ["", "00", "00A400", "00A40000050102", "00A4000000AA"])
def test_inconsistent_lengths_are_refused(hex_apdu: str) -> None:
    with pytest.raises(ApduFormatError):
        CommandApdu.from_bytes(bytes.fromhex(hex_apdu))


@given(st.binary(max_size=300))
def test_parser_accepts_or_refuses_cleanly(raw: bytes) -> None:
    try:
        apdu = CommandApdu.from_bytes(raw)
    except ApduFormatError:
        return
    assert apdu.to_bytes() == raw


@given(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=255),
    st.none() | st.integers(0, 255),
)
def test_every_short_apdu_round_trips(
    cla: int, ins: int, p1: int, p2: int, data: bytes, le: int | None
) -> None:
    apdu = CommandApdu(cla, ins, p1, p2, data, le)
    assert CommandApdu.from_bytes(apdu.to_bytes()) == apdu


def test_response_split_and_render() -> None:
    response = ResponseApdu.from_bytes(bytes.fromhex("6C394D649000"))
    assert response.data == bytes.fromhex("6C394D64")
    assert response.ok
    assert str(response) == "6C394D64 9000"
    assert str(ResponseApdu(b"", 0x9406)) == "9406"
    with pytest.raises(ApduFormatError):
        ResponseApdu.from_bytes(b"\x90")


def test_every_status_word_has_a_name() -> None:
    for sw in StatusWord:
        assert describe_sw(sw) != "unknown status word"
    assert describe_sw(0x63C2) == "wrong PIN, 2 tries left"
    assert describe_sw(0x6C1E) == "wrong Le, 30 bytes available"
    assert describe_sw(0x6110) == "16 more bytes available (GET RESPONSE)"
    assert describe_sw(0x1234) == "unknown status word"
