"""The double-entry ledger: zero-sum transfers, idempotent ids, the check catches tampering."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from webpurse.settlement import ledger
from webpurse.settlement.db import make_engine, make_session_factory, migrate
from webpurse.settlement.ledger import LedgerError
from webpurse.settlement.models import Account

NOW = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
CARD = ledger.card_account("crd_1")
CASH = ledger.funding_account("cash")
SHOP = ledger.merchant_account("mer_1")


@pytest.fixture
def session(db_url: str) -> Iterator[Session]:
    engine = make_engine(db_url, pool_size=2, max_overflow=0)
    migrate(engine)
    with make_session_factory(engine)() as session:
        yield session
    engine.dispose()


def test_transfers_move_value_and_sum_to_zero(session: Session) -> None:
    ledger.post_transfer(session, "t1", CASH, CARD, 1_000, "load", now=NOW)
    ledger.post_transfer(session, "t2", CARD, SHOP, 300, "purchase", now=NOW)
    session.commit()
    assert (ledger.balance(session, CASH), ledger.balance(session, CARD)) == (-1_000, 700)
    assert ledger.balance(session, SHOP) == 300
    report = ledger.check(session)
    assert report.ok, report.problems
    assert report.totals == {"funding": -1_000, "card": 700, "merchant": 300}


def test_a_retried_transfer_id_posts_once(session: Session) -> None:
    first = ledger.post_transfer(session, "t1", CASH, CARD, 1_000, "load", now=NOW)
    again = ledger.post_transfer(session, "t1", CASH, CARD, 1_000, "load", now=NOW)
    assert first.created and not again.created
    assert ledger.balance(session, CARD) == 1_000
    with pytest.raises(LedgerError, match="different transfer"):
        ledger.post_transfer(session, "t1", CASH, CARD, 999, "load", now=NOW)


@pytest.mark.parametrize("amount", [0, -5, 1.5, True])
def test_only_positive_integer_fen(session: Session, amount: object) -> None:
    with pytest.raises(LedgerError):
        ledger.post_transfer(session, "bad", CASH, CARD, amount, "load", now=NOW)  # type: ignore[arg-type]


def test_accounts_that_hold_value_cannot_go_negative(session: Session) -> None:
    ledger.post_transfer(session, "t1", CASH, CARD, 100, "load", now=NOW)
    with pytest.raises(LedgerError, match="cannot transfer"):
        ledger.post_transfer(session, "t2", CARD, SHOP, 101, "purchase", now=NOW)


def test_the_check_catches_an_edited_balance(session: Session) -> None:
    ledger.post_transfer(session, "t1", CASH, CARD, 1_000, "load", now=NOW)
    session.commit()
    session.execute(update(Account).where(Account.id == CARD).values(balance=5_000))
    session.commit()
    report = ledger.check(session)
    assert not report.ok
    assert any("cached balance 5000" in p for p in report.problems)
