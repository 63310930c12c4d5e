"""The harness's pure helpers: statistics, timing loop, the results file."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest

from bench import harness
from bench.harness import (
    Measurement,
    Run,
    append_run,
    format_value,
    latest_by_benchmark,
    load_runs,
    measure_rate,
    not_measured,
    percentile,
    ratio,
    summarise,
)


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7


def test_percentile_refuses_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_of_skewed_samples_keeps_the_tail() -> None:
    samples = [1.0] * 990 + [100.0] * 10
    summary = summarise(samples)
    assert summary.count == 1000
    assert summary.p50 == 1
    assert summary.p99 > 1
    assert summary.max == 100


def test_ratio_is_none_when_a_side_is_missing() -> None:
    assert ratio(50, 200) == 0.25
    assert ratio(None, 200) is None
    assert ratio(50, None) is None
    assert ratio(50, 0) is None


def test_format_value_three_significant_digits() -> None:
    assert format_value(12345.6, "ops/s") == "12,346 ops/s"
    assert format_value(123.4) == "123"
    assert format_value(12.34) == "12.3"
    assert format_value(1.234, "ms") == "1.23 ms"
    assert format_value(0.01234) == "0.0123"
    assert format_value(None) == "—"


def test_measure_rate_runs_until_the_window_closes() -> None:
    now = [0.0]
    calls = [0]

    def clock() -> float:
        return now[0]

    def operation() -> None:
        calls[0] += 1
        now[0] += 0.001  # each operation takes 1 ms of fake time

    operations, seconds = measure_rate(operation, min_seconds=0.5, clock=clock)
    assert operations == calls[0]
    assert seconds >= 0.5
    assert operations / seconds == pytest.approx(1000, rel=0.01)


def test_measure_rate_stops_at_max_operations() -> None:
    now = [0.0]

    def operation() -> None:
        now[0] += 0.000001

    operations, _ = measure_rate(
        operation, min_seconds=10, clock=lambda: now[0], max_operations=100
    )
    assert operations == 100


def _run(date: str, benchmarks: list[str], rows: list[Measurement]) -> Run:
    return Run(date, "abc123", False, {"cpus": 2}, benchmarks, rows, 1.0)


def test_results_file_appends_runs_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    first = _run(
        "2026-01-01T00:00:00+00:00", ["micro"], [Measurement("micro", "mac", 1.5, "ops/s")]
    )
    second = _run(
        "2026-01-02T00:00:00+00:00",
        ["settlement"],
        [not_measured("settlement", "purchases/s", "1/s", "settlement not built", clients=8)],
    )
    append_run(first, path)
    append_run(second, path)
    runs = load_runs(path)
    assert [r.date for r in runs] == [first.date, second.date]
    assert runs[0].measurements == first.measurements
    row = runs[1].measurements[0]
    assert row.value is None
    assert row.note == "not measured yet: settlement not built"
    assert row.params == {"clients": 8}
    assert json.loads(path.read_text())["format"] == 1


def test_latest_by_benchmark_takes_the_newest_run_of_each() -> None:
    old = _run(
        "1",
        ["micro", "pgbench"],
        [Measurement("micro", "a", 1, ""), Measurement("pgbench", "b", 2, "")],
    )
    new = _run("2", ["micro"], [Measurement("micro", "a", 3, "")])
    latest = latest_by_benchmark([old, new])
    assert latest["micro"][0] is new
    assert latest["micro"][1][0].value == 3
    assert latest["pgbench"][0] is old


def test_run_start_records_commit_and_machine() -> None:
    run = Run.start(["micro"], now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert run.date == "2026-01-01T00:00:00+00:00"
    assert run.machine["cpus"]
    assert run.commit


def test_measure_rate_does_not_overshoot_when_operations_slow_down() -> None:
    now = [0.0]
    calls = [0]

    def operation() -> None:
        calls[0] += 1
        now[0] += 0.00001 if calls[0] <= 50 else 0.01  # fast at first, then 1000x slower

    _, seconds = measure_rate(operation, min_seconds=1.0, clock=lambda: now[0])
    assert seconds < 1.2


def test_a_bench_client_runs_on_the_loop_the_shop_runs_on() -> None:
    """uvicorn (``loop="auto"``) runs the shop on uvloop, so the shoppers' side of a window
    runs there too, and the window's answer comes back."""

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert harness.run_async(loop_module()).startswith("uvloop")
