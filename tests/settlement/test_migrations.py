"""The Alembic migrations are the schema: they match the models and run down and up again."""

from __future__ import annotations

import datetime as dt
import importlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from webpurse.settlement import merchants
from webpurse.settlement.db import Base, make_engine, migrate

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
