"""The batch runner every local backend shares: order, stop-on-error, 61xx, 6Cxx, breaks."""

from __future__ import annotations

import pytest

from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader import CardRemoved, LinkBroken, Step, run_batch
from webpurse.reader.batch import MAX_GET_RESPONSE, get_response, with_le


class ScriptedCard:
    """A fake card: answers each expected command APDU with a scripted response, in order."""

    def __init__(self, script: list[tuple[str, str]]) -> None:
        self.script = [(bytes.fromhex(c), bytes.fromhex(r)) for c, r in script]
        self.sent: list[bytes] = []

    def send(self, apdu: bytes) -> bytes:
        self.sent.append(apdu)
        expected, response = self.script.pop(0)
        assert apdu == expected, f"sent {apdu.hex()} but the script expected {expected.hex()}"
        return response


def steps(*apdus: str, ok: frozenset[int] = frozenset({0x9000})) -> list[Step]:
    return [Step(bytes.fromhex(a), ok) for a in apdus]


def test_sends_in_order_and_returns_every_response() -> None:
    card = ScriptedCard([("00A4040000", "9000"), ("805C000204", "000003E8 9000")])
    responses = run_batch(steps("00A4040000", "805C000204"), card.send)
    assert responses == [ResponseApdu(b"", 0x9000), ResponseApdu(bytes.fromhex("000003E8"), 0x9000)]
    assert card.script == []


def test_stops_at_the_first_status_word_not_in_the_ok_set() -> None:
    card = ScriptedCard([("00A4040000", "9000"), ("805001020B", "9401")])
    responses = run_batch(steps("00A4040000", "805001020B", "8054010000"), card.send)
    assert [r.sw for r in responses] == [0x9000, 0x9401]
    assert len(card.sent) == 2  # the DEBIT never went out


def test_a_status_word_in_the_steps_ok_set_lets_the_batch_go_on() -> None:
    card = ScriptedCard([("805A000602", "9406"), ("805C000204", "00000000 9000")])
    batch = [Step(bytes.fromhex("805A000602"), frozenset({0x9000, 0x9406})), *steps("805C000204")]
    assert [r.sw for r in run_batch(batch, card.send)] == [0x9406, 0x9000]


def test_61xx_is_fetched_with_get_response_and_joined() -> None:
    card = ScriptedCard(
        [
            ("00B2014C00", "0102 6104"),
            ("00C0000004", "03040506 6102"),
            ("00C0000002", "0708 9000"),
        ]
    )
    [response] = run_batch(steps("00B2014C00"), card.send)
    assert response == ResponseApdu(bytes.fromhex("0102030405060708"), 0x9000)


def test_6cxx_resends_the_command_with_the_right_le() -> None:
    card = ScriptedCard([("00B0950020", "6C1E"), ("00B095001E", "AA" * 30 + "9000")])
    [response] = run_batch(steps("00B0950020"), card.send)
    assert response == ResponseApdu(b"\xaa" * 30, 0x9000)


def test_6cxx_then_61xx_are_both_handled() -> None:
    card = ScriptedCard(
        [("00B0950020", "6C04"), ("00B0950004", "6104"), ("00C0000004", "01020304 9000")]
    )
    [response] = run_batch(steps("00B0950020"), card.send)
    assert response == ResponseApdu(bytes.fromhex("01020304"), 0x9000)


def test_6cxx_is_resent_only_once() -> None:
    card = ScriptedCard([("00B0950020", "6C1E"), ("00B095001E", "6C10")])
    [response] = run_batch(steps("00B0950020"), card.send)
    assert response.sw == 0x6C10  # not in the ok set: the caller sees the failure


def test_a_card_that_never_stops_answering_61xx_fails_the_step() -> None:
    script = [("00B2014C00", "6101")] + [("00C0000001", "00 6101")] * MAX_GET_RESPONSE
    card = ScriptedCard(script)
    [response] = run_batch(steps("00B2014C00"), card.send)
    assert response.sw == 0x6101
    assert card.script == []


def test_a_broken_link_is_card_removed_with_the_responses_so_far() -> None:
    sent: list[bytes] = []

    def send(apdu: bytes) -> bytes:
        sent.append(apdu)
        if len(sent) == 3:
            raise LinkBroken("pulled")
        return b"\x90\x00"

    with pytest.raises(CardRemoved) as caught:
        run_batch(steps("00A4040000", "00B0950000", "8054010000", "805C000204"), send)
    assert [r.sw for r in caught.value.responses] == [0x9000, 0x9000]
    assert "pulled" in str(caught.value)
    assert len(sent) == 3


def test_a_break_during_get_response_loses_that_whole_step() -> None:
    calls = iter([b"\x90\x00", b"\x61\x08"])

    def send(apdu: bytes) -> bytes:
        try:
            return next(calls)
        except StopIteration:
            raise LinkBroken("gone") from None

    with pytest.raises(CardRemoved) as caught:
        run_batch(steps("00A4040000", "00B2014C00"), send)
    assert [r.sw for r in caught.value.responses] == [0x9000]


def test_a_malformed_response_is_an_unknown_outcome() -> None:
    with pytest.raises(CardRemoved) as caught:
        run_batch(steps("805C000204"), lambda apdu: b"\x90")
    assert caught.value.responses == []


def test_helpers() -> None:
    assert get_response(0x1E) == bytes.fromhex("00C000001E")
    assert with_le(bytes.fromhex("805C000204"), 0x10) == bytes.fromhex("805C000210")
    assert with_le(bytes.fromhex("00A4040002AABB"), 0x00) == bytes.fromhex("00A4040002AABB00")
    assert with_le(b"\x00\xa4", 1) is None
