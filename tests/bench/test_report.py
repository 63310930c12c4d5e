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
