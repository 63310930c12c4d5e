"""The versions benchmark's pure parts: the interleaved order, the command line, the report."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.balanced import LAYOUT_ENV, haproxy_config, layout_from_env
from bench.harness import Measurement, Run
from bench.report import render
from bench.servers import SetupError
from bench.versions import NAME, Revision, revision_rows, schedule
from webpurse.balancer import haproxy_path


def test_schedule_alternates_the_order_each_round_so_drift_is_not_a_difference() -> None:
    assert schedule(2, 4) == [(1, 0), (1, 1), (2, 1), (2, 0), (3, 0), (3, 1), (4, 1), (4, 0)]
    assert schedule(3, 2) == [(1, 0), (1, 1), (1, 2), (2, 2), (2, 1), (2, 0)]


def test_revision_rows_keep_the_given_order_and_the_subject() -> None:
    before = Revision("78c29b5", "78c29b5" + "0" * 33, "docs: before")
    after = Revision("HEAD", "e3f0ecf" + "1" * 33, "bench: after")
    rows = revision_rows([before, after])
    assert [(r.value, r.params, r.note) for r in rows] == [
        (1.0, {"rev": "78c29b5", "given": "78c29b5"}, "docs: before"),
        (2.0, {"rev": "e3f0ecf", "given": "HEAD"}, "bench: after"),
    ]


def test_versions_needs_two_revisions(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("WEBPURSE_BENCH_REVS", raising=False)
    with pytest.raises(SystemExit):
        main(["versions", "--rev", "HEAD"])
    assert "two or more revisions" in capsys.readouterr().err


def _window(
    rev: str, number: int, rate: float, server: float, database: float
) -> list[Measurement]:
    params = {"rev": rev, "round": number, "clients": 512, "seconds": 15, "workers": 2}
    return [
        Measurement(NAME, "settlement purchases/s (batched)", rate, "1/s", params),
        Measurement(NAME, "ratio batched/pgbench best", rate / 4000, "×", params),
        Measurement(NAME, "server CPU per purchase (batched)", server, "ms", params),
        Measurement(NAME, "PostgreSQL CPU per purchase (batched)", database, "ms", params),
        Measurement(NAME, "load average (1 min)", 1.5, "", {"rev": rev, "round": number}),
    ]


def test_report_shows_each_window_in_order_and_each_revisions_median() -> None:
    rows = [
        Measurement(NAME, "revision", 1.0, "", {"rev": "aaaaaaa", "given": "v1"}, "old"),
        Measurement(NAME, "revision", 2.0, "", {"rev": "bbbbbbb", "given": "HEAD"}, "new"),
        Measurement(NAME, "pgbench tps", 4000.0, "TPS", {"clients": 8, "seconds": 15}),
        Measurement(NAME, "lean purchase SQL purchases/s", 30000.0, "1/s", {"clients": 8}),
        *_window("aaaaaaa", 1, 600, 0.6, 0.7),
        *_window("bbbbbbb", 1, 800, 0.5, 0.6),
        *_window("bbbbbbb", 2, 700, 0.5, 0.6),
        *_window("aaaaaaa", 2, 500, 0.6, 0.7),
    ]
    run = Run("2026-12-06T12:20:00+00:00", "c", False, {}, [NAME], rows)
    text = render([run], plots=False)
    section = text[text.index("## Settlement code versions") :]
    assert "tpcb-like 4,000 TPS" in section
    assert "`aaaaaaa` (v1): old; `bbbbbbb` (HEAD): new" in section
    windows = [line for line in section.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert windows == [
        "| 1 | `aaaaaaa` | 600 | 0.15 | 0.6 | 0.7 | — | 1.50 |",
        "| 1 | `bbbbbbb` | 800 | 0.2 | 0.5 | 0.6 | — | 1.50 |",
        "| 2 | `bbbbbbb` | 700 | 0.175 | 0.5 | 0.6 | — | 1.50 |",
        "| 2 | `aaaaaaa` | 500 | 0.125 | 0.6 | 0.7 | — | 1.50 |",
    ]
    assert "| `aaaaaaa` | 2 | 550 | 0.138 | 0.6 | 0.7 |" in section
    assert "| `bbbbbbb` | 2 | 750 (+36 %) | 0.188 (+36 %) | 0.5 (-17 %) | 0.6 (-14 %) |" in (
        section
    )


def test_the_settlement_layout_defaults_to_workers_and_refuses_unknown_ones() -> None:
    assert layout_from_env({}) == "workers"
    assert layout_from_env({LAYOUT_ENV: " "}) == "workers"
    assert layout_from_env({LAYOUT_ENV: "balanced"}) == "balanced"
    with pytest.raises(SetupError, match="one of workers, balanced"):
        layout_from_env({LAYOUT_ENV: "roundrobin"})


def test_the_balanced_layout_balances_each_request_to_the_least_busy_process() -> None:
    config = haproxy_config(40000, [40001, 40002])
    assert "    bind 127.0.0.1:40000\n" in config
    assert "    balance leastconn\n" in config
    assert "    server settlement1 127.0.0.1:40001 check\n" in config
    assert "    server settlement2 127.0.0.1:40002 check\n" in config
    assert "ssl" not in config  # plain HTTP, as the workers layout is
    with pytest.raises(SetupError):
        haproxy_config(40000, [])


@pytest.mark.skipif(haproxy_path() is None, reason="haproxy is not installed")
def test_haproxy_accepts_the_balanced_layouts_config(tmp_path: Path) -> None:
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config(40000, [40001, 40002]))
    checked = subprocess.run(
        [str(haproxy_path()), "-c", "-q", "-f", str(path)], capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
