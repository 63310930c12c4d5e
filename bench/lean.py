"""The lean purchase's SQL under pgbench: what one purchase could cost PostgreSQL here.

``bench/lean/schema.sql`` and ``bench/lean/purchase.pgbench`` are the SQL of a purchase
that keeps every guarantee settlement gives (issue 20, the "lean full purchase" of
/work/shared/design/purchase-cost.md): double entry with one zero-sum transfer per
purchase, idempotency keys as unique columns of the payment, one transaction in flight per
card, the card's shadow balance and counters, the card's MACs kept for the audit, an
outbox row, the merchant's hot payable updated once per batch and last. One pgbench
"transaction" is :data:`BATCH` purchases through the API's three steps (create, authorise,
capture), one commit per step, as settlement's batched path commits them; purchases/s is
pgbench's TPS × :data:`BATCH`. The settlement benchmark runs it beside tpcb-like and the
real server, so the three numbers come from one run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.harness import Measurement, ratio
from bench.pgbench import Pgbench, PgbenchResult, PgServer

FOLDER = Path(__file__).resolve().parent / "lean"
SCHEMA = FOLDER / "schema.sql"
SCRIPT = FOLDER / "purchase.pgbench"
BATCH = 64  # purchases per script run (one commit per step for all of them)
MAX_BATCH = 1024  # payment ids are batch number × 1024 + slot
OPENING_BALANCE = 1_000_000_000  # fen on each card: never runs dry in a window


def load(server: PgServer, database: str, cards: int) -> None:
    """Create the lean schema in ``database``, load ``cards`` cards, then ``ANALYZE``."""
    import psycopg

    with psycopg.connect(server.url(database), autocommit=True, connect_timeout=5) as conn:
        conn.execute(SCHEMA.read_text(encoding="utf-8").encode())
        conn.execute(
            "INSERT INTO lean_cards SELECT g, lpad(g::text, 16, '0'), %(b)s, %(b)s, 0, 0,"
            " NULL, now() FROM generate_series(1, %(n)s) AS g",
            {"b": OPENING_BALANCE, "n": cards},
        )
        conn.execute("INSERT INTO lean_accounts VALUES ('payable-mer_bench', 0, 0)")
        conn.execute(
            "ANALYZE lean_cards, lean_payments, lean_transfers, lean_outbox, lean_accounts"
        )


def run(
    pgbench: Pgbench,
    clients: int,
    seconds: int,
    *,
    batch: int = BATCH,
    transactions: int | None = None,
) -> PgbenchResult:
    """The lean script at ``clients`` (each owns ``batch`` cards: load enough first)."""
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"a lean batch holds 1 to {MAX_BATCH} purchases")
    return pgbench.run(
        clients, seconds, script=SCRIPT, define={"batch": batch}, transactions=transactions
    )


@dataclass(frozen=True)
class Books:
    """The lean database's totals: what a run must leave balanced."""

    succeeded: int
    other_payments: int
    transfers: int
    payable: int
    cards_debited: int
    shadow_debited: int
    outbox: int
    open_cards: int


def books(server: PgServer, database: str) -> Books:
    import psycopg

    with psycopg.connect(server.url(database), connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT"
            " (SELECT count(*) FROM lean_payments WHERE status = 'succeeded'),"
            " (SELECT count(*) FROM lean_payments WHERE status <> 'succeeded'),"
            " (SELECT coalesce(sum(amount), 0) FROM lean_transfers),"
            " (SELECT balance FROM lean_accounts WHERE id = 'payable-mer_bench'),"
            " (SELECT coalesce(sum(%(b)s - ledger_balance), 0) FROM lean_cards),"
            " (SELECT coalesce(sum(%(b)s - shadow_balance), 0) FROM lean_cards),"
            " (SELECT count(*) FROM lean_outbox),"
            " (SELECT count(*) FROM lean_cards WHERE open_payment IS NOT NULL)",
            {"b": OPENING_BALANCE},
        ).fetchone()
    assert row is not None
    return Books(*(int(value) for value in row))


def autovacuum_on(server: PgServer) -> bool:
    """``SHOW autovacuum``: off on this machine kind, so only an explicit ANALYZE gives
    the planner statistics."""
    import psycopg

    with psycopg.connect(server.url("postgres"), connect_timeout=5) as conn:
        row = conn.execute("SHOW autovacuum").fetchone()
    return row is not None and str(row[0]) == "on"


def analyze(server: PgServer, database: str) -> None:
    """``ANALYZE`` the whole database (after loading, before measuring)."""
    import psycopg

    with psycopg.connect(server.url(database), autocommit=True, connect_timeout=5) as conn:
        conn.execute("ANALYZE")


def rows_for(
    benchmark: str,
    result: PgbenchResult,
    clients: int,
    seconds: int,
    database_cpu_seconds: float | None,
    tpcb_tps: float | None,
    batch: int = BATCH,
) -> list[Measurement]:
    """purchases/s, PostgreSQL CPU per purchase, and the ratio to tpcb-like at ``clients``."""
    params: dict[str, str | int | float | bool] = {
        "clients": clients,
        "seconds": seconds,
        "batch": batch,
    }
    rate = result.tps * batch
    rows = [
        Measurement(benchmark, "lean purchase SQL purchases/s", rate, "1/s", params),
        Measurement(benchmark, "ratio lean SQL/pgbench", ratio(rate, tpcb_tps), "×", params),
    ]
    if database_cpu_seconds is not None and result.transactions:
        per = 1000 / (result.transactions * batch)
        rows.append(
            Measurement(
                benchmark,
                "lean purchase SQL PostgreSQL CPU per purchase",
                database_cpu_seconds * per,
                "ms",
                params,
            )
        )
    return rows
