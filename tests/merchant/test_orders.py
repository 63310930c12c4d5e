"""The order book on SQLite and PostgreSQL: a paid order never goes back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.settlement.support import BACKENDS, database_url
from webpurse.merchant.orders import (
    DECLINED,
    INTERRUPTED,
    PAID,
    PENDING,
    PURCHASE,
    TOPUP,
    OrderBook,
    make_engine,
)


@pytest.fixture(params=BACKENDS)
def book(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OrderBook]:
    with database_url(str(request.param), tmp_path) as url:
        engine = make_engine(url)
        try:
            yield OrderBook(engine)
        finally:
            engine.dispose()


def test_orders_are_created_found_and_listed_per_session(book: OrderBook) -> None:
    first = book.create(
        session_id="s1", kind=PURCHASE, amount=1250, lines_json='[{"product": "tea"}]'
    )
    second = book.create(session_id="s1", kind=TOPUP, amount=5000)
    book.create(session_id="s2", kind=PURCHASE, amount=1)
    assert first.id.startswith("ord_") and first.status == PENDING
    assert [o.id for o in book.for_session("s1")] == [second.id, first.id]
    found = book.get(first.id)
    assert found is not None and found.lines == [{"product": "tea"}]
    book.update(first.id, settlement_id="pay_1")
    by_payment = book.by_settlement_id("pay_1")
    assert by_payment is not None and by_payment.id == first.id
    assert [o.id for o in book.open_orders()] == [first.id]


def test_a_paid_order_is_never_moved_back(book: OrderBook) -> None:
    order = book.create(session_id="s", kind=PURCHASE, amount=100)
    book.update(order.id, status=INTERRUPTED, settlement_id="pay_9")
    book.update(order.id, status=PAID, tac="01020304")
    after = book.update(order.id, status=DECLINED, decline_code="late")
    assert after.status == PAID and after.tac == "01020304"
    assert book.open_orders() == []


def test_a_declined_order_can_be_tried_again(book: OrderBook) -> None:
    order = book.create(session_id="s", kind=PURCHASE, amount=100)
    book.update(order.id, status=DECLINED, decline_code="insufficient_funds")
    assert book.update(order.id, status=PENDING, decline_code=None).status == PENDING


def test_unknown_order_is_a_key_error(book: OrderBook) -> None:
    with pytest.raises(KeyError):
        book.update("ord_missing", status=PAID)
