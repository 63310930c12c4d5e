"""The double-entry ledger: zero-sum transfers, idempotent ids, the check catches tampering."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, text, update
from sqlalchemy.orm import Session

from tests.settlement.support import database_url, migrate_to_head
from webpurse.settlement import clearing, ledger
from webpurse.settlement.db import make_engine, make_session_factory, migrate
from webpurse.settlement.ledger import LedgerError
from webpurse.settlement.models import Account, Card, Merchant, Payment, PaymentHold, Transfer
from webpurse.settlement.webhooks.tables import WebhookEvent

NOW = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
CARD = ledger.card_account("crd_1")
CASH = ledger.funding_account("cash")
SHOP = ledger.merchant_account("mer_1")


@pytest.fixture
def session(migrated_db_url: str) -> Iterator[Session]:
    engine = make_engine(migrated_db_url, pool_size=2, max_overflow=0)
    migrate_to_head(engine)
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


def _card_and_payments(session: Session, *payments: tuple[str, str, int]) -> None:
    session.add(Merchant(id="mer_1", name="shop", terminal_id="AA" * 6, created_at=NOW))
    session.add(
        Card(
            id="crd_1",
            card_number="1" * 20,
            status="active",
            issuer_id="1",
            key_version=1,
            start_date=NOW.date(),
            expiry_date=NOW.date() + dt.timedelta(days=3650),
            max_balance=1_000_000,
            shadow_balance=1_000,
            online_counter=1,
            offline_counter=0,
            created_at=NOW,
            updated_at=NOW,
        )
    )
    session.flush()
    for payment_id, status, amount in payments:
        session.add(
            Payment(
                id=payment_id,
                merchant_id="mer_1",
                status=status,
                amount=amount,
                currency="CNY",
                terminal_id="AA" * 6,
                card_id="crd_1",
                card_number="1" * 20,
                created_at=NOW,
                updated_at=NOW,
            )
        )
    session.flush()


def test_purchase_holds_are_the_open_payments_not_transfers(session: Session) -> None:
    """held:purchases and the card's balance are derived from the open payments: read as
    when authorise posted card → held; the check shows them so and holds the card to them."""
    _card_and_payments(
        session,
        ("pay_open", "authorised", 300),
        ("pay_lost", "uncertain", 200),
        ("pay_done", "succeeded", 100),
        ("pay_gone", "canceled", 400),
    )
    ledger.post_transfer(session, "load", CASH, CARD, 1_000, "load", now=NOW)
    ledger.post_transfer(session, "pay_done:capture", CARD, SHOP, 100, "purchase", now=NOW)
    session.commit()
    assert ledger.balance(session, ledger.HELD_PURCHASES) == 500
    assert ledger.balance(session, CARD) == 400  # 1,000 - 100 captured - 500 held
    assert ledger.available(session, ["crd_1"])["crd_1"].amount == 400
    assert ledger.available(session, ["crd_1"], excluding="pay_open")["crd_1"].amount == 700
    report = ledger.check(session)
    assert report.ok, report.problems
    assert report.totals == {"funding": -1_000, "card": 400, "held": 500, "merchant": 100}
    # Holds beyond what the card's account holds: the check names the card. (Through the
    # ORM, which keeps the payment's payment_holds row with its status.)
    gone = session.get_one(Payment, "pay_gone")
    gone.status, gone.amount = "authorised", 401
    session.commit()
    assert ledger.check(session).problems == ["card:crd_1: open holds 901 exceed its balance 900"]


def test_the_hold_rows_must_be_exactly_the_open_payments(session: Session) -> None:
    """``payment_holds`` is what ``available`` and the sweeps read: a status changed behind
    settlement's back (no row written or deleted with it), a row deleted, added or changed,
    and a wrong ``awaiting_card`` are each reported."""
    _card_and_payments(session, ("pay_open", "authorised", 300), ("pay_done", "succeeded", 100))
    ledger.post_transfer(session, "load", CASH, CARD, 1_000, "load", now=NOW)
    ledger.post_transfer(session, "pay_done:capture", CARD, SHOP, 100, "purchase", now=NOW)
    session.commit()
    assert ledger.check(session).ok
    holds = PaymentHold.__table__
    session.execute(update(Payment).where(Payment.id == "pay_done").values(status="uncertain"))
    session.execute(delete(holds).where(holds.c.payment_id == "pay_open"))
    session.execute(
        insert(holds).values(payment_id="pay_none", card_id="crd_1", amount=5, authorised_at=NOW)
    )
    session.commit()
    problems = ledger.check(session).problems
    assert "payment pay_done is uncertain but has no hold row" in problems
    assert "payment pay_open is authorised but has no hold row" in problems
    assert "hold row for payment pay_none, which is missing" in problems
    session.execute(delete(holds).where(holds.c.payment_id == "pay_none"))
    session.execute(update(Payment).where(Payment.id == "pay_done").values(status="succeeded"))
    session.execute(
        insert(holds).values(payment_id="pay_open", card_id="crd_2", amount=300, authorised_at=NOW)
    )
    session.execute(
        insert(holds).values(payment_id="pay_done", card_id="crd_1", amount=100, authorised_at=NOW)
    )
    session.execute(update(Payment).where(Payment.id == "pay_open").values(awaiting_card=True))
    session.commit()
    assert ledger.check(session).problems == [
        "hold row for payment pay_done, which is succeeded",
        "hold row for payment pay_open differs from the payment",
        "payment pay_open is authorised but its awaiting_card disagrees",
    ]


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


def test_the_check_catches_entries_on_an_account_that_does_not_exist(session: Session) -> None:
    """No foreign key guards the account names any more (migration 0011): the check does."""
    ledger.post_transfer(session, "t1", CASH, CARD, 1_000, "load", now=NOW)
    session.commit()
    session.execute(delete(Account).where(Account.id == CARD))
    session.commit()
    report = ledger.check(session)
    assert not report.ok
    assert f"entries on unknown account {CARD}" in report.problems


def test_the_check_catches_entries_of_a_transfer_that_does_not_exist(session: Session) -> None:
    """No foreign key guards an entry's transfer any more (migration 0019): the check does."""
    ledger.post_transfer(session, "t1", CASH, CARD, 1_000, "load", now=NOW)
    session.commit()
    session.execute(delete(Transfer).where(Transfer.id == "t1"))
    session.commit()
    report = ledger.check(session)
    assert "entries for unknown transfer t1" in report.problems, report.problems


