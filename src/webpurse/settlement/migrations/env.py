"""Alembic environment: runs against the engine handed over in ``config.attributes``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, Engine, create_engine

import webpurse.settlement.models  # noqa: F401  (registers the tables on Base.metadata)
from webpurse.settlement import clearing, webhooks  # noqa: F401  (their tables too)
from webpurse.settlement.db import Base, normalise_url

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine: Engine | None = config.attributes.get("engine")
    if engine is None:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("no engine and no sqlalchemy.url for the migrations")
        engine = create_engine(normalise_url(url))
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            _foreign_keys(connection, on=False)
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=sqlite,
                # SQLite's DDL is transactional, but Alembic's SQLite dialect says it is not
                # and commits after each revision: the dangling-key check below could then
                # refuse a run whose revisions were already committed (a downgrade below
                # 0019 over a payment naming no card stayed at 0018, its foreign keys
                # violated). One transaction for the whole run, as on PostgreSQL.
                transactional_ddl=True,
            )
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    _no_dangling_keys(connection)
            connection.commit()
        finally:
            if sqlite:
                connection.rollback()
                _foreign_keys(connection, on=True)


def _foreign_keys(connection: Connection, *, on: bool) -> None:
    """SQLite's batch mode rebuilds a table (copy, DROP, rename); with foreign keys on, the
    DROP fails while rows of another table name it (webhook_messages an event, refunds a
    payment). So they are off while migrating, as SQLite's own procedure for schema
    changes says; the pragma is a no-op inside a transaction, hence on the driver's
    connection between transactions (it runs in autocommit, ``db.make_engine``)."""
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")


def _no_dangling_keys(connection: Connection) -> None:
    """Refuse (roll back) a migration that left a row naming one that is not there."""
    dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if dangling:
        raise RuntimeError(f"the migration left rows with dangling foreign keys: {dangling[:5]}")


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; run `webpurse settlement init`")
run_migrations_online()
