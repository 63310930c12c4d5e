"""The processes benchmark's rows and plot (the measuring itself needs PostgreSQL: `make bench`)."""

from __future__ import annotations

import socket
from pathlib import Path

from bench.harness import Measurement
from bench.processes import _listening, _window_rows
from bench.report import plot_processes
from bench.settlement import WindowResult


def _window(purchases: int) -> WindowResult:
    return WindowResult(
        clients=32,
        seconds=10.0,
        purchases=purchases,
        latencies=[0.01, 0.02, 0.03],
        card_seconds=0.1,
        client_cpu_seconds=1.0,
        server_cpu_seconds=5.0,
        errors=[],
    )


def test_window_rows_carry_the_process_count_and_the_ratio_to_pgbench() -> None:
    rows = _window_rows(_window(2000), 2, "one port", 800.0, cpu=True)
    by_metric = {row.metric: row for row in rows}
    assert by_metric["settlement purchases/s"].value == 200.0
    assert by_metric["settlement purchases/s"].params["processes"] == 2
    assert by_metric["ratio settlement/pgbench"].value == 0.25
    assert by_metric["server CPU per purchase"].value == 2.5


def test_window_rows_without_pgbench_have_no_ratio() -> None:
    rows = _window_rows(_window(10), 1, "one port", None, cpu=False)
    ratio = next(row for row in rows if row.metric == "ratio settlement/pgbench")
    assert ratio.value is None
    assert not any(row.metric == "server CPU per purchase" for row in rows)


def test_the_plot_draws_purchases_against_processes(tmp_path: Path) -> None:
    rows = [Measurement("processes", "pgbench tps", 900.0, "TPS", {"clients": 32})]
    for mode in ("one port", "batched, a port each"):
        rows += [
            Measurement(
                "processes", "settlement purchases/s", v, "1/s", {"processes": n, "mode": mode}
            )
            for n, v in ((1, 100.0), (2, 180.0), (4, 210.0))
        ]
    image = tmp_path / "processes.png"
    assert plot_processes(rows, image)
    assert image.stat().st_size > 0
    assert not plot_processes([], tmp_path / "none.png")


def test_listening_counts_the_sockets_on_a_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert _listening(port) == 0
        sock.listen()
        assert _listening(port) == 1
