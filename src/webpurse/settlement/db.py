"""Database plumbing: the declarative base, engines, sessions and Alembic migrations.

SQLite is the embedded default (WAL, foreign keys, a busy timeout so concurrent writers
wait instead of failing); PostgreSQL is production (a bounded pool: it allows about 100
connections). Schema changes go through Alembic only, tests included.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from importlib import resources
from typing import Any

from fastapi import Request
from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.types import TypeDecorator

SQLITE_BUSY_TIMEOUT_MS = 30_000


class UtcDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use UTC-aware datetimes")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    """The one declarative base of the settlement schema (webhooks and clearing too)."""


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 10,
    connect_args: dict[str, Any] | None = None,
) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        in_memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            # A file: a connection per use (WAL lets readers run beside the writer). In memory:
            # one shared connection, or every connection would see its own empty database.
            poolclass=StaticPool if in_memory else NullPool,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Take the write lock at BEGIN so read-then-write transactions serialise
            # instead of failing with "database is locked" on upgrade.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=30,
        pool_pre_ping=True,
        connect_args=connect_args or {},
    )


SessionFactory = sessionmaker[Session]


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


def for_update(engine_or_session: Engine | Session) -> bool:
    """Whether ``SELECT … FOR UPDATE`` means something (PostgreSQL) here."""
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else None
    name = (bind or engine_or_session).dialect.name  # type: ignore[union-attr]
    return bool(name == "postgresql")


# --- migrations ---------------------------------------------------------------------


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    location = resources.files("webpurse.settlement") / "migrations"
    config = Config()
    config.set_main_option("script_location", str(location))
    config.attributes["engine"] = engine
    return config


def migrate(engine: Engine, revision: str = "head", *, downgrade: bool = False) -> None:
    """Bring the schema up (or down) to ``revision`` with Alembic (the only way tables are made)."""
    from alembic import command

    if downgrade:
        command.downgrade(alembic_config(engine), revision)
    else:
        command.upgrade(alembic_config(engine), revision)


# --- FastAPI dependencies ----------------------------------------------------------


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request: committed when the route returns, rolled back on error."""
    factory: SessionFactory = request.app.state.settlement.session_factory
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
