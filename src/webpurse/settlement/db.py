"""Database plumbing: the declarative base, engines, sessions and Alembic migrations.

SQLite is the embedded default (WAL, foreign keys, a busy timeout so concurrent writers
wait instead of failing); PostgreSQL is production (a bounded pool: it allows about 100
connections). Schema changes go through Alembic only, tests included.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import select as select_module
from collections import deque
from collections.abc import Iterable
from importlib import resources
from typing import Any

import orjson
from sqlalchemy import (
    DateTime,
    Engine,
    Table,
    TextClause,
    any_,
    bindparam,
    cast,
    create_engine,
    event,
    insert,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.types import NullType, TypeDecorator

from webpurse.sqlite_file import private_sqlite_file

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


_IDS_DRAWN = 256
"""Row ids' random parts drawn from the OS at once (12 bytes each)."""


class _RandomIds:
    """24 hex digits of the OS's CSPRNG per id, as ``secrets.token_hex(12)`` gives, drawn
    256 at a time: one ``getrandom`` per 256 ids, not one per id (the merchant client's
    idempotency keys do the same, issue 20). Drawn again in a forked child, so two
    processes never hand out the same ids; a deque's ``popleft`` is atomic, so two threads
    never take the same one."""

    __slots__ = ("_drawn_in", "_ids")

    def __init__(self) -> None:
        self._ids: deque[str] = deque()
        self._drawn_in = _forks

    def __reduce__(self) -> tuple[type[_RandomIds], tuple[()]]:
        """A copy or a pickle is an empty pool that draws its own ids."""
        return (_RandomIds, ())

    def __call__(self) -> str:
        if self._drawn_in != _forks:  # a forked child: the parent's ids are the parent's
            self._ids, self._drawn_in = deque(), _forks
        try:
            return self._ids.popleft()
        except IndexError:
            drawn = os.urandom(12 * _IDS_DRAWN).hex()
            self._ids.extend(drawn[at : at + 24] for at in range(24, len(drawn), 24))
            return drawn[:24]


_forks = 0  # processes forked from this one so far, counted in the child


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)
random_hex24 = _RandomIds()


