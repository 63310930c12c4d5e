"""Arbitrary bytes into the card: never an exception, always a status word, no value made."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.card.support import Terminal, make_card
from webpurse.protocol.apdu import ResponseApdu

known_ins = st.sampled_from([0xA4, 0xB0, 0xB2, 0x20, 0x5C, 0x50, 0x52, 0x54, 0x5A, 0xC0, 0xCA])
structured = st.builds(
    lambda cla, ins, p1, p2, tail: bytes((cla, ins, p1, p2)) + tail,
    st.sampled_from([0x00, 0x80, 0x84, 0x90]),
    known_ins,
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=40),
)
apdus = st.one_of(st.binary(max_size=300), structured)


@settings(max_examples=400, deadline=None)
@given(st.lists(apdus, max_size=12))
def test_arbitrary_apdus_never_raise_and_never_create_value(batch: list[bytes]) -> None:
    t = Terminal(make_card())
    assert t.load(5_000).ok
    before = t.card.state
    t.select()
    for raw in batch:
        answer = t.card.process(raw)
        assert isinstance(answer, bytes) and len(answer) >= 2
        ResponseApdu.from_bytes(answer)
    after = t.card.state
    # Without the keys no MAC verifies: balance and counters cannot move.
    assert after.balance == before.balance
    assert (after.online_counter, after.offline_counter) == (
        before.online_counter,
        before.offline_counter,
    )
