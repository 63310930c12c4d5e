"""Leadership of a background job: one holder of its advisory lock per database schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from tests.settlement.support import database_url
from webpurse.settlement.db import make_engine
from webpurse.settlement.leader import SWEEP_JOB, Leadership, job_key


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[Engine, Engine]]:
    """Two engines (two 'processes') on one fresh PostgreSQL schema."""
    with database_url("postgresql", tmp_path) as url:
        first, second = make_engine(url), make_engine(url)
        try:
            yield first, second
        finally:
            first.dispose()
            second.dispose()


def test_the_key_depends_on_the_job_and_the_schema() -> None:
    assert job_key(SWEEP_JOB, "a") == job_key(SWEEP_JOB, "a")
    assert job_key(SWEEP_JOB, "a") != job_key(SWEEP_JOB, "b")
    assert job_key(SWEEP_JOB, "a") != job_key("other", "a")
    assert -(2**63) <= job_key(SWEEP_JOB) < 2**63


@pytest.mark.postgres
def test_one_leader_at_a_time_and_the_next_takes_over_on_release(
    engines: tuple[Engine, Engine],
) -> None:
    a, b = Leadership(engines[0], SWEEP_JOB), Leadership(engines[1], SWEEP_JOB)
    try:
        assert a.lead()
        assert not b.lead()
        assert a.lead()  # still the leader at its next tick
        assert not b.lead()
        a.release()
        assert b.lead()
        assert not a.lead()
    finally:
        a.release()
        b.release()


@pytest.mark.postgres
def test_a_leader_whose_session_dies_loses_the_job_to_the_next(
    engines: tuple[Engine, Engine],
) -> None:
    a, b = Leadership(engines[0], SWEEP_JOB), Leadership(engines[1], SWEEP_JOB)
    try:
        assert a.lead()
        assert a.backend_pid is not None
        with engines[1].connect() as admin:
            ended = admin.execute(
                text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": a.backend_pid}
            ).scalar_one()
        assert ended is True  # it waited (up to 10 s) for the backend to be gone
        assert b.lead()  # the lock went with the session
        assert not a.lead()  # a notices it lost the job, and the lock is b's now
        assert not a.held
    finally:
        a.release()
        b.release()


def test_on_sqlite_every_process_leads(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        assert Leadership(engine, SWEEP_JOB).lead()
        assert Leadership(engine, SWEEP_JOB).lead()
    finally:
        engine.dispose()
