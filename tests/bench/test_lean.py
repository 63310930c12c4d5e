"""The lean purchase's pgbench script runs on real PostgreSQL and leaves the books balanced."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from bench import lean
from bench.pgbench import (
    DatabaseCpu,
    Pgbench,
    PgbenchResult,
    PgServer,
    create_database,
    drop_database,
    unavailable_reason,
)

pytestmark = pytest.mark.postgres

CLIENTS = 2
RUNS = 3  # script runs per client
BATCH = 4


@pytest.fixture
def pgbench() -> Iterator[Pgbench]:
    server = PgServer.from_env()
    reason = unavailable_reason(server)
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    bench = Pgbench(server, database=f"webpurse_test_lean_{secrets.token_hex(4)}")
    create_database(server, bench.database)
    try:
        yield bench
    finally:
        drop_database(server, bench.database)


def test_the_lean_purchase_script_runs_and_balances(pgbench: Pgbench) -> None:
    lean.load(pgbench.server, pgbench.database, cards=CLIENTS * BATCH)
    result = lean.run(pgbench, CLIENTS, 0, batch=BATCH, transactions=RUNS)
    assert result.transactions == CLIENTS * RUNS
    purchases = CLIENTS * RUNS * BATCH
    books = lean.books(pgbench.server, pgbench.database)
    # every purchase captured once, each a one-fen zero-sum transfer card → payable
    assert books == lean.Books(
        succeeded=purchases,
        other_payments=0,
        transfers=purchases,
        payable=purchases,
        cards_debited=purchases,
        shadow_debited=purchases,
        outbox=purchases,
        open_cards=0,
    )


def test_lean_rows_count_purchases_not_script_runs() -> None:
    result = PgbenchResult(tps=100.0, latency_ms=10.0, transactions=1000)
    rows = {r.metric: r.value for r in lean.rows_for("settlement", result, 8, 15, 2.0, 3200.0)}
    assert rows["lean purchase SQL purchases/s"] == 100.0 * lean.BATCH
    assert rows["ratio lean SQL/pgbench"] == pytest.approx(100.0 * lean.BATCH / 3200.0)
    assert rows["lean purchase SQL PostgreSQL CPU per purchase"] == pytest.approx(
        2000 / (1000 * lean.BATCH)
    )


def test_a_batch_beyond_the_id_space_is_refused(pgbench: Pgbench) -> None:
    with pytest.raises(ValueError):
        lean.run(pgbench, 1, 1, batch=lean.MAX_BATCH + 1)


def _burn_and_disconnect(url: str) -> None:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("SELECT count(*) FROM generate_series(1, 3000000)").fetchone()


def test_database_cpu_counts_backends_that_exit_inside_the_window(pgbench: Pgbench) -> None:
    with DatabaseCpu(pgbench.database, interval=0.01) as cpu:
        # the connection (and its backend) ends before the window does
        _burn_and_disconnect(pgbench.server.url(pgbench.database))
    assert cpu.seconds is not None and cpu.seconds >= 0.05
