"""What a captured purchase's ledger writes cost PostgreSQL: WAL records and bytes per
statement, rows inserted, bytes on disk per row (issue 20, migration 0015).

Posts ``batches`` groups of 64 captures (``card:<id>`` → one merchant payable) with
:func:`webpurse.settlement.ledger.post_transfers`, as the batch path does, one commit per
group, into a fresh database migrated by the webpurse on ``sys.path``: run it once with
this tree and once with an older one (``PYTHONPATH=<export of an older commit>/src``) to
compare. Every INSERT and UPDATE is run under ``EXPLAIN (ANALYZE, WAL)``, so the WAL
counted is this workload's alone on a shared server (pg_stat_statements needs a restart
to load). Timings on a busy machine are noise; the WAL and the sizes are not.

    python -m bench.ledger_writes [batches] [database]
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Engine, event, text

from webpurse.settlement import ledger
from webpurse.settlement.db import make_engine, make_session_factory, migrate

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
PER_BATCH = 64
CARDS = 4096
NOW = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
TABLES = ("ledger_entries", "ledger_transfers")


class WalMeter:
    """Runs INSERT and UPDATE statements under EXPLAIN (ANALYZE, WAL) while ``on`` and adds
    up each one's WAL records and bytes by target table."""

    def __init__(self, engine: Engine) -> None:
        self.on = False
        self.by_table: dict[str, list[int]] = {}
        event.listen(engine, "before_cursor_execute", self._explain, retval=True)
        event.listen(engine, "after_cursor_execute", self._collect)

    def _explain(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        if self.on and statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            statement = "EXPLAIN (ANALYZE, WAL, FORMAT JSON) " + statement
        return statement, parameters

    def _collect(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if not statement.startswith("EXPLAIN"):
            return
        plan = cursor.fetchone()[0]
        top = (plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]
        table = str(top.get("Relation Name", "?"))
        totals = self.by_table.setdefault(table, [0, 0])
        totals[0] += int(top.get("WAL Records", 0))
        totals[1] += int(top.get("WAL Bytes", 0))


def _captures(batch: int, cards: list[str]) -> list[ledger.TransferSpec]:
    return [
        ledger.TransferSpec(
            f"pay_{batch}_{i}:capture",
            cards[(batch * PER_BATCH + i) % CARDS],
            "merchant:mer_1",
            100,
            "purchase_capture",
            reference=f"pay_{batch}_{i}",
        )
        for i in range(PER_BATCH)
    ]


def run(batches: int, database: str) -> None:
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    engine = make_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}", pool_size=1, max_overflow=0
    )
    try:
        migrate(engine)
        factory = make_session_factory(engine)
        cards = [ledger.card_account(f"crd_{i:05d}") for i in range(CARDS)]
        with factory() as session:
            for start in range(0, CARDS, 512):
                loads = [
                    ledger.TransferSpec(f"load:{card}", "funding:cash", card, 10**6, "load")
                    for card in cards[start : start + 512]
                ]
                ledger.post_transfers(session, loads, now=NOW)
                session.commit()
            session.execute(text("ANALYZE"))
            session.commit()
        meter = WalMeter(engine)
        meter.on = True
        with factory() as session:
            for batch in range(batches):
                ledger.post_transfers(session, _captures(batch, cards), now=NOW)
                session.commit()
        meter.on = False
        walls: list[float] = []
        with factory() as session:
            for batch in range(batches, 2 * batches):
                captures = _captures(batch, cards)
                started = time.perf_counter()
                ledger.post_transfers(session, captures, now=NOW)
                session.commit()
                walls.append(time.perf_counter() - started)
            sizes = session.execute(
                text(
                    "SELECT c.relname, pg_relation_size(c.oid), t.relname FROM pg_class c"
                    " JOIN pg_index i ON i.indexrelid = c.oid JOIN pg_class t"
                    " ON t.oid = i.indrelid WHERE t.relname = ANY(:tables) UNION ALL"
                    " SELECT relname, pg_relation_size(oid), relname FROM pg_class"
                    " WHERE relname = ANY(:tables) ORDER BY 3, 1"
                ),
                {"tables": list(TABLES)},
            ).all()
            rows = {
                table: int(session.scalar(text(f"SELECT count(*) FROM {table}")) or 0)
                for table in TABLES
            }
            report = ledger.check(session)
        purchases = batches * PER_BATCH
        print(f"{purchases} captured purchases, {batches} commits of {PER_BATCH}")
        records = sum(v[0] for v in meter.by_table.values())
        wal_bytes = sum(v[1] for v in meter.by_table.values())
        for table, (recs, size) in sorted(meter.by_table.items()):
            print(f"  WAL {table}: {recs / purchases:.2f} records, {size / purchases:.0f} B")
        print(
            f"  WAL per purchase: {records / purchases:.2f} records, {wal_bytes / purchases:.0f} B"
        )
        for name, size, table in sizes:
            print(f"  {name}: {size / rows[table]:.1f} B per row of {table}")
        walls.sort()
        median = walls[len(walls) // 2] / PER_BATCH
        print(f"  post_transfers + commit, median: {median * 1e6:.1f} µs per purchase")
        print(f"  ledger check ok: {report.ok}")
    finally:
        engine.dispose()
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(database)))


if __name__ == "__main__":
    run(
        int(sys.argv[1]) if len(sys.argv) > 1 else 200,
        sys.argv[2] if len(sys.argv) > 2 else "bench_ledger_writes",
    )
