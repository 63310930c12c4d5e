"""The Alembic migrations are the schema: they match the models and run down and up again."""

from __future__ import annotations

import importlib

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

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