def test_the_check_catches_rows_naming_a_merchant_or_card_that_does_not_exist(
    session: Session,
) -> None:
    """A payment's merchant and card and a webhook event's merchant have no foreign key
    (migration 0019: a check on a hot row per inserted row): the check proves them."""
    _card_and_payments(session, ("pay_ok", "canceled", 100))
    session.commit()
    assert ledger.check(session).problems == []
    session.execute(
        update(Payment).where(Payment.id == "pay_ok").values(merchant_id="mer_x", card_id="crd_x")
    )
    session.execute(
        insert(WebhookEvent).values(
            id="evt_1", merchant_id="mer_y", type="payment.created", created_at=NOW, body="{}"
        )
    )
    session.commit()
    assert ledger.check(session).problems == [
        "payment pay_ok names unknown merchant mer_x",
        "payment pay_ok names unknown card crd_x",
        "webhook event evt_1 names unknown merchant mer_y",
    ]


def test_the_check_replays_each_account_in_entry_id_order(session: Session) -> None:
    """The balance after each entry is derived in id (commit) order (migration 0015): an
    entry moved after the spending it paid for takes the account below zero on the way,
    which the check reports though every total still adds up."""
    ledger.post_transfer(session, "t1", CASH, CARD, 100, "load", now=NOW)
    ledger.post_transfer(session, "t2", CARD, SHOP, 100, "purchase", now=NOW)
    session.commit()
    assert ledger.check(session).ok
    credit = session.execute(
        text("SELECT id FROM ledger_entries WHERE transfer_id = 't1' AND account_id = :a"),
        {"a": CARD},
    ).scalar_one()
    session.execute(text("UPDATE ledger_entries SET id = id + 100 WHERE id = :id"), {"id": credit})
    session.commit()
    spent = session.execute(
        text("SELECT id FROM ledger_entries WHERE transfer_id = 't2' AND account_id = :a"),
        {"a": CARD},
    ).scalar_one()
    report = ledger.check(session)
    assert report.problems == [f"{CARD}: balance -100 after entry {spent}, below zero"]


