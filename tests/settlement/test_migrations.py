"""The Alembic migrations are the schema: they match the models and run down and up again."""

from __future__ import annotations

import datetime as dt
import importlib
import json
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from webpurse.settlement import clearing, idempotency, ledger, merchants, views
from webpurse.settlement.db import Base, UtcDateTime, bulk_insert, make_engine, migrate
from webpurse.settlement.models import (
    Account,
    Card,
    CardEvent,
    IdempotencyRecord,
    Merchant,
    Payment,
    PaymentHold,
    Transfer,
)
from webpurse.settlement.webhooks import WebhookEvent, event_body

# Every module that declares tables on Base.
for name in ("models", "webhooks", "clearing"):
    importlib.import_module(f"webpurse.settlement.{name}")


def test_the_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    try:
        migrate(engine)
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_migrations_run_down_to_nothing_and_up_again(db_url: str) -> None:
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    try:
        migrate(engine)
        migrate(engine, "base", downgrade=True)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate(engine)
        assert {"payments", "ledger_entries", "cards"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# PostgreSQL only: SQLite keeps the merchant row's counter (it has no SEQUENCE).
@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_the_terminal_sequence_continues_past_every_number_a_merchant_row_issued(
    db_url: str,
) -> None:
    """Migration 0012 moves the counters into a SEQUENCE (PostgreSQL) and back on downgrade:
    no terminal is ever given a number it has issued before."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    try:
        migrate(engine, "0011_i20_lean_indexes")
        with engine.begin() as connection:
            for merchant_id, terminal_id, issued in (("mer_a", "AA", 41), ("mer_b", "BB", 7)):
                connection.execute(
                    text(
                        "INSERT INTO merchants (id, name, terminal_id, terminal_seq, created_at)"
                        " VALUES (:id, 'shop', :terminal, :issued, :now)"
                    ),
                    {"id": merchant_id, "terminal": terminal_id * 6, "issued": issued, "now": now},
                )
        migrate(engine)
        with Session(engine) as session, session.begin():
            assert merchants.terminal_seqs(session, "mer_b", 3) == [42, 43, 44]
            assert merchants.next_terminal_seq(session, "mer_a") == 45
        migrate(engine, "0011_i20_lean_indexes", downgrade=True)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT terminal_seq FROM merchants")).scalars()
            assert set(rows) == {45}
        migrate(engine)
        with Session(engine) as session, session.begin():
            assert merchants.next_terminal_seq(session, "mer_b") == 46
    finally:
        engine.dispose()


def test_the_purchase_card_events_move_into_their_payments_and_back(db_url: str) -> None:
    """Migration 0013b: a purchase card event becomes its payment's ``succeeded_at`` (the
    operator's card history shows the payment instead); downgrading writes it back, and
    renders each answer and event body the payment row stood in for."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    now = dt.datetime(2026, 12, 6, 9, 0, 0, 123456, tzinfo=dt.UTC)
    captured = now + dt.timedelta(seconds=7, microseconds=5)
    detail = {"payment": "pay_1", "amount": 250, "counter": 3, "tac": "11223344"}
    times = (
        "created_at",
        "updated_at",
        "authorised_at",
        "start_date",
        "expiry_date",
    )
    tables = {
        "merchants": ("id", "name", "terminal_id", "terminal_seq", "created_at"),
        "cards": (
            "id",
            "card_number",
            "status",
            "issuer_id",
            "key_version",
            "start_date",
            "expiry_date",
            "max_balance",
            "shadow_balance",
            "online_counter",
            "offline_counter",
            "flagged",
            "created_at",
            "updated_at",
        ),
        "payments": (
            "id",
            "merchant_id",
            "status",
            "amount",
            "currency",
            "description",
            "merchant_reference",
            "metadata",
            "terminal_id",
            "key_index",
            "card_id",
            "card_number",
            "counter",
            "terminal_seq",
            "txn_date",
            "txn_time",
            "mac1",
            "mac2",
            "tac",
            "refunded_amount",
            "authorised_at",
            "created_at",
            "updated_at",
        ),
        "card_events": ("card_id", "kind", "detail", "created_at"),
    }

    def table(name: str) -> Any:
        columns = []
        for column in tables[name]:
            if column in ("start_date", "expiry_date"):
                columns.append(sa.column(column, sa.Date()))
            elif column in times:
                columns.append(sa.column(column, UtcDateTime()))
            elif column in ("metadata", "detail"):
                columns.append(sa.column(column, sa.JSON()))
            else:
                columns.append(sa.column(column))
        return sa.table(name, *columns)

    try:
        migrate(engine, "0012_i20_terminal_seq_sequence")
        with engine.begin() as connection:
            connection.execute(
                sa.insert(table("merchants")),
                {"id": "mer_1", "name": "shop", "terminal_id": "AA" * 6, "terminal_seq": 1}
                | {"created_at": now},
            )
            connection.execute(
                sa.insert(table("cards")),
                {
                    "id": "crd_1",
                    "card_number": "1234567890123456",
                    "status": "active",
                    "issuer_id": "1",
                    "key_version": 1,
                    "start_date": now.date(),
                    "expiry_date": now.date(),
                    "max_balance": 10_000,
                    "shadow_balance": 750,
                    "online_counter": 1,
                    "offline_counter": 4,
                    "flagged": False,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            connection.execute(
                sa.insert(table("payments")),
                {
                    "id": "pay_1",
                    "merchant_id": "mer_1",
                    "status": "succeeded",
                    "amount": 250,
                    "currency": "CNY",
                    "description": "",
                    "merchant_reference": "",
                    "metadata": {"b": "2", "a": "1"},
                    "terminal_id": "AA" * 6,
                    "key_index": 1,
                    "card_id": "crd_1",
                    "card_number": "1234567890123456",
                    "counter": 3,
                    "terminal_seq": 1,
                    "txn_date": "20261206",
                    "txn_time": "090000",
                    "mac1": "A1B2C3D4",
                    "mac2": "D4C3B2A1",
                    "tac": "11223344",
                    "refunded_amount": 50,  # refunded after the capture
                    "authorised_at": now,
                    "created_at": now,
                    "updated_at": captured + dt.timedelta(hours=1),
                },
            )
            events = table("card_events")
            connection.execute(
                sa.insert(events),
                [
                    {"card_id": "crd_1", "kind": "issued", "detail": {}, "created_at": now},
                    {"card_id": "crd_1", "kind": "purchase", "detail": detail}
                    | {"created_at": captured},
                ],
            )
        migrate(engine)
        with Session(engine) as session, session.begin():
            payment = session.get(Payment, "pay_1")
            assert payment is not None and payment.succeeded_at == captured
            kinds = session.scalars(select(CardEvent.kind).order_by(CardEvent.id)).all()
            assert kinds == ["issued"]
            answer = views.payment_as_of(payment, "capture")
            assert (answer["status"], answer["amount_refunded"]) == ("succeeded", 0)
            assert answer["updated_at"] == captured.isoformat()
            session.add(
                IdempotencyRecord(
                    principal="mer_1",
                    key="capture-1",
                    fingerprint="f" * 64,
                    state="done",
                    response_status=200,
                    object_id="pay_1",
                    step="capture",
                    created_at=captured,
                )
            )
            session.add(
                WebhookEvent(
                    id="evt_1",
                    merchant_id="mer_1",
                    type="payment.succeeded",
                    created_at=captured,
                    object_id="pay_1",
                )
            )
        migrate(engine, "0012_i20_terminal_seq_sequence", downgrade=True)
        with engine.connect() as connection:
            rows = connection.execute(
                sa.select(events.c.kind, events.c.detail, events.c.created_at).order_by(
                    sa.text("id")
                )
            ).all()
            assert [(r.kind, r.detail, r.created_at) for r in rows] == [
                ("issued", {}, now),
                ("purchase", detail, captured),
            ]
            stored = connection.execute(
                text("SELECT response_body FROM idempotency_keys WHERE key = 'capture-1'")
            ).scalar_one()
            assert json.loads(stored) == answer
            body = connection.execute(
                text("SELECT body FROM webhook_events WHERE id = 'evt_1'")
            ).scalar_one()
            assert body.encode() == event_body("evt_1", "payment.succeeded", captured, answer)
        migrate(engine)
    finally:
        engine.dispose()


def _old_post(
    session: Session,
    transfer_id: str,
    debit: str,
    credit: str,
    amount: int,
    kind: str,
    now: dt.datetime,
    reference: str | None = None,
) -> None:
    """A transfer as the ledger wrote it before 0015: each entry with the balance after it
    and the account's version."""
    for account_id in (debit, credit):
        ledger.ensure_account(session, account_id, now)
    accounts = {
        row.id: (int(row.balance), int(row.version))
        for row in session.execute(
            text("SELECT id, balance, version FROM ledger_accounts WHERE id IN (:d, :c)"),
            {"d": debit, "c": credit},
        )
    }
    session.execute(
        text(
            "INSERT INTO ledger_transfers (id, debit_account, credit_account, amount, currency,"
            " kind, reference, created_at) VALUES (:id, :d, :c, :a, 'CNY', :k, :r, :t)"
        ),
        {
            "id": transfer_id,
            "d": debit,
            "c": credit,
            "a": amount,
            "k": kind,
            "r": reference,
            "t": now,
        },
    )
    for account_id, signed in ((debit, -amount), (credit, amount)):
        balance, version = accounts[account_id]
        session.execute(
            text("UPDATE ledger_accounts SET balance = :b, version = :v WHERE id = :id"),
            {"b": balance + signed, "v": version + 1, "id": account_id},
        )
        session.execute(
            text(
                "INSERT INTO ledger_entries (transfer_id, account_id, amount, balance_after,"
                " account_version) VALUES (:t, :a, :s, :b, :v)"
            ),
            {
                "t": transfer_id,
                "a": account_id,
                "s": signed,
                "b": balance + signed,
                "v": version + 1,
            },
        )


def _old_purchase(
    session: Session,
    pid: str,
    status: str,
    amount: int,
    now: dt.datetime,
    *,
    ledger_too: bool = True,
) -> None:
    """A payment as the two-transfer code left it: held at authorise, then captured or
    released (or neither: still open)."""
    # The old schema's columns (the Payment model has newer ones: awaiting_card, 0018).
    old = sa.table(
        "payments",
        *(sa.column(name) for name in ("id", "merchant_id", "status", "amount", "currency")),
        *(sa.column(name) for name in ("description", "merchant_reference", "metadata")),
        *(sa.column(name) for name in ("terminal_id", "key_index", "card_id", "card_number")),
        sa.column("refunded_amount"),
        sa.column("created_at", UtcDateTime()),
        sa.column("updated_at", UtcDateTime()),
    )
    session.execute(
        old.insert().values(
            id=pid,
            merchant_id="mer_a",
            status=status,
            amount=amount,
            currency="CNY",
            description="",
            merchant_reference="",
            metadata="{}",
            terminal_id="AA" * 6,
            key_index=1,
            card_id="crd_a",
            card_number="1" * 20,
            refunded_amount=0,
            created_at=now,
            updated_at=now,
        )
    )
    if not ledger_too:
        return
    card, held = ledger.card_account("crd_a"), ledger.HELD_PURCHASES
    _old_post(session, f"{pid}:hold", card, held, amount, "purchase_hold", now, pid)
    if status == "succeeded":
        mer = ledger.merchant_account("mer_a")
        _old_post(session, f"{pid}:capture", held, mer, amount, "purchase_capture", now, pid)
    elif status == "canceled":
        _old_post(session, f"{pid}:release", held, card, amount, "purchase_release", now, pid)


def test_open_holds_move_from_the_held_account_to_the_payments_status(db_url: str) -> None:
    """Migration 0014 restates each open payment's hold onto its card (held:purchases → card):
    the stored held account is 0, every derived balance reads as before, the ledger checks
    out; downgrading posts the holds back where the two-transfer code expects them."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    card, held = ledger.card_account("crd_a"), ledger.HELD_PURCHASES
    try:
        migrate(engine, "0013b_i20_slim_outbox")
        with Session(engine) as session, session.begin():
            session.add(Merchant(id="mer_a", name="shop", terminal_id="AA" * 6, created_at=now))
            session.add(
                Card(
                    id="crd_a",
                    card_number="1" * 20,
                    status="active",
                    issuer_id="1",
                    key_version=1,
                    start_date=now.date(),
                    expiry_date=now.date() + dt.timedelta(days=3650),
                    max_balance=1_000_000,
                    shadow_balance=1_000,
                    online_counter=1,
                    offline_counter=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
            _old_post(session, "load_a", "funding:cash", card, 1_000, "test", now)
            for pid, status, amount in (
                ("pay_captured", "succeeded", 100),
                ("pay_released", "canceled", 200),
                ("pay_authorised", "authorised", 300),
                ("pay_uncertain", "uncertain", 50),
            ):
                _old_purchase(session, pid, status, amount, now)
        with Session(engine) as session:
            before = {a.id: a.balance for a in session.scalars(select(Account))}
        assert (before[held], before[card]) == (350, 550)

        migrate(engine)
        with Session(engine) as session:
            stored = {a.id: a.balance for a in session.scalars(select(Account))}
            assert (stored[held], stored[card]) == (0, 900)
            assert ledger.balance(session, held) == 350
            assert ledger.balance(session, card) == 550
            assert ledger.available(session, ["crd_a"])["crd_a"].amount == 550
            restated = session.scalars(
                select(Transfer).where(Transfer.kind == "purchase_hold_restated")
            ).all()
            assert sorted((t.id, t.amount, t.credit_account) for t in restated) == [
                ("pay_authorised:hold_restated", 300, card),
                ("pay_uncertain:hold_restated", 50, card),
            ]
            report = ledger.check(session)
            assert report.ok, report.problems
            assert (report.totals["held"], report.totals["card"]) == (350, 550)

        migrate(engine, "0013b_i20_slim_outbox", downgrade=True)
        with Session(engine) as session:
            stored = {a.id: a.balance for a in session.scalars(select(Account))}
            assert (stored[held], stored[card]) == (350, 550)
        migrate(engine)
        with Session(engine) as session:
            stored = {a.id: a.balance for a in session.scalars(select(Account))}
            assert (stored[held], stored[card]) == (0, 900)
            assert ledger.check(session).ok
    finally:
        engine.dispose()


def test_open_holds_get_their_rows_and_waiting_payments_their_flag(db_url: str) -> None:
    """Migration 0018: each open (authorised, uncertain) payment gets its payment_holds row
    (card, amount, authorised_at), each requires_card one its awaiting_card flag, and
    ``available`` reads the rows; downgrading drops both, and up again makes them again."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    try:
        migrate(engine, "0017_i20_hot_payments")
        with Session(engine) as session, session.begin():
            session.add(Merchant(id="mer_a", name="shop", terminal_id="AA" * 6, created_at=now))
            session.add(
                Card(
                    id="crd_a",
                    card_number="1" * 20,
                    status="active",
                    issuer_id="1",
                    key_version=1,
                    start_date=now.date(),
                    expiry_date=now.date() + dt.timedelta(days=3650),
                    max_balance=1_000_000,
                    shadow_balance=1_000,
                    online_counter=1,
                    offline_counter=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
            for pid, status, amount in (
                ("pay_waiting", "requires_card", 10),
                ("pay_captured", "succeeded", 100),
                ("pay_authorised", "authorised", 300),
                ("pay_uncertain", "uncertain", 50),
            ):
                _old_purchase(session, pid, status, amount, now, ledger_too=False)
            session.execute(
                text("UPDATE payments SET authorised_at = :t WHERE status <> 'requires_card'"),
                {"t": now},
            )

        def rows() -> tuple[list[tuple[str, str, int]], list[str]]:
            with Session(engine) as session:
                holds = session.execute(
                    select(
                        PaymentHold.payment_id, PaymentHold.card_id, PaymentHold.amount
                    ).order_by(PaymentHold.payment_id)
                ).all()
                waiting = session.scalars(
                    select(Payment.id).where(Payment.awaiting_card.is_(True))
                ).all()
                assert ledger.available(session, ["crd_a"])["crd_a"].amount == -350
            return [tuple(h) for h in holds], list(waiting)

        expected = (
            [("pay_authorised", "crd_a", 300), ("pay_uncertain", "crd_a", 50)],
            ["pay_waiting"],
        )
        migrate(engine)
        assert rows() == expected
        migrate(engine, "0017_i20_hot_payments", downgrade=True)
        with engine.connect() as connection:
            schema = inspect(connection)
            assert "payment_holds" not in schema.get_table_names()
            assert "awaiting_card" not in {c["name"] for c in schema.get_columns("payments")}
            assert "ix_payments_open_authorised" in {
                i["name"] for i in schema.get_indexes("payments")
            }
        migrate(engine)
        assert rows() == expected
    finally:
        engine.dispose()


_OLD_KEYS = sa.table(
    "idempotency_keys",
    *(sa.column(name) for name in ("principal", "key", "fingerprint", "state")),
    *(sa.column(name) for name in ("response_status", "response_body", "object_id", "step")),
    sa.column("created_at", UtcDateTime()),
)


def test_key_rows_move_into_the_lean_table_and_back(db_url: str) -> None:
    """Migration 0016: every key row keeps its key, principal, fingerprint, state and answer
    (an ``in_flight`` row an older version left stays one); the digest is 32 bytes and the
    primary key is (key, principal); a row the batch writes (``db.bulk_insert``: the digest
    as bytea text, the state by default) reads back the same; downgrading restores the old
    rows with ids in time order."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    t0 = dt.datetime(2026, 12, 6, 9, 0, 0, 123456, tzinfo=dt.UTC)
    digest = [format(i, "x") * 64 for i in range(10, 15)]  # "aaaa…", "bbbb…", …
    rows = [
        ("mer_a", "k-body", digest[0], "done", 402, '{"code": "declined"}', None, None, 2),
        ("mer_a", "k-ref", digest[1], "done", 201, None, "pay_1", "create", 1),
        ("mer_b", "k-ref", digest[2], "done", 200, None, "pay_2", "capture", 3),
        ("mer_a", "k-flight", digest[3], "in_flight", None, None, None, None, 0),
    ]
    old = [(*row[:-1], t0 + dt.timedelta(seconds=row[-1])) for row in rows]
    columns = ("principal", "key", "fingerprint", "state", "response_status")
    columns += ("response_body", "object_id", "step", "created_at")
    try:
        migrate(engine, "0014_i20_one_transfer_purchase")
        with engine.begin() as connection:
            connection.execute(sa.insert(_OLD_KEYS), [dict(zip(columns, row)) for row in old])
        migrate(engine, "0016_i20_key_storage")
        assert inspect(engine).get_pk_constraint("idempotency_keys")["constrained_columns"] == [
            "key",
            "principal",
        ]
        assert "id" not in {c["name"] for c in inspect(engine).get_columns("idempotency_keys")}
        with Session(engine) as session, session.begin():
            lengths = session.scalars(text("SELECT length(fingerprint) FROM idempotency_keys"))
            assert set(lengths) == {32}
            bulk_insert(
                session,
                IdempotencyRecord.__table__,  # type: ignore[arg-type]
                [
                    {
                        "principal": "mer_b",
                        "key": "k-new",
                        "fingerprint": idempotency.stored_fingerprint(digest[4]),
                        "response_status": 201,
                        "response_body": None,
                        "object_id": "pay_3",
                        "step": "create",
                        "created_at": t0 + dt.timedelta(seconds=4),
                    }
                ],
                skip_conflicts=True,
            )
        written = ("mer_b", "k-new", digest[4], "done", 201, None, "pay_3", "create")
        new = [*old, (*written, t0 + dt.timedelta(seconds=4))]

        def lean() -> set[tuple[Any, ...]]:
            with Session(engine) as session:
                records = session.scalars(select(IdempotencyRecord)).all()
                return {tuple(getattr(r, name) for name in columns) for r in records}

        assert lean() == set(new)
        with Session(engine) as session:
            found = session.execute(idempotency.lookup("mer_a", ["k-ref", "k-new"], "sqlite"))
            assert [(r.key, r.object_id, r.state) for r in found] == [("k-ref", "pay_1", "done")]

        migrate(engine, "0014_i20_one_transfer_purchase", downgrade=True)
        with engine.connect() as connection:
            back = connection.execute(
                sa.select(sa.column("id"), *_OLD_KEYS.c).select_from(_OLD_KEYS).order_by("id")
            ).all()
        assert [tuple(row)[1:] for row in back] == sorted(new, key=lambda row: row[-1])
        assert [row[0] for row in back] == sorted(row[0] for row in back)
        assert len({row[0] for row in back}) == len(new)

        migrate(engine, "0016_i20_key_storage")
        assert lean() == set(new)
    finally:
        engine.dispose()


BEFORE_0015 = "0016_i20_key_storage"  # 0015 follows the key storage (both from 0014)


def _old_batch(
    session: Session, merchant: str, day: str, marks: tuple[int | None, int | None]
) -> None:
    """A clearing batch as written before 0015: its marks are entry versions."""
    session.execute(
        text(
            "INSERT INTO clearing_batches (id, merchant_id, day, timezone, window_start,"
            " window_end, currency, payment_count, payment_total, refund_count, refund_total,"
            " topup_count, topup_total, topups_settled, carried_in, payout, carried_out,"
            " transfer_id, payable_version, topups_version, report_csv, created_at) VALUES"
            " (:id, :m, :day, 'Asia/Shanghai', :t, :t, 'CNY', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,"
            " NULL, :p, :u, '', :t)"
        ),
        {
            "id": f"clr_{merchant}_{day}",
            "m": merchant,
            "day": dt.date.fromisoformat(day),
            "t": dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
            "p": marks[0],
            "u": marks[1],
        },
    )


def _stored_entries(engine: sa.Engine) -> list[tuple[int, str, int, int, int]]:
    with engine.connect() as connection:
        return [
            tuple(row)  # type: ignore[misc]
            for row in connection.execute(
                text(
                    "SELECT id, account_id, amount, account_version, balance_after"
                    " FROM ledger_entries ORDER BY id"
                )
            )
        ]


def _marks(engine: sa.Engine, names: tuple[str, str]) -> dict[str, tuple[Any, Any]]:
    with engine.connect() as connection:
        return {
            row[0]: (row[1], row[2])
            for row in connection.execute(
                text(f"SELECT id, {names[0]}, {names[1]} FROM clearing_batches ORDER BY id")
            )
        }


def test_entry_balances_and_versions_become_derived_and_clearing_marks_entry_ids(
    db_url: str,
) -> None:
    """Migration 0015 drops each entry's stored balance after and version: they derive from
    the entry ids (the history reads as stored), clearing's version marks become the ids of
    the entries at those versions (the next batch takes exactly what it took before), and
    the ledger checks out; downgrading recomputes every version, balance and mark as they
    were, and the unique (account, version) constraint is back."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    card, payable, topups = "card:crd_a", "merchant:mer_a", "topups:mer_a"
    try:
        migrate(engine, BEFORE_0015)
        with Session(engine) as session, session.begin():
            for mid, terminal in (("mer_a", "AA"), ("mer_b", "BB")):
                session.add(Merchant(id=mid, name="shop", terminal_id=terminal * 6, created_at=now))
            session.flush()
            _old_post(session, "t1", "funding:cash", card, 1_000, "test", now)
            _old_post(session, "t2", card, payable, 100, "purchase_capture", now, "p2")
            _old_post(session, "t3", card, payable, 200, "purchase_capture", now, "p3")
            _old_post(session, "t4", topups, card, 50, "topup", now, "l4")
            _old_post(session, "t5", card, "held:loads", 10, "test", now)
            # What the first batch took: payable v2 (entry 6), receivable v1 (entry 7).
            _old_batch(session, "mer_a", "2026-12-01", (2, 1))
            _old_post(session, "t6", card, payable, 300, "purchase_capture", now, "p6")
            _old_post(session, "t7", payable, card, 40, "refund", now, "r7")
            _old_batch(session, "mer_b", "2026-11-30", (None, None))  # before 0009
            _old_batch(session, "mer_b", "2026-12-01", (0, 0))
        stored = _stored_entries(engine)
        old_marks = _marks(engine, ("payable_version", "topups_version"))

        migrate(engine)
        columns = {c["name"] for c in inspect(engine).get_columns("ledger_entries")}
        assert columns == {"id", "transfer_id", "account_id", "amount"}
        assert _marks(engine, ("payable_entry", "topups_entry")) == {
            "clr_mer_a_2026-12-01": (6, 7),
            "clr_mer_b_2026-11-30": (None, None),
            "clr_mer_b_2026-12-01": (0, 0),
        }
        with Session(engine) as session:
            report = ledger.check(session)
            assert report.ok, report.problems
            for account_id in (card, payable, topups):
                derived = [
                    (line.entry_id, line.version, line.balance_after)
                    for line in ledger.history(session, account_id)
                ]
                assert derived == [(i, v, b) for i, a, _, v, b in stored if a == account_id]
            items, marks = clearing.batch_items(
                session, "mer_a", (6, 7), now + dt.timedelta(days=1)
            )
            assert sorted((i.kind.value, i.id, i.amount) for i in items) == [
                ("payment", "p6", 300),
                ("refund", "r7", 40),
            ]
            assert marks == (13, 7)

        migrate(engine, BEFORE_0015, downgrade=True)
        assert _stored_entries(engine) == stored
        assert _marks(engine, ("payable_version", "topups_version")) == old_marks
        uniques = inspect(engine).get_unique_constraints("ledger_entries")
        assert [sorted(u["column_names"]) for u in uniques] == [["account_id", "account_version"]]
        migrate(engine)
        with Session(engine) as session:
            assert ledger.check(session).ok
    finally:
        engine.dispose()


def test_entries_whose_ids_do_not_follow_their_versions_refuse_the_upgrade(db_url: str) -> None:
    """0015 turns versions into id order: a ledger where the two disagree on some account
    (never written by settlement: entries are inserted under the account's lock) is refused
    with the account named, and nothing changes."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    try:
        migrate(engine, BEFORE_0015)
        with Session(engine) as session, session.begin():
            _old_post(session, "t1", "funding:cash", "card:crd_a", 100, "test", now)
            _old_post(session, "t2", "funding:cash", "card:crd_a", 100, "test", now)
            for swap in ("account_version + 10", "13 - account_version"):  # 1, 2 → 2, 1
                session.execute(
                    text(
                        f"UPDATE ledger_entries SET account_version = {swap}"
                        " WHERE account_id = 'card:crd_a'"
                    )
                )
        stored = _stored_entries(engine)
        with pytest.raises(RuntimeError, match="card:crd_a: entry ids do not follow"):
            migrate(engine)
        assert _stored_entries(engine) == stored
        with engine.connect() as connection:
            revision = connection.execute(text("SELECT version_num FROM alembic_version"))
            assert revision.scalar_one() == BEFORE_0015
    finally:
        engine.dispose()


# What 0019 drops: (table, column, referred table).
HOT_FOREIGN_KEYS = {
    ("ledger_entries", "transfer_id", "ledger_transfers"),
    ("payments", "merchant_id", "merchants"),
    ("payments", "card_id", "cards"),
    ("webhook_events", "merchant_id", "merchants"),
}


def _foreign_keys(engine: sa.Engine) -> set[tuple[str, str, str]]:
    found = inspect(engine)
    return {
        (table, column, fk["referred_table"])
        for table in ("ledger_entries", "payments", "webhook_events")
        for fk in found.get_foreign_keys(table)
        for column in fk["constrained_columns"]
    }


def test_the_hot_foreign_keys_go_and_come_back_and_the_rows_stay(db_url: str) -> None:
    """0019 drops the referential checks of a purchase's hot writes and nothing else; its
    downgrade puts them back over the rows written meanwhile (they name existing rows)."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    try:
        migrate(engine, "0018_i20_payment_holds")
        assert _foreign_keys(engine) >= HOT_FOREIGN_KEYS
        migrate(engine)
        assert _foreign_keys(engine) & HOT_FOREIGN_KEYS == set()
        with Session(engine) as session:
            now = dt.datetime(2026, 12, 6, 17, tzinfo=dt.UTC)
            session.add(Merchant(id="mer_1", name="shop", terminal_id="AA" * 6, created_at=now))
            session.add(
                Card(
                    id="crd_1",
                    card_number="1" * 20,
                    status="active",
                    issuer_id="1",
                    key_version=1,
                    start_date=now.date(),
                    expiry_date=now.date() + dt.timedelta(days=3650),
                    max_balance=1_000_000,
                    shadow_balance=0,
                    online_counter=1,
                    offline_counter=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
            session.add(
                Payment(
                    id="pay_1",
                    merchant_id="mer_1",
                    status="canceled",
                    amount=100,
                    currency="CNY",
                    terminal_id="AA" * 6,
                    card_id="crd_1",
                    created_at=now,
                    updated_at=now,
                )
            )
            ledger.post_transfer(
                session,
                "t1",
                ledger.funding_account("cash"),
                ledger.card_account("crd_1"),
                100,
                "load",
                now=now,
            )
            session.commit()
        migrate(engine, "0018_i20_payment_holds", downgrade=True)
        assert _foreign_keys(engine) >= HOT_FOREIGN_KEYS
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT count(*) FROM ledger_entries")) == 2
            assert connection.scalar(text("SELECT card_id FROM payments")) == "crd_1"
        migrate(engine)
        assert _foreign_keys(engine) & HOT_FOREIGN_KEYS == set()
    finally:
        engine.dispose()
