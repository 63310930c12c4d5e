"""The settlement benchmark's pure parts: profile aggregation and its result rows."""

from __future__ import annotations

import dataclasses

import pytest

from bench.settlement import (
    WORKERS,
    WindowResult,
    frame_function,
    frame_package,
    parse_collapsed,
    window_rows,
)

STACKS = [
    "process 1:python;main (webpurse/__main__.py:3);handle (webpurse/settlement/payments.py:10);"
    "execute (sqlalchemy/engine/base.py:1416) 6",
    "process 1:python;main (webpurse/__main__.py:3);handle (webpurse/settlement/payments.py:12);"
    "mac (webpurse/protocol/crypto.py:70) 3",
    "process 1:python;main (webpurse/__main__.py:3);log (structlog/_log.py:5) 1",
    "process 1:python;main (webpurse/__main__.py:3);lock (webpurse/settlement/ledger.py:9);"
    "Session.execute (sqlalchemy/orm/session.py:1);Connection.wait (psycopg/connection.py:2) 4",
    "garbage line without count",
]


def test_frame_function_drops_the_line_number() -> None:
    assert frame_function("execute (sqlalchemy/engine/base.py:1416)") == (
        "execute (sqlalchemy/engine/base.py)"
    )
    assert frame_function("<lambda> (x.py)") == "<lambda> (x.py)"


def test_frame_package_from_the_path() -> None:
    assert frame_package("execute (sqlalchemy/engine/base.py:1)") == "sqlalchemy"
    assert frame_package("f (/venv/lib/python3.11/site-packages/psycopg/cursor.py:3)") == "psycopg"
    assert frame_package("mac (webpurse/protocol/crypto.py:70)") == "webpurse"
    assert frame_package("Condition.notify (threading.py:369)") == "threading"
    assert frame_package("mystery (somewhere.py:1)") == "other"


def test_parse_collapsed_counts_own_inclusive_and_package_time() -> None:
    profile = parse_collapsed(STACKS)
    assert profile.samples == 14
    assert profile.own[0] == ("execute (sqlalchemy/engine/base.py)", 6)
    assert dict(profile.packages) == {"sqlalchemy": 6, "webpurse": 3, "structlog": 1, "psycopg": 4}
    inclusive = dict(profile.inclusive)
    # a function on the stack of several samples counts each sample once
    assert inclusive["handle (webpurse/settlement/payments.py)"] == 9
    assert inclusive["main (webpurse/__main__.py)"] == 14
    # time waiting for PostgreSQL goes to the innermost webpurse caller
    assert profile.waits == [("lock (webpurse/settlement/ledger.py)", 4)]
    assert all("webpurse" in name for name in inclusive)


def _window(purchases: int, errors: list[str] | None = None) -> WindowResult:
    return WindowResult(
        clients=4,
        seconds=10.0,
        purchases=purchases,
        latencies=[0.1] * purchases,
        card_seconds=0.5,
        client_cpu_seconds=2.0,
        server_cpu_seconds=8.0,
        errors=errors or [],
    )


def test_window_rows_rate_ratio_and_cost_per_purchase() -> None:
    rows = {r.metric: r for r in window_rows(_window(200), pgbench_tps=1000.0)}
    assert rows["settlement purchases/s"].value == 20
    assert rows["ratio settlement/pgbench"].value == pytest.approx(0.02)
    assert rows["server CPU per purchase"].value == pytest.approx(40)
    assert rows["card emulator per purchase"].value == pytest.approx(2.5)
    assert rows["purchase latency p99"].value == pytest.approx(100)
    assert rows["settlement purchases/s"].params == {
        "clients": 4,
        "seconds": 10.0,
        "workers": WORKERS,
    }


def test_window_rows_report_failures_and_no_ratio_without_pgbench() -> None:
    rows = {r.metric: r for r in window_rows(_window(0, ["PurchaseFailed: 9401"]), None)}
    assert rows["settlement purchases/s"].value == 0
    assert "1 client(s) failed: PurchaseFailed: 9401" in rows["settlement purchases/s"].note
    assert rows["ratio settlement/pgbench"].value is None
    assert "server CPU per purchase" not in rows


def test_batched_window_rows_name_their_mode_and_divide_by_the_best_pgbench() -> None:
    window = dataclasses.replace(
        _window(1_000), batching=True, batches=50, batched_items=3_000, database_cpu_seconds=1.0
    )
    rows = {r.metric: r for r in window_rows(window, pgbench_tps=None, pgbench_best=400.0)}
    assert rows["settlement purchases/s (batched)"].value == 100
    assert rows["ratio batched/pgbench best"].value == pytest.approx(0.25)
    assert rows["items per batch (mean)"].value == 60
    assert rows["PostgreSQL CPU per purchase (batched)"].value == pytest.approx(1.0)
    assert "ratio settlement/pgbench (batched)" not in rows  # pgbench did not run at N
    assert "settlement purchases/s" not in rows
