"""Hypothesis on the merchant's reading of what a (possibly hostile) agent returns.

The shop plans batch 1 and recovery (``webpurse.merchant.flows``) and reads the card's
answers that come back over the WebSocket — from an agent it does not control. Whatever
responses arrive (any count, any data, any status word), ``read_first_contact`` and
``read_recovery`` either return what settlement needs (raw bytes, passed on unparsed but
checked for shape) or raise :class:`CardRefused` — never another exception that would
leave an order stuck."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.proof.proof_table import Row, record
from webpurse.merchant.flows import CardRefused, read_first_contact, read_recovery
from webpurse.merchant.settlement import Kind
from webpurse.protocol.apdu import ResponseApdu

_COUNTS = {"read": 0, "refused": 0}
_FIRST: list[float] = []

status_words = st.sampled_from([0x9000, 0x9401, 0x9302, 0x9303, 0x9406, 0x6A82, 0x6700]) | (
    st.integers(0, 0xFFFF)
)
card_data = st.binary(max_size=40) | st.sampled_from([bytes(15), bytes(16), bytes(30)])
responses = st.builds(ResponseApdu, card_data, status_words)
successes = st.builds(ResponseApdu, card_data, st.just(0x9000))


@settings(max_examples=500, derandomize=True, deadline=None, database=None)
@given(
    kind=st.sampled_from(list(Kind)),
    answers=st.lists(responses, max_size=5) | st.lists(successes, min_size=2, max_size=4),
    recovery=st.booleans(),
)
def test_the_shop_reads_any_agent_answer_or_refuses_it(
    kind: Kind, answers: list[ResponseApdu], recovery: bool
) -> None:
    _FIRST[:] = _FIRST or [time.perf_counter()]
    try:
        if recovery:
            initialize, proof = read_recovery(answers)
            assert answers[0].ok and initialize == answers[0].data
            assert proof is None or proof == answers[1].data
        else:
            contact = read_first_contact(kind, answers)
            assert len(answers) >= 3 and all(a.ok for a in answers)
            assert contact.issuer_data == answers[1].data
            assert contact.initialize == answers[2].data
    except CardRefused as refused:
        assert 0 <= refused.sw <= 0xFFFF and refused.reason
        _COUNTS["refused"] += 1
        return
    _COUNTS["read"] += 1


def test_record_the_merchant_flow_fuzz_row() -> None:
    assert _COUNTS["read"] > 0 and _COUNTS["refused"] > 0, _COUNTS
    record(
        Row(
            suite="fuzz-hypothesis",
            scenario="Hypothesis: the shop reads arbitrary agent answers to batch 1 and recovery",
            expected="what settlement needs, taken as is, or CardRefused; nothing else raised",
            observed=f"{_COUNTS['read']} read, {_COUNTS['refused']} refused (CardRefused)",
            passed=True,
            seconds=round(time.perf_counter() - _FIRST[0], 2),
        )
    )
