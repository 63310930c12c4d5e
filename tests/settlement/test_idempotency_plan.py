"""The idempotency-key look-up stays an index look-up however many keys a merchant has.

On a machine where autovacuum is off (this one), a table nobody ANALYZEd has no
statistics, and a plan that filtered on the merchant scanned all its keys: 19.5 ms per
250-key batch at 49k keys, growing with history (issue 20). These tests build the very
statement the code runs (:func:`webpurse.settlement.idempotency.lookup`) and ask real
PostgreSQL for its plan on a fresh schema full of one merchant's keys, never analysed.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.settlement.support import database_url
from webpurse.settlement import idempotency
from webpurse.settlement.db import make_engine, migrate

pytestmark = pytest.mark.postgres

MERCHANT = "mer_busy"
KEYS = 40_000  # one merchant's history, plus a little of another's
INDEX = "pk_idempotency_keys"  # (key, principal): migration 0016
INDEX_ACCESS = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    tmp: Path = tmp_path_factory.mktemp("plan")
    with database_url("postgresql", tmp) as url:
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            migrate(engine)
            with engine.begin() as connection:
                # No statistics, ever: the state of a table on a machine without autovacuum.
                connection.execute(
                    text("ALTER TABLE idempotency_keys SET (autovacuum_enabled = false)")
                )
                connection.execute(
                    text(
                        "INSERT INTO idempotency_keys (principal, key, fingerprint, state,"
                        " response_status, response_body, created_at)"
                        " SELECT CASE WHEN g % 20 = 0 THEN 'mer_other' ELSE :merchant END,"
                        " 'key-' || g, decode(repeat('0', 64), 'hex'), 1, 201,"
                        " repeat('x', 400), now() - (:n - g) * interval '1 minute'"
                        " FROM generate_series(1, :n) AS g"
                    ),
                    {"merchant": MERCHANT, "n": KEYS},
                )
            yield engine
        finally:
            engine.dispose()


def _plan(engine: Engine, keys: list[str]) -> dict[str, Any]:
    return _explain(engine, idempotency.lookup(MERCHANT, keys))


def _explain(engine: Engine, statement: Any) -> dict[str, Any]:
    compiled = statement.compile(
        dialect=engine.dialect, compile_kwargs={"render_postcompile": True}
    )
    with engine.connect() as connection:
        stats = connection.execute(
            text("SELECT count(*) FROM pg_stats WHERE tablename = 'idempotency_keys'")
        ).scalar_one()
        assert stats == 0, "the table must have no statistics for this test to mean anything"
        raw = connection.exec_driver_sql(
            "EXPLAIN (FORMAT JSON) " + str(compiled), compiled.params
        ).scalar_one()
    document = raw if isinstance(raw, list) else json.loads(raw)
    return dict(document[0]["Plan"])


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


@pytest.mark.parametrize("count", [1, 250], ids=["one request", "a batch of 250"])
def test_the_key_lookup_is_an_index_lookup_without_statistics(engine: Engine, count: int) -> None:
    """Index access on the key index with the keys in its condition; nothing filtered.

    One key is an Index Scan. For 250 PostgreSQL prefers a Bitmap Index Scan of the same
    index (it then reads the heap in page order): the same look-up of exactly those keys.
    What the old plan did, and what must never come back, is an index or a table scan of
    the merchant's rows with the keys as a ``Filter`` applied to every one of them.
    """
    keys = [f"key-{i}" for i in range(1, 2 * count, 2)] + ["key-never-stored"]
    nodes = list(_nodes(_plan(engine, keys)))
    kinds = [node["Node Type"] for node in nodes]
    assert "Seq Scan" not in kinds, kinds
    scans = [node for node in nodes if node["Node Type"] in INDEX_ACCESS]
    assert [node.get("Index Name") for node in scans] == [INDEX], kinds
    condition = scans[0]["Index Cond"]
    assert "(key)::text = " in condition and "(principal)::text = " in condition, condition
    assert not [node["Filter"] for node in nodes if "Filter" in node], nodes


def test_the_purge_finds_the_oldest_keys_on_the_time_index_without_statistics(
    engine: Engine,
) -> None:
    """A purge chunk reads the oldest keys off ``created_at``'s btree in order, stops at its
    limit and deletes those rows where they lie (Tid Scan): never a scan of the whole table
    (what a BRIN index on ``created_at``, measured for migration 0016, was planned as) nor a
    descent of the key index per key."""
    now = dt.datetime.now(dt.UTC) + idempotency.KEEP_FOR - dt.timedelta(days=20)
    # 100 of these 40,000 keys, as a chunk of 5,000 is to the millions of a week's keys (with
    # a chunk near the whole table's size a sequential scan is the right plan).
    nodes = list(_nodes(_explain(engine, idempotency.oldest_keys(now, 100))))
    kinds = [node["Node Type"] for node in nodes]
    assert "Seq Scan" not in kinds and "Sort" not in kinds and "Tid Scan" in kinds, kinds
    scans = [node.get("Index Name") for node in nodes if node["Node Type"] in INDEX_ACCESS]
    assert scans == ["ix_idempotency_keys_created_at"], kinds
