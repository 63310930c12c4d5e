"""The payout rule as a property: payouts == captures − refunds − top-ups, per merchant.

Hypothesis draws a merchant's history as a sequence of commits — captures, refunds, top-ups
sold and returned, clearing runs and the clock moving on — where each movement carries the
stamp its request read when it *started*, up to two days before it commits. So a capture
stamped 23:59:59 may commit after that day's batch ran, and a top-up may be returned after
the batch that settled it (issue 19, finding 7). Once every day is cleared, the payouts
must add up to exactly captures − refunds − (top-ups sold − returned) (or, when that is
negative, nothing is paid and the last batch carries the debt), the payable and the top-up
receivable must be empty, and no movement may be in two batches or in none. Concurrency
proper (transactions in flight while a batch runs) is the PostgreSQL test's in
``tests/proof/test_attacks_stall.py``.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from webpurse.settlement import ledger
from webpurse.settlement.clearing import (
    ClearingBatch,
    business_day_of,
    last_closed_day,
    run_batch,
)
from webpurse.settlement.db import SessionFactory, make_engine, make_session_factory, migrate
from webpurse.settlement.merchants import create_merchant

START = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionFactory]:
    path: Path = tmp_path_factory.mktemp("clearing") / "settlement.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    yield make_session_factory(engine)
    engine.dispose()


LAG = st.integers(min_value=0, max_value=2 * 24 * 3600)  # how long before its commit it was stamped
AMOUNT = st.integers(min_value=1, max_value=5000)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("capture"), AMOUNT, LAG),
        st.tuples(st.just("refund"), AMOUNT, LAG),
        st.tuples(st.just("topup"), AMOUNT, LAG),
        st.tuples(st.just("return"), st.integers(min_value=0, max_value=20), LAG),
        st.tuples(st.just("advance"), st.integers(min_value=1, max_value=30), st.just(0)),
        st.tuples(st.just("clear"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@dataclass
class History:
    """One merchant's money, as the test counts it, and the clock."""

    merchant_id: str
    now: dt.datetime = START
    next_day: dt.date = field(default_factory=lambda: business_day_of(START))
    captured: int = 0
    refunded: int = 0
    sold: int = 0
    returned: int = 0
    open_topups: list[tuple[str, int]] = field(default_factory=list)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    def stamp(self, lag: int) -> dt.datetime:
        return max(self.now - dt.timedelta(seconds=lag), START)


def _post(
    factory: SessionFactory,
    history: History,
    debit: str,
    credit: str,
    amount: int,
    kind: str,
    at: dt.datetime,
) -> bool:
    transfer_id = f"{history.merchant_id}:{kind}:{next(history.ids)}"
    try:
        with factory() as session, session.begin():
            ledger.post_transfer(
                session, transfer_id, debit, credit, amount, kind, now=at, reference=transfer_id
            )
    except ledger.LedgerError:
        return False  # e.g. a refund larger than the payable: refused, nothing changed
    return True


def _apply(factory: SessionFactory, history: History, op: tuple[str, int, int]) -> None:
    name, value, lag = op
    at = history.stamp(lag)
    payable = ledger.merchant_account(history.merchant_id)
    receivable = ledger.topups_account(history.merchant_id)
    if name == "capture":
        _post(factory, history, "funding:test", ledger.HELD_PURCHASES, value, "purchase_hold", at)
        _post(factory, history, ledger.HELD_PURCHASES, payable, value, "purchase_capture", at)
        history.captured += value
    elif name == "refund":
        if _post(factory, history, payable, ledger.REFUNDS_PENDING, value, "refund_reserve", at):
            history.refunded += value
    elif name == "topup":
        _post(factory, history, receivable, ledger.HELD_LOADS, value, "load_hold", at)
        history.sold += value
        history.open_topups.append((f"t{value}", value))
    elif name == "return":
        if history.open_topups:
            _, amount = history.open_topups.pop(value % len(history.open_topups))
            _post(factory, history, ledger.HELD_LOADS, receivable, amount, "load_return", at)
            history.returned += amount
    elif name == "advance":
        history.now += dt.timedelta(hours=value)
    elif name == "clear":
        _clear(factory, history)


def _clear(factory: SessionFactory, history: History) -> None:
    while history.next_day <= last_closed_day(history.now):
        with factory() as session, session.begin():
            run_batch(session, history.merchant_id, history.next_day, history.now)
        history.next_day += dt.timedelta(days=1)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(ops=[("capture", 1, 0), ("advance", 4, 0), ("clear", 0, 0), ("topup", 1, 0)])
@given(ops=OPS)
def test_payouts_are_captures_minus_refunds_minus_top_ups_over_any_commit_order(
    factory: SessionFactory, ops: list[tuple[str, int, int]]
) -> None:
    with factory() as session, session.begin():
        merchant, _ = create_merchant(session, "Property shop", START)
        history = History(merchant.id)
    for op in ops:
        _apply(factory, history, op)
    history.now += dt.timedelta(days=3)  # every stamp is now in a closed day
    _clear(factory, history)
    expected = history.captured - history.refunded - (history.sold - history.returned)
    with factory() as session:
        paid = ledger.balance(session, ledger.payout_account(merchant.id))
        batches = list(
            session.scalars(
                select(ClearingBatch)
                .where(ClearingBatch.merchant_id == merchant.id)
                .order_by(ClearingBatch.day)
            )
        )
        last = batches[-1]
        assert sum(b.payout for b in batches) == paid
        # every movement in exactly one batch: the days' nets add up to the whole history
        assert sum(b.payment_total for b in batches) == history.captured
        assert sum(b.refund_total for b in batches) == history.refunded
        assert sum(b.topup_total for b in batches) == history.sold - history.returned
        # What was paid, plus the debt the last batch carries forward, is exactly the rule.
        # A debt remains whenever money owed (top-ups sold, refunds) arrived after a payout
        # had already left: a payout is never clawed back, the next one nets it.
        assert last.carried_out <= 0
        assert paid + last.carried_out == expected
        if last.carried_out == 0:
            assert ledger.balance(session, ledger.merchant_account(merchant.id)) == 0
            assert ledger.balance(session, ledger.topups_account(merchant.id)) == 0