def new_row_id(prefix: str) -> str:
    """A new row's id: ``prefix``, an underscore and 24 random hex digits (96 bits)."""
    return f"{prefix}_{random_hex24()}"


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
        if not in_memory:
            private_sqlite_file(url)
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
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=30,
        # No pre-ping round trip on every checkout: _alive below (issue 20, a batch's
        # fixed cost).
        # A connection comes back idle after every commit: roll back only one that is not
        # (below), instead of a ROLLBACK round trip on every return to the pool.
        pool_reset_on_return=None,
        connect_args=connect_args or {},
        # JSON columns read with orjson (psycopg's loader used the stdlib json: the top
        # function under batched load once the statements were cached, issue 20).
        json_deserializer=orjson.loads,
    )

    @event.listens_for(engine, "checkout")
    def _alive(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        # An idle connection has nothing to read. One the server closed (a restart, a
        # terminated backend) has: its last words and the end of the stream. Only then is
        # it pinged, and a failed ping makes the pool drop it and connect afresh; a
        # pre-ping on every checkout cost a round trip per request.
        if dbapi_connection.closed:
            raise DisconnectionError("the pooled connection is closed")
        if _quiet(dbapi_connection):
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as error:
            raise DisconnectionError("the server closed the pooled connection") from error

    @event.listens_for(engine, "reset")
    def _reset_unless_idle(dbapi_connection: Any, _record: Any, reset_state: Any) -> None:
        from psycopg.pq import TransactionStatus

        if reset_state.terminate_only:
            return
        if dbapi_connection.info.transaction_status != TransactionStatus.IDLE:
            dbapi_connection.rollback()

    return engine


def _quiet(dbapi_connection: Any) -> bool:
    """Whether the server sent nothing on this idle psycopg connection (a poll, no I/O)."""
    # poll, not select: select refuses a descriptor past FD_SETSIZE (1024), which a busy
    # server's sockets reach, and every checkout would fail.
    poller = select_module.poll()
    poller.register(dbapi_connection.pgconn.socket, select_module.POLLIN)
    return not poller.poll(0)


SessionFactory = sessionmaker[Session]


def make_session_factory(engine: Engine) -> SessionFactory:
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


def for_update(engine_or_session: Engine | Session) -> bool:
    """Whether ``SELECT … FOR UPDATE`` means something (PostgreSQL) here."""
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else None
    name = (bind or engine_or_session).dialect.name  # type: ignore[union-attr]
    return bool(name == "postgresql")


def insert_ignoring_conflicts(session: Session, table: Table, rows: list[dict[str, object]]) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` on either supported database."""
    return insert_or_nothing(session, table).values(rows)


def insert_or_nothing(session: Session, table: Table) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING`` without values: execute it with a list of rows.

    Executed that way SQLAlchemy compiles it once and sends the rows as multi-row VALUES
    ("insertmanyvalues"), RETURNING included; a ``.values(rows)`` statement is compiled
    afresh for every batch size.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(table).on_conflict_do_nothing()
    raise NotImplementedError(dialect)  # pragma: no cover - only the two supported databases


# --- set-based writes ----------------------------------------------------------------


@functools.lru_cache(maxsize=256)
@functools.lru_cache(maxsize=256)
def _recordset(table: Table, columns: tuple[str, ...], dialect: Dialect) -> tuple[str, str]:
    """``json_to_recordset(:rows) AS rows(c type, …)`` for ``columns`` of ``table``.

    Cached: compiling the column types cost more than the rest of a batch's statement.
    """
    definitions = ", ".join(
        f'"{table.c[name].name}" {table.c[name].type.compile(dialect=dialect)}' for name in columns
    )
    names = ", ".join(f'"{table.c[name].name}"' for name in columns)
    return f"json_to_recordset(CAST(:rows AS json)) AS rows({definitions})", names


@functools.lru_cache(maxsize=256)
def _insert_statement(
    table: Table,
    columns: tuple[str, ...],
    dialect: Dialect,
    skip_conflicts: bool,
    returning: tuple[str, ...],
) -> TextClause:
    """:func:`bulk_insert`'s statement, built (and its bind parameters parsed) once."""
    source, names = _recordset(table, columns, dialect)
    # Names come from the Table's own columns (looked up in _recordset); values are bound.
    statement = f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM {source}'  # noqa: S608
    if skip_conflicts:
        statement += " ON CONFLICT DO NOTHING"
    if returning:
        statement += " RETURNING " + ", ".join(f'"{table.c[name].name}"' for name in returning)
    return text(statement)


@functools.lru_cache(maxsize=256)
def _update_statement(
    table: Table, columns: tuple[str, ...], key: str, dialect: Dialect
) -> TextClause:
    """:func:`bulk_update`'s statement, built (and its bind parameters parsed) once."""
    changed = [name for name in columns if name != key]
    source, _ = _recordset(table, columns, dialect)
    assignments = ", ".join(f'"{table.c[name].name}" = rows."{name}"' for name in changed)
    return text(  # names from the Table's own columns; values are bound
        f'UPDATE "{table.name}" SET {assignments} FROM {source} '  # noqa: S608
        f'WHERE "{table.name}"."{table.c[key].name}" = rows."{key}"'
    )


def among(where: Session | str, column: Any, values: Iterable[Any]) -> Any:
    """``column IN (values)``; on PostgreSQL ``column = ANY(:values)``, one bound array.

    An expanded ``IN`` list makes every batch a new statement, as long as the batch: psycopg
    parses its text again each time (``_split_query`` was the server's top function under
    batched load, issue 20) and PostgreSQL plans it again. With one array the text is the
    same whatever the count, so SQLAlchemy's compiled cache, psycopg's parse cache and
    PostgreSQL's prepared statements serve every batch. The plans are the same index scans.
    ``where``: the session, or the name of its dialect.
    """
    values = list(values)
    dialect = where if isinstance(where, str) else where.get_bind().dialect.name
    if dialect != "postgresql":
        return column.in_(values)
    literal = array_literal(values)
    if literal is not None:
        # The array as its text literal, cast by PostgreSQL: psycopg's list dumper costs
        # Python work per element (4.4 % of the server under batched load, issue 20).
        return column == any_(cast(_untyped(literal), postgresql.ARRAY(column.type)))
    return column == any_(bindparam(None, values, type_=postgresql.ARRAY(column.type)))


def dialect_name(session: Session) -> str:
    """The name of the session's dialect ("postgresql", "sqlite")."""
    return session.get_bind().dialect.name


def among_bound(dialect: str, column: Any, name: str) -> Any:
    """:func:`among` with the values bound later, as ``name`` (:func:`among_values`): a
    statement built once and run with each batch's values, instead of built per batch."""
    if dialect != "postgresql":
        return column.in_(bindparam(name, expanding=True))
    return column == any_(cast(_untyped(name=name), postgresql.ARRAY(column.type)))


def _untyped(value: str | None = None, *, name: str | None = None) -> Any:
    """A parameter sent without a type of its own (no ``::VARCHAR``), so PostgreSQL gives
    it the array type it is cast to and the plan holds the array as a constant: checked
    once, and hashed for a scan. A ``VARCHAR`` parameter cast to an array is converted
    again for every row a scan filters (a 5,000-row seq scan parsed the whole list 5,000
    times: 10 × the PostgreSQL CPU of a batch, issue 20)."""
    if name is not None:
        return bindparam(name, type_=NullType())
    return bindparam(None, value, type_=NullType())


def among_values(dialect: str, values: Iterable[str]) -> Any:
    """The value of an :func:`among_bound` parameter: strings (without NUL)."""
    values = list(values)
    if dialect != "postgresql":
        return values
    literal = array_literal(values)
    if literal is None:
        raise ValueError("among_values binds strings without NUL")
    return literal


def array_literal(values: list[Any]) -> str | None:
    """PostgreSQL's text form of a one-dimensional array of strings: each element in
    double quotes, its backslashes and double quotes escaped (nothing else is special
    inside quotes), so any string reads back as itself. None if a value is not a string
    or holds a NUL (which no PostgreSQL text can: the array bind refuses it as before)."""
    if not values:
        return "{}"
    if not set(map(type, values)) <= {str}:
        return None
    joined = "\x00".join(values)  # NUL: the one character no element may hold
    if joined.count("\x00") != len(values) - 1:
        return None
    escaped = joined.replace("\\", "\\\\").replace('"', '\\"')
    return '{"' + escaped.replace("\x00", '","') + '"}'


def _rows_json(rows: list[dict[str, object]]) -> str:
    """The rows as one JSON document (orjson: datetimes as RFC 3339, which PostgreSQL reads)."""
    return orjson.dumps(rows).decode()


def bulk_insert(
    session: Session,
    table: Table,
    rows: list[dict[str, object]],
    *,
    skip_conflicts: bool = False,
    returning: tuple[str, ...] = (),
) -> list[Any]:
    """Insert ``rows`` (dicts with the same columns) with one statement.

    PostgreSQL: ``INSERT … SELECT FROM json_to_recordset(:rows)`` — the rows travel as
    one JSON document (encoded natively by orjson, parsed in C by PostgreSQL), the statement
    runs one executor whatever the row count, and its text is always the same, so it is
    prepared once. (psycopg's per-row executemany costs PostgreSQL an executor start per
    row; arrays per column cost Python-level escaping per element.) Elsewhere: executemany.
    ``skip_conflicts`` adds ``ON CONFLICT DO NOTHING``; ``returning`` names columns to
    return for the rows actually inserted.
    """
    if not rows:
        return []
    if session.get_bind().dialect.name != "postgresql":
        stmt = insert_or_nothing(session, table) if skip_conflicts else insert(table)
        if returning:
            stmt = stmt.returning(*(table.c[name] for name in returning))
            return list(session.execute(stmt, rows))
        session.execute(stmt, rows)
        return []
    dialect = session.get_bind().dialect
    statement = _insert_statement(table, tuple(rows[0]), dialect, skip_conflicts, returning)
    result = session.execute(statement, {"rows": _rows_json(rows)})
    return list(result) if returning else []


def bulk_update(
    session: Session, table: Table, rows: list[dict[str, object]], key: str = "id"
) -> None:
    """Update many rows by ``key`` (each dict: the key and the same other columns).

    PostgreSQL: one ``UPDATE … FROM json_to_recordset(…)`` (see :func:`bulk_insert`);
    elsewhere an executemany. The caller holds the rows' locks already (it read them FOR
    UPDATE), so the order rows are updated in cannot deadlock.
    """
    if not rows:
        return
    columns = tuple(rows[0])
    changed = [name for name in columns if name != key]
    if session.get_bind().dialect.name != "postgresql":
        session.execute(
            update(table)
            .where(table.c[key] == bindparam(f"_{key}"))
            .values({name: bindparam(f"_{name}") for name in changed}),
            [{f"_{name}": value for name, value in row.items()} for row in rows],
        )
        return
    statement = _update_statement(table, columns, key, session.get_bind().dialect)
    session.execute(statement, {"rows": _rows_json(rows)})


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
