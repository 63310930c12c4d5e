"""Pooled PostgreSQL connections: no ping on a healthy checkout, a fresh connection for one
the server closed (the check that replaced ``pool_pre_ping``, db.make_engine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.settlement.support import database_url
from webpurse.settlement.db import make_engine

pytestmark = pytest.mark.postgres


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    with database_url("postgresql", tmp_path) as url:
        made = make_engine(url, pool_size=1, max_overflow=0)
        try:
            yield made
        finally:
            made.dispose()


@pytest.fixture
def pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the dialect's pings (each one a round trip)."""
    calls: list[int] = []
    real = engine.dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        calls.append(1)
        return real(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    return calls


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_healthy_pooled_connection_is_used_without_a_ping(
    engine: Engine, pings: list[int]
) -> None:
    first = _backend_pid(engine)
    assert [_backend_pid(engine) for _ in range(5)] == [first] * 5
    assert pings == []


def test_a_connection_the_server_closed_is_replaced_at_checkout(
    engine: Engine, pings: list[int]
) -> None:
    pooled = _backend_pid(engine)  # back in the pool, idle
    with engine.connect() as other:
        other.execute(text("SELECT 1"))  # the pool has one connection: ``other`` is it
    terminate = make_engine(engine.url.render_as_string(hide_password=False), pool_size=1)
    try:
        with terminate.connect() as admin:
            # Waits (up to 5 s) until the backend is gone: its goodbye is on the socket.
            assert admin.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pooled})
            admin.commit()
    finally:
        terminate.dispose()
    replaced = _backend_pid(engine)  # no error: the pool dropped the dead one
    assert replaced != pooled
    assert pings == [1]
