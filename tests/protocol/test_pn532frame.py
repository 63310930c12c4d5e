"""The PN532 frame codec (UM0701-02 §6.2): round trips, stream splits, refusals by code."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webpurse.card.vpcd import CARD_ATR
from webpurse.protocol.pn532frame import (
    ACK_FRAME,
    ERROR_FRAME,
    MAX_EXTENDED,
    NACK_FRAME,
    TFI_CHIP,
    TFI_HOST,
    WAKEUP,
    Ack,
    BadFrame,
    ErrorFrame,
    FrameDecoder,
    Information,
    Nack,
    Pn532FrameError,
    TargetA,
    chunks,
    command_frame,
    decode_frame,
    decode_list_passive_a,
    encode_frame,
    pcsc_atr,
)

payloads = st.binary(min_size=1, max_size=MAX_EXTENDED - 1)
tfis = st.sampled_from([TFI_HOST, TFI_CHIP])


def test_get_firmware_version_frame_is_the_manuals() -> None:
    # UM0701-02 §7.2.2's example: 00 00 FF 02 FE D4 02 2A 00
    assert command_frame(0x02) == bytes.fromhex("0000FF02FED4022A00")


@given(tfis, payloads)
def test_round_trip(tfi: int, data: bytes) -> None:
    frame = encode_frame(tfi, data)
    assert decode_frame(frame) == Information(tfi, data)
    extended = len(data) + 1 > 255
    assert frame[3:5] == (
        b"\xff\xff" if extended else bytes((len(data) + 1, (-len(data) - 1) & 0xFF))
    )


@given(st.lists(st.tuples(tfis, payloads), min_size=1, max_size=4), st.data())
def test_stream_split_anywhere_with_wakeup_and_acks(
    frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = WAKEUP + ACK_FRAME
    for tfi, payload in frames:
        stream += encode_frame(tfi, payload) + NACK_FRAME
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    events = []
    last = 0
    for cut in [*cuts, len(stream)]:
        events += decoder.feed(stream[last:cut])
        last = cut
    expected: list[object] = [Ack()]
    for tfi, payload in frames:
        expected += [Information(tfi, payload), Nack()]
    assert events == expected


@given(tfis, payloads, st.integers(1, 255))
def test_bad_data_checksum_is_refused(tfi: int, data: bytes, delta: int) -> None:
    frame = bytearray(encode_frame(tfi, data))
    frame[-2] = (frame[-2] + delta) & 0xFF
    with pytest.raises(Pn532FrameError) as refused:
        decode_frame(bytes(frame))
    assert refused.value.code == "bad_data_checksum"


@given(st.binary(min_size=1, max_size=200), st.integers(1, 255))
def test_bad_length_checksum_is_refused(data: bytes, delta: int) -> None:
    frame = bytearray(encode_frame(TFI_HOST, data))
    frame[4] = (frame[4] + delta) & 0xFF
    if frame[3:5] in (b"\x00\xff", b"\xff\x00", b"\xff\xff"):
        return  # became an ACK/NACK/extended header: a different frame, not a bad one
    with pytest.raises(Pn532FrameError) as refused:
        decode_frame(bytes(frame))
    assert refused.value.code == "bad_length_checksum"


def test_decoder_drops_a_bad_frame_and_keeps_the_next() -> None:
    bad = bytearray(encode_frame(TFI_CHIP, b"\x03\x32\x01\x06\x07"))
    bad[-2] ^= 0x01
    good = encode_frame(TFI_CHIP, b"\x15")
    events = FrameDecoder().feed(bytes(bad) + good)
    assert events[0] == BadFrame("bad_data_checksum")
    assert events[-1] == Information(TFI_CHIP, b"\x15")


def test_error_frame_ack_nack_and_refusals() -> None:
    assert decode_frame(ERROR_FRAME) == ErrorFrame()
    assert decode_frame(ACK_FRAME) == Ack()
    assert decode_frame(NACK_FRAME) == Nack()
    with pytest.raises(Pn532FrameError, match="bad_postamble"):
        decode_frame(ACK_FRAME[:-1] + b"\x01")
    with pytest.raises(Pn532FrameError, match="truncated"):
        decode_frame(command_frame(0x02)[:-3])
    with pytest.raises(Pn532FrameError, match="bad_tfi"):
        decode_frame(encode_frame(0xD6, b"\x02"))
    with pytest.raises(Pn532FrameError, match="too_long"):
        encode_frame(TFI_HOST, bytes(MAX_EXTENDED))


def test_list_passive_target_answer_and_atr() -> None:
    ats = bytes((13, 0x78, 0x80, 0x70, 0x02)) + b"WEBPURSE"
    target = TargetA(1, b"\x00\x04", 0x20, bytes.fromhex("08A1B2C3"), ats)
    assert decode_list_passive_a(b"\x01" + target.encode()) == [target]
    assert decode_list_passive_a(b"\x00") == []
    assert target.historical == b"WEBPURSE"
    assert pcsc_atr(b"WEBPURSE") == CARD_ATR  # what pcscd shows for the same card via vpcd
    with pytest.raises(Pn532FrameError, match="bad_answer"):
        decode_list_passive_a(b"\x01" + target.encode()[:6])


@given(st.binary(max_size=1000))
def test_chunks_rejoin(data: bytes) -> None:
    pieces = chunks(data)
    assert b"".join(pieces) == data
    assert all(len(piece) <= 252 for piece in pieces)
