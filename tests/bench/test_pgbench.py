"""Parsing pgbench's report."""

from __future__ import annotations

import pytest

from bench.pgbench import parse_output

PG15_OUTPUT = """\
pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 10
query mode: prepared
number of clients: 8
number of threads: 2
maximum number of tries: 1
duration: 15 s
number of transactions actually processed: 62823
number of failed transactions: 0 (0.000%)
latency average = 1.909 ms
initial connection time = 9.311 ms
tps = 4189.640861 (without initial connection time)
"""


def test_parse_pgbench_15_report() -> None:
    result = parse_output(PG15_OUTPUT)
    assert result.tps == pytest.approx(4189.640861)
    assert result.latency_ms == pytest.approx(1.909)
    assert result.transactions == 62823


def test_parse_older_wording_with_two_tps_lines_takes_the_excluding_one() -> None:
    output = (
        "tps = 100.5 (including connections establishing)\n"
        "tps = 120.25 (excluding connections establishing)\n"
    )
    assert parse_output(output).tps == 120.25


def test_output_without_tps_is_an_error() -> None:
    with pytest.raises(ValueError, match="tps"):
        parse_output("pgbench: error: connection to server failed\n")
