"""The generated report: tables and honest 'not measured' rows."""

from __future__ import annotations

from bench.harness import Measurement, Run, not_measured
from bench.report import render, table


def test_table_shows_values_and_reasons() -> None:
    rows = [
        Measurement("micro", "host purchase_mac1", 70377.2, "ops/s"),
        not_measured("settlement", "settlement purchases/s", "1/s", "no routes | yet", clients=8),
    ]
    text = table(rows)
    assert "| host purchase_mac1 |  | 70,377 ops/s |  |" in text
    assert (
        "| settlement purchases/s | clients=8 | — | not measured yet: no routes \\| yet |" in text
    )


def test_render_uses_the_latest_run_per_benchmark() -> None:
    old = Run(
        "2026-01-01", "aaaaaaaaaaaa", False, {}, ["micro"], [Measurement("micro", "x", 1, "ops/s")]
    )
    new = Run(
        "2026-01-02", "bbbbbbbbbbbb", True, {}, ["micro"], [Measurement("micro", "x", 2, "ops/s")]
    )
    text = render([old, new], plots=False)
    assert "commit `bbbbbbbbbb` (with uncommitted changes)" in text
    assert "2.00 ops/s" in text
    assert "1.00 ops/s" not in text


def test_render_without_runs_says_so() -> None:
    assert "No benchmark has been run yet." in render([], plots=False)


def test_summary_picks_headline_rows_with_their_run_date() -> None:
    rows = [
        Measurement("settlement", "settlement purchases/s", 17.0, "1/s", {"clients": 8}),
        Measurement("settlement", "settlement purchases/s", 9.0, "1/s", {"clients": 1}),
        Measurement("settlement", "ratio settlement/pgbench", 0.0134, "×", {"clients": 8}),
    ]
    run = Run("2026-11-27T13:41:48+00:00", "c", False, {}, ["settlement"], rows)
    text = render([run], plots=False)
    summary = text[text.index("## Summary") : text.index("## Settlement")]
    assert "| settlement | settlement purchases/s | clients=8 | 17.0 1/s | 2026-11-27 13:41 |" in (
        summary
    )
    assert summary.index("clients=1") < summary.index("clients=8")  # in the listed order


def test_profile_rows_get_their_own_tables_cpu_first() -> None:
    rows = [
        Measurement("settlement", "settlement purchases/s", 17.0, "1/s", {"clients": 8}),
        Measurement("settlement", "profile wall own time", 36.0, "%", {"clients": 8, "where": "w"}),
        Measurement("settlement", "profile cpu own time", 12.0, "%", {"clients": 8, "where": "c"}),
    ]
    run = Run("2026-11-27", "c", False, {}, ["settlement"], rows)
    text = render([run], plots=False)
    section = text[text.index("## Settlement") :]
    main_table = section[section.index("| metric |") : section.index("### Where")]
    assert "profile" not in main_table
    assert text.index("| profile cpu own time, 8 clients |") < text.index(
        "| profile wall own time, 8 clients |"
    )
    assert "| `c` | 12.0 % |" in text


def test_the_three_limits_stand_side_by_side_per_client_count() -> None:
    def row(metric: str, value: float, clients: int, unit: str = "1/s") -> Measurement:
        return Measurement("settlement", metric, value, unit, {"clients": clients})

    rows = [
        row("pgbench tps", 4200.0, 8, "TPS"),
        row("lean purchase SQL purchases/s", 30000.0, 8),
        row("settlement purchases/s", 160.0, 8),
        row("settlement purchases/s (batched)", 700.0, 512),
        row("pgbench PostgreSQL CPU per transaction", 0.3, 8, "ms"),
        row("lean purchase SQL PostgreSQL CPU per purchase", 0.05, 8, "ms"),
        row("server CPU per purchase", 6.0, 8, "ms"),
    ]
    text = render([Run("2026-12-06", "c", False, {}, ["settlement"], rows)], plots=False)
    section = text[text.index("## Settlement") :]
    assert "| clients | pgbench tpcb-like (TPS) | lean purchase SQL (purchases/s) |" in section
    assert "| 8 | 4,200 | 30,000 | 160 | — | 0.3 · 0.05 · — · — | 6.00 · — |" in section
    assert "| 512 | — | — | — | 700 | — · — · — · — | — · — |" in section
    assert section.index("| clients |") < section.index("| metric |")


def test_versions_table_keeps_windows_with_more_batches_in_flight_apart() -> None:
    from bench.report import versions_tables

    def window(rev: str, number: int, rate: float, **extra: int) -> Measurement:
        params = {"rev": rev, "round": number, "clients": 512, **extra}
        return Measurement("versions", "settlement purchases/s (batched)", rate, "1/s", params)

    rows = [
        window("aaaaaaa", 1, 800.0),
        window("bbbbbbb", 1, 1000.0),
        window("bbbbbbb", 1, 1500.0, **{"in flight": 2}),
        window("aaaaaaa", 2, 820.0),
        window("bbbbbbb", 2, 1040.0),
        window("bbbbbbb", 2, 1460.0, **{"in flight": 2}),
    ]
    text = versions_tables(rows)
    assert "| 1 | `bbbbbbb`, 2 in flight | 1,500 |" in text
    assert "| 1 | `bbbbbbb` | 1,000 |" in text
    # Medians per revision and in-flight count, each against the first revision's.
    assert "| `aaaaaaa` | 2 | 810 |" in text
    assert "| `bbbbbbb` | 2 | 1,020 (+26 %) |" in text
    assert "| `bbbbbbb`, 2 in flight | 2 | 1,480 (+83 %) |" in text
