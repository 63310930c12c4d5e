"""``db.among`` on PostgreSQL binds a list of strings as one array literal: any string
reads back as itself, and the statement finds exactly the rows named."""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select

from tests.settlement.support import POSTGRES_URL, _libpq, require_postgres
from webpurse.settlement.db import among, array_literal

pytestmark = pytest.mark.postgres

TEXT = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12
)


@pytest.fixture(scope="module")
def connection() -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    require_postgres()
    with psycopg.connect(_libpq(POSTGRES_URL), autocommit=True) as conn:
        yield conn


@hypothesis.settings(max_examples=300, deadline=None)
@given(values=st.lists(TEXT, max_size=8))
def test_an_array_literal_reads_back_as_its_strings(
    connection: psycopg.Connection[tuple[object, ...]], values: list[str]
) -> None:
    literal = array_literal(values)
    assert literal is not None
    row = connection.execute("SELECT CAST(%s AS varchar[])", (literal,)).fetchone()
    assert row is not None and row[0] == values


def test_among_finds_exactly_the_named_rows() -> None:
    require_postgres()
    engine = create_engine(POSTGRES_URL)
    table = Table("t", MetaData(), Column("n", Integer), Column("s", String(40)))
    names = ['a"b', "c\\d", "{e,f}", "NULL", "", "g h", "中"]
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TEMP TABLE t (n integer, s varchar(40))")
            conn.execute(table.insert(), [{"n": i, "s": s} for i, s in enumerate([*names, "z"])])
            for chosen in ([], names[:1], names, [*names[2:], "missing"]):
                found = conn.scalars(
                    select(table.c.s).where(among("postgresql", table.c.s, chosen))
                )
                assert sorted(found) == sorted(s for s in names if s in chosen)
            ints = conn.scalars(select(table.c.n).where(among("postgresql", table.c.n, [0, 7])))
            assert sorted(ints) == [0, 7]  # not strings: bound as an array as before
    finally:
        engine.dispose()


def test_only_lists_of_strings_without_nul_are_literals() -> None:
    assert array_literal([]) == "{}"
    assert array_literal(["a", 1]) is None
    assert array_literal(["a\x00b"]) is None
    assert array_literal(['x"y', "z\\"]) == '{"x\\"y","z\\\\"}'


def test_the_bound_array_is_a_constant_of_the_plan_not_converted_per_row() -> None:
    # A VARCHAR parameter cast to an array is an I/O conversion PostgreSQL cannot fold:
    # a scan that filters on it parses the whole list again for every row. The parameter
    # goes untyped, so the plan holds the array itself, once.
    require_postgres()
    engine = create_engine(POSTGRES_URL)
    table = Table("t2", MetaData(), Column("s", String(40)))
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TEMP TABLE t2 (s varchar(40))")
            conn.execute(table.insert(), [{"s": f"v{i}"} for i in range(200)])
            stmt = select(table.c.s).where(among("postgresql", table.c.s, ["v1", "v2", "v3"]))
            compiled = stmt.compile(dialect=engine.dialect)
            plan = "\n".join(
                str(row[0])
                for row in conn.exec_driver_sql(
                    "EXPLAIN (VERBOSE, COSTS OFF) " + str(compiled), compiled.params
                )
            )
            assert "'{v1,v2,v3}'::" in plan, plan  # the array, folded into the plan
            assert "::character varying)::" not in plan, plan  # no per-row conversion
            assert sorted(conn.scalars(stmt)) == ["v1", "v2", "v3"]
    finally:
        engine.dispose()