@pytest.mark.postgres
def test_concurrent_first_use_of_an_account_creates_it_once(tmp_path: Path) -> None:
    """Regression: two transactions that first use one account both succeed (no 500).

    The first transaction creates ``funding:cash`` and stays open; the second, on its own
    connection, posts from the same new account and is seen waiting on the first's lock
    (PostgreSQL's pg_locks, bounded polling); then the first commits. The second must go
    on to post its transfer, not fail with a unique violation on the account's id.
    """
    with database_url("postgresql", tmp_path) as url:
        engine = make_engine(url, pool_size=3, max_overflow=0)
        migrate(engine)
        factory = make_session_factory(engine)
        try:
            with factory() as first, factory() as second, factory() as watcher:
                ledger.post_transfer(first, "t1", CASH, CARD, 100, "load", now=NOW)
                second_pid = second.execute(text("SELECT pg_backend_pid()")).scalar_one()
                outcome: dict[str, object] = {}

                def post_second() -> None:
                    try:
                        ledger.post_transfer(
                            second, "t2", CASH, ledger.card_account("crd_2"), 50, "load", now=NOW
                        )
                        second.commit()
                        outcome["ok"] = True
                    except Exception as exc:  # reported below
                        second.rollback()
                        outcome["error"] = exc

                thread = threading.Thread(target=post_second)
                thread.start()
                waiting = text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted")
                deadline = time.monotonic() + 10
                while watcher.execute(waiting, {"pid": second_pid}).scalar_one() == 0:
                    watcher.rollback()
                    assert thread.is_alive(), f"second transfer did not wait: {outcome}"
                    assert time.monotonic() < deadline, "second transfer never waited on the lock"
                    time.sleep(0.01)  # bounded polling for the lock wait, not synchronisation
                first.commit()
                thread.join(timeout=10)
                assert outcome == {"ok": True}
                report = ledger.check(watcher)
                assert report.ok, report.problems
                assert report.totals["funding"] == -150
        finally:
            engine.dispose()


def _post_one(session: Session, path: str, transfer_id: str, debit: str, credit: str) -> None:
    """Post 100 fen one of the two ways the ledger writes entries (single, or a group as the
    batch path does)."""
    if path == "post_transfer":
        ledger.post_transfer(session, transfer_id, debit, credit, 100, "purchase_capture", now=NOW)
    elif path == "post_transfers":
        spec = ledger.TransferSpec(transfer_id, debit, credit, 100, "purchase_capture")
        ledger.post_transfers(session, [spec], now=NOW)
    else:  # the batch's way: the hot credit locked and written last (post_hot_credits)
        spec = ledger.TransferSpec(transfer_id, debit, credit, 100, "purchase_capture")
        hot = ledger.post_transfers(session, [spec], now=NOW, defer=frozenset({credit}))
        ledger.post_hot_credits(session, hot)


