"""How a payment shows its authorisation (settlement/views.py), against the protocol."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webpurse.protocol.commands import DebitForPurchase
from webpurse.protocol.errors import FieldError
from webpurse.settlement import changes, views
from webpurse.settlement.transactions import Kind


@given(
    seq=st.integers(0, 2**32 - 1),
    at=st.datetimes(dt.datetime(1000, 1, 1), dt.datetime(9999, 12, 31)),  # 4-digit years
    mac1=st.binary(min_size=4, max_size=4),
    upper=st.booleans(),
)
def test_the_debit_apdu_is_the_protocols_command(
    seq: int, at: dt.datetime, mac1: bytes, upper: bool
) -> None:
    """The answer's DEBIT FOR PURCHASE, built from the row's text, is the command the
    protocol encodes from the same authorisation (the row as changes.authorised writes it)."""
    row = changes.authorised(
        Kind.PAYMENT,
        "requires_card",
        card_id="card_1",
        card_number="0123456789ABCDEF",
        key_version=1,
        balance=1_000,
        counter=7,
        random=bytes(4),
        date=at.date(),
        time=at.time().replace(microsecond=0),
        now=dt.datetime(2026, 12, 6, tzinfo=dt.UTC),
        supersedes=None,
    )
    date, time = str(row["txn_date"]), str(row["txn_time"])
    expected = DebitForPurchase(seq, at.date(), at.time().replace(microsecond=0), mac1)
    text = mac1.hex().upper() if upper else mac1.hex()
    assert views.debit_apdu(seq, date, time, text) == expected.to_apdu().to_bytes().hex().upper()


@pytest.mark.parametrize(
    ("date", "time"),
    [("2026AB01", "120000"), ("20261301", "120000"), ("20261201", "126000"), ("20261201", "12")],
)
def test_a_row_whose_date_is_not_bcd_is_refused_as_before(date: str, time: str) -> None:
    with pytest.raises(FieldError):
        views.debit_apdu(1, date, time, "00000000")


# What a later step changes, pinned to its value at each step (views.payment_as_of).
_LATER = ("status", "decline_code", "amount_refunded", "updated_at")
_PINNED = {
    "create": (*_LATER, "card_number", "tac", "authorisation"),
    "authorise": (*_LATER, "tac"),
    "capture": _LATER,
}


@given(
    step=st.sampled_from(views.STEPS),
    data=st.data(),
    change=st.sampled_from(["drop", "other", "none"]),
)
def test_an_answer_renders_as_of_its_step_only_if_every_pinned_member_agrees(
    step: str, data: st.DataObject, change: str
) -> None:
    """renders_as_of is true for the step's own rendering, and false as soon as one member
    a later step changes is missing from the answer or has another value."""
    from webpurse.settlement.models import Payment

    at = dt.datetime(2026, 12, 6, 10, 0, 0, 250_000, tzinfo=dt.UTC)
    payment = Payment(
        id="pay_1",
        merchant_id="mer_1",
        status="succeeded",
        amount=5,
        currency="CNY",
        description="",
        merchant_reference="",
        metadata_={},
        terminal_id="112233445566",
        key_index=1,
        card_number="0123456789ABCDEF",
        terminal_seq=3,
        txn_date="20261206",
        txn_time="100000",
        mac1="A1B2C3D4",
        tac="0A0B0C0D",
        refunded_amount=2,
        created_at=at,
        updated_at=at + dt.timedelta(hours=1),
        authorised_at=at + dt.timedelta(seconds=1),
        succeeded_at=at + dt.timedelta(seconds=2),
    )
    answer = views.payment_as_of(payment, step)
    assert views.renders_as_of(answer, payment, step)
    member = data.draw(st.sampled_from(_PINNED[step]))
    if change == "drop":
        del answer[member]
    else:
        answer[member] = None if change == "none" and answer[member] is not None else "other"
    assert not views.renders_as_of(answer, payment, step)


_ZONES = st.sampled_from(
    [dt.UTC, dt.timezone(dt.timedelta(hours=1)), dt.timezone(dt.timedelta(hours=-5))]
)


_TIME = st.datetimes(timezones=_ZONES, min_value=dt.datetime(2000, 1, 1))


@given(
    # equal instants as other objects, in other zones (UTC as another tzinfo too) and
    # folds beside each time
    pool=st.lists(_TIME, min_size=1, max_size=3).map(
        lambda ts: [
            t
            for at in ts
            for t in (
                at,
                at.replace(),
                at.astimezone(dt.UTC),
                at.astimezone(dt.UTC).replace(fold=1),
                at.astimezone(ZoneInfo("UTC")),
                at.astimezone(dt.timezone(dt.timedelta(0))),
            )
        ]
    ),
    picks=st.lists(st.tuples(st.integers(0, 17), st.integers(0, 17)), min_size=2, max_size=8),
)
def test_a_payments_times_show_as_each_time_object_writes_itself(
    pool: list[dt.datetime], picks: list[tuple[int, int]]
) -> None:
    """payment_json keeps the text of the last time object it showed: however the same
    objects, equal ones and equal instants in other zones follow one another, each answer
    shows its own object's isoformat, as when nothing was kept."""
    from types import SimpleNamespace

    for i, j in picks:
        created, updated = pool[i % len(pool)], pool[j % len(pool)]
        payment: Any = SimpleNamespace(
            id="pay_1",
            status="requires_card",
            amount=1,
            currency="CNY",
            description="",
            merchant_reference="",
            metadata_={},
            terminal_id="112233445566",
            key_index=1,
            card_number=None,
            decline_code=None,
            tac=None,
            refunded_amount=0,
            mac1=None,
            terminal_seq=None,
            created_at=created,
            updated_at=updated,
        )
        answer = views.payment_json(payment)
        assert (answer["created_at"], answer["updated_at"]) == (
            created.isoformat(),
            updated.isoformat(),
        )
