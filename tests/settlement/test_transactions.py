"""The lifecycle table (settlement/transactions/status.py): every legal move, no other."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webpurse.settlement.transactions import (
    FINAL,
    OPEN,
    TRANSITIONS,
    IllegalTransition,
    Kind,
    Status,
    reachable,
    transition,
)
from webpurse.settlement.transactions.status import initial

S = Status

LEGAL = {
    Kind.PAYMENT: {
        (S.REQUIRES_CARD, S.AUTHORISED),
        (S.REQUIRES_CARD, S.DECLINED),
        (S.REQUIRES_CARD, S.CANCELED),
        (S.REQUIRES_CARD, S.EXPIRED),
        (S.AUTHORISED, S.SUCCEEDED),
        (S.AUTHORISED, S.UNCERTAIN),
        (S.AUTHORISED, S.CANCELED),
        (S.UNCERTAIN, S.SUCCEEDED),
        (S.UNCERTAIN, S.CANCELED),
        (S.CANCELED, S.SUCCEEDED),  # healed: the card proves a released debit ran
    },
    Kind.REFUND: {(S.PENDING, S.SUCCEEDED), (S.PENDING, S.FAILED)},
}
LEGAL[Kind.LOAD] = (LEGAL[Kind.PAYMENT] - {(S.CANCELED, S.SUCCEEDED)}) | {
    (S.REQUIRES_FUNDING, S.REQUIRES_CARD),
    (S.REQUIRES_FUNDING, S.CANCELED),
    (S.REQUIRES_FUNDING, S.EXPIRED),
}


def test_the_stored_strings_are_unchanged() -> None:
    assert {s.value for s in Status} == {
        "requires_funding",
        "requires_card",
        "authorised",
        "uncertain",
        "succeeded",
        "declined",
        "canceled",
        "expired",
        "pending",
        "failed",
    }
    assert OPEN == ("authorised", "uncertain")


@pytest.mark.parametrize(
    ("kind", "current", "new"),
    sorted((kind, a, b) for kind, moves in LEGAL.items() for a, b in moves),
)
def test_every_legal_move(kind: Kind, current: Status, new: Status) -> None:
    assert transition(kind, current, new) is new
    assert transition(kind, current.value, new) is new  # as read from the database


@pytest.mark.parametrize("kind", list(Kind))
def test_every_other_move_raises(kind: Kind) -> None:
    illegal = [(a, b) for a, b in itertools.product(Status, Status) if (a, b) not in LEGAL[kind]]
    assert illegal
    for current, new in illegal:
        with pytest.raises(IllegalTransition) as caught:
            transition(kind, current, new)
        assert (caught.value.kind, caught.value.current, caught.value.new) == (kind, current, new)


def test_the_table_is_exactly_the_legal_moves() -> None:
    for kind, table in TRANSITIONS.items():
        assert {(a, b) for a, nexts in table.items() for b in nexts} == LEGAL[kind]


def test_an_unknown_stored_status_is_illegal() -> None:
    with pytest.raises(IllegalTransition):
        transition(Kind.PAYMENT, "refunded", S.CANCELED)


def test_final_statuses_have_no_way_out() -> None:
    for kind, table in TRANSITIONS.items():
        for status, nexts in table.items():
            if status in FINAL:
                assert not nexts, (kind, status)
    # canceled: an end but for a payment the card proves afterwards (holds.heal)
    assert not TRANSITIONS[Kind.LOAD][S.CANCELED]
    assert TRANSITIONS[Kind.PAYMENT][S.CANCELED] == {S.SUCCEEDED}


@given(
    kind=st.sampled_from(list(Kind)),
    data=st.data(),
    wanted=st.lists(st.sampled_from(list(Status)), max_size=12),
)
def test_accepted_sequences_end_where_the_start_reaches(
    kind: Kind, data: st.DataObject, wanted: list[Status]
) -> None:
    start = data.draw(st.sampled_from(list(initial(kind))))
    current = start
    for new in wanted:
        try:
            current = transition(kind, current, new)
        except IllegalTransition:
            continue  # refused: the state is unchanged
    assert current in reachable(kind, start)
    assert reachable(kind, current) <= reachable(kind, start)