@pytest.mark.postgres
@pytest.mark.parametrize("path", ["post_transfer", "post_transfers", "post_hot_credits"])
def test_entry_ids_follow_commit_order_on_an_account_so_clearing_marks_miss_nothing(
    tmp_path: Path, path: str
) -> None:
    """Entries store no version (migration 0015): clearing's mark is the last entry id a
    batch took, which is right only if, on each account, ids ascend in commit order.

    A clearing run locks the merchant's payable and stays open; a purchase on another
    connection starts posting to the payable and is seen waiting on the lock (pg_locks,
    bounded polling); the clearing run then posts a transfer of its own, takes its marks
    and commits; the purchase goes on and commits. The purchase committed second, so its
    entry must have the larger id and the next batch after the marks must take it. (A
    posting path that drew its entry id before taking the account's lock would give the
    purchase the smaller id: hidden behind the mark, never cleared.)
    """
    card_1, card_2 = ledger.card_account("crd_1"), ledger.card_account("crd_2")
    receivable = ledger.topups_account("mer_1")
    end = NOW + dt.timedelta(days=1)
    with database_url("postgresql", tmp_path) as url:
        engine = make_engine(url, pool_size=3, max_overflow=0)
        migrate(engine)
        factory = make_session_factory(engine)
        try:
            with factory() as clearing_run, factory() as purchase, factory() as watcher:
                for card in (card_1, card_2):
                    ledger.post_transfer(
                        watcher, f"load:{card}", CASH, card, 1_000, "load", now=NOW
                    )
                watcher.commit()
                ledger.lock_accounts(clearing_run, [SHOP, receivable], NOW)
                purchase_pid = purchase.execute(text("SELECT pg_backend_pid()")).scalar_one()
                outcome: dict[str, object] = {}

                def post_purchase() -> None:
                    try:
                        _post_one(purchase, path, "late", card_2, SHOP)
                        purchase.commit()
                        outcome["ok"] = True
                    except Exception as exc:  # reported below
                        purchase.rollback()
                        outcome["error"] = exc

                thread = threading.Thread(target=post_purchase)
                thread.start()
                waiting = text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted")
                deadline = time.monotonic() + 10
                while watcher.execute(waiting, {"pid": purchase_pid}).scalar_one() == 0:
                    watcher.rollback()
                    assert thread.is_alive(), f"the purchase did not wait: {outcome}"
                    assert time.monotonic() < deadline, "the purchase never waited on the lock"
                    time.sleep(0.01)  # bounded polling for the lock wait, not synchronisation
                _post_one(clearing_run, path, "early", card_1, SHOP)
                items, marks = clearing.batch_items(clearing_run, "mer_1", (0, 0), end)
                assert [i.id for i in items] == ["early"]
                clearing_run.commit()
                thread.join(timeout=10)
                assert outcome == {"ok": True}

                history = ledger.history(watcher, SHOP)
                assert [line.transfer_id for line in history] == ["early", "late"]
                assert [line.balance_after for line in history] == [100, 200]
                later, _ = clearing.batch_items(watcher, "mer_1", marks, end)
                assert [i.id for i in later] == ["late"]
                # Ids drawn one at a time from the shared sequence, none cached per session
                # (a session's cached block would be handed out after later ids).
                cache = text(
                    "SELECT cache_size FROM pg_sequences WHERE schemaname = current_schema()"
                    " AND sequencename = 'ledger_entries_id_seq'"
                )
                assert watcher.execute(cache).scalar_one() == 1
                report = ledger.check(watcher)
                assert report.ok, report.problems
        finally:
            engine.dispose()


def test_the_ledger_check_s_refund_rule_names_the_ledger_s_account() -> None:
    """``refund_checks`` sits below ``ledger`` (no import cycle) and names its account."""
    from webpurse.settlement import refund_checks

    assert refund_checks.REFUNDS_PENDING == ledger.REFUNDS_PENDING


def test_a_hot_credit_posted_last_gives_the_history_posting_at_once_gives(
    session: Session,
) -> None:
    """``post_transfers(defer=…)`` + ``post_hot_credits``: the same balances, versions and
    per-account history as posting everything at once; a deferred account is never
    debited (its balance would be decided on without its lock)."""
    cards = [ledger.card_account(f"crd_{i}") for i in range(3)]
    for card in cards:
        ledger.post_transfer(session, f"load:{card}", CASH, card, 1_000, "load", now=NOW)
    specs = [
        ledger.TransferSpec(f"cap_{i}", card, SHOP, 100 + i, "purchase_capture")
        for i, card in enumerate(cards * 2)
    ]
    hot = ledger.post_transfers(session, specs, now=NOW, defer=frozenset({SHOP}))
    assert ledger.balance(session, SHOP) == 0  # nothing on the hot account yet
    ledger.post_hot_credits(session, hot)
    history = ledger.history(session, SHOP)
    assert [line.transfer_id for line in history] == [spec.id for spec in specs]
    assert [line.balance_after for line in history] == [100, 201, 303, 406, 510, 615]
    assert [line.version for line in history] == list(range(1, 7))
    assert ledger.balance(session, SHOP) == 615
    assert [ledger.balance(session, card) for card in cards] == [797, 795, 793]
    report = ledger.check(session)
    assert report.ok, report.problems
    with pytest.raises(ValueError, match="debited"):
        ledger.post_transfers(
            session,
            [ledger.TransferSpec("back", SHOP, cards[0], 1, "refund")],
            now=NOW,
            defer=frozenset({SHOP}),
        )
