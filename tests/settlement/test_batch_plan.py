"""A batch reads its payments by their ids, however stale the statistics of ``payments``.

The fast path's payment reads name the payments by id and the merchant. Where the
statistics were taken while the merchant had few payments (a new merchant; or autovacuum
off, as on this machine kind, between ``ANALYZE`` runs) PostgreSQL reached the rows through
``ix_payments_merchant_created`` and read every entry of the merchant with the ids as a
filter, growing with the merchant's history (issue 20, seen with auto_explain under ``bench
versions``). These tests build that state (an older merchant's payments and a new
merchant's few, analysed; then thousands more of the new one's, never analysed) and ask
real PostgreSQL for the plans of the very statements the batch runs: each must find the
rows by the primary key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, bindparam, select, text

from tests.settlement.support import database_url
from webpurse.settlement import batch
from webpurse.settlement.db import among_bound, among_values, make_engine, migrate
from webpurse.settlement.models import Payment
from webpurse.settlement.transactions import Status

pytestmark = pytest.mark.postgres

MERCHANT = "mer_new"
OLD = "mer_old"
OLDER = 5_000  # the older merchant's payments, all there when the statistics were taken
ANALYSED = 20  # the merchant's payments when the statistics were taken
LATER = 30_000  # its payments since
INDEX_ACCESS = ("Index Scan", "Index Only Scan", "Bitmap Index Scan")
_PAYMENTS: Any = Payment.__table__

_INSERT = (
    "INSERT INTO payments (id, merchant_id, status, amount, currency, description,"
    " merchant_reference, metadata, terminal_id, key_index, refunded_amount, created_at,"
    " updated_at, awaiting_card, card_id, counter)"
    " SELECT 'pay_' || lpad(g::text, 24, '0'), :merchant, 'authorised', 100, 'EUR', '', '',"
    " '{}', '000000000001', 1, 0, now() + g * interval '1 millisecond', now(), false,"
    " 'card_' || (g % 500), g"
    " FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g"
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    tmp: Path = tmp_path_factory.mktemp("batchplan")
    with database_url("postgresql", tmp) as url:
        engine = make_engine(url, pool_size=1, max_overflow=0)
        try:
            migrate(engine)
            with engine.begin() as connection:
                connection.execute(text("ALTER TABLE payments SET (autovacuum_enabled = false)"))
                connection.execute(text(_INSERT), {"merchant": OLD, "first": -OLDER, "last": 0})
                connection.execute(
                    text(_INSERT), {"merchant": MERCHANT, "first": 1, "last": ANALYSED}
                )
            with engine.begin() as connection:
                connection.execute(text("ANALYZE payments"))
            with engine.begin() as connection:
                connection.execute(
                    text(_INSERT), {"merchant": MERCHANT, "first": ANALYSED + 1, "last": LATER}
                )
            yield engine
        finally:
            engine.dispose()


def _ids(count: int) -> list[str]:
    return [f"pay_{n:024d}" for n in range(LATER - 2 * count, LATER, 2)]


def _explain(engine: Engine, statement: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
    compiled = statement.compile(dialect=engine.dialect)
    with engine.connect() as connection:
        raw = connection.exec_driver_sql(
            "EXPLAIN (FORMAT JSON) " + str(compiled), compiled.construct_params(params)
        ).scalar_one()
    document = raw if isinstance(raw, list) else json.loads(raw)
    return list(_nodes(document[0]["Plan"]))


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def _indexes(nodes: list[dict[str, Any]]) -> list[str]:
    return [str(node.get("Index Name")) for node in nodes if node["Node Type"] in INDEX_ACCESS]


def _params(count: int, **more: Any) -> dict[str, Any]:
    return {"ids": among_values("postgresql", _ids(count)), "merchant": MERCHANT, **more}


def test_the_trap_is_real(engine: Engine) -> None:
    """The same read with the merchant as a plain column condition takes the merchant's
    index on these statistics (if PostgreSQL ever stops doing so, the tests below still
    hold, but no longer prove anything)."""
    trap = select(_PAYMENTS).where(
        among_bound("postgresql", _PAYMENTS.c.id, "ids"),
        _PAYMENTS.c.merchant_id == bindparam("merchant"),
        _PAYMENTS.c.status == bindparam("status"),
    )
    nodes = _explain(engine, trap, _params(250, status="authorised"))
    assert "ix_payments_merchant_created" in _indexes(nodes), nodes


@pytest.mark.parametrize("count", [1, 250], ids=["one payment", "a batch of 250"])
@pytest.mark.parametrize("lock", [False, True], ids=["read", "locked"])
def test_a_batch_reads_its_payments_by_their_ids(engine: Engine, count: int, lock: bool) -> None:
    nodes = _explain(
        engine,
        batch._payments_stmt("postgresql", lock, Status.AUTHORISED),
        _params(count, status="authorised"),
    )
    kinds = [node["Node Type"] for node in nodes]
    assert "Seq Scan" not in kinds, kinds
    assert _indexes(nodes) == ["payments_pkey"], nodes


@pytest.mark.parametrize(
    "build", [batch._capture_cards_stmt, batch._card_numbers_stmt], ids=["cards", "numbers"]
)
def test_a_batch_reads_its_payments_cards_by_their_ids(engine: Engine, build: Any) -> None:
    nodes = _explain(engine, build("postgresql"), _params(250))
    kinds = [node["Node Type"] for node in nodes]
    assert "Seq Scan" not in kinds, kinds
    assert _indexes(nodes) == ["payments_pkey"], nodes


def test_the_reads_still_keep_to_the_merchant(engine: Engine) -> None:
    """The merchant is still a condition: another merchant's ids find nothing."""
    with engine.connect() as connection:
        mine = connection.execute(
            batch._payments_stmt("postgresql", False, Status.AUTHORISED),
            _params(5, status="authorised"),
        ).all()
        theirs = connection.execute(
            batch._payments_stmt("postgresql", False, Status.AUTHORISED),
            {**_params(5, status="authorised"), "merchant": "mer_other"},
        ).all()
    assert len(mine) == 5 and theirs == []
