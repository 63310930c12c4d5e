"""``python -m bench [NAME ...] [--quick] [--rev REV ...]``: run benchmarks, record them,
rewrite the report.

With no name every benchmark runs, in the order below (``settlement`` runs ``pgbench``
itself, side by side, so the ratio is from one run; so does ``processes``, settlement
with 1, 2 and 4 server processes; ``versions`` runs only when git revisions are given,
each revision's settlement server side by side in one run). Results are appended to
``bench/results.json``; ``docs/performance.md`` and ``docs/img/*.png`` are regenerated
from that file (``--report-only`` does just that).
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import IO

from rich.console import Console

from bench.harness import (
    RESULTS_FILE,
    Context,
    Measurement,
    Run,
    append_run,
    format_value,
    load_average,
    load_runs,
    make_progress,
)

# name -> module in this package; each has ``run(ctx) -> list[Measurement]``.
BENCHMARKS: dict[str, str] = {
    "micro": "bench.micro",
    "pgbench": "bench.pgbench",
    "settlement": "bench.settlement",
    "processes": "bench.processes",
    "latency": "bench.latency",
    "scale": "bench.scale",
    "pn532": "bench.pn532",
    "security": "bench.security",
    "rtt": "bench.rtt",
    "versions": "bench.versions",
    "batch_cost": "bench.batch_cost",
}
# What a bare ``python -m bench`` runs (``settlement`` includes its own pgbench runs).
DEFAULT = ["micro", "security", "settlement", "processes", "latency", "scale", "pn532", "rtt"]
# ``versions`` compares git revisions of settlement side by side; it runs when revisions
# are given (``--rev`` twice or more, or ``WEBPURSE_BENCH_REVS="78c29b5 HEAD"``).
REVISIONS_ENV = "WEBPURSE_BENCH_REVS"


def _run_one(name: str, ctx: Context) -> list[Measurement]:
    try:
        module = importlib.import_module(BENCHMARKS[name])
        rows: list[Measurement] = module.run(ctx)
    except Exception as exc:  # a broken benchmark must not lose the others' numbers
        ctx.console.print(traceback.format_exc(), style="red")
        return [Measurement(name, "run", None, "", {}, f"failed: {type(exc).__name__}: {exc}")]
    return rows


def _single_run_lock() -> IO[bytes] | None:
    """One benchmark run per machine: two would drop each other's databases."""
    handle = (Path(tempfile.gettempdir()) / "webpurse-bench.lock").open("a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle  # held (and the lock with it) until the process exits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*BENCHMARKS, []], metavar="NAME")
    parser.add_argument("--quick", action="store_true", help="short windows (smoke test)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report")
    parser.add_argument("--no-save", action="store_true", help="do not append to results.json")
    parser.add_argument(
        "--rev",
        action="append",
        dest="revisions",
        metavar="REV",
        help=f"a git revision for `versions` (repeat: before, after; default ${REVISIONS_ENV})",
    )
    args = parser.parse_args(argv)
    revisions: list[str] = args.revisions or os.environ.get(REVISIONS_ENV, "").split()
    console = Console()

    from bench import report

    if args.report_only:
        report.write(load_runs())
        console.print(f"wrote {report.REPORT_FILE}")
        return 0

    names = list(args.names) or ([*DEFAULT, "versions"] if revisions else DEFAULT)
    if "versions" in names and len(revisions) < 2:
        parser.error(
            f"versions compares two or more revisions: --rev A --rev B (or ${REVISIONS_ENV})"
        )
    lock = _single_run_lock()
    if lock is None:
        console.print("another `python -m bench` is running (it owns the bench databases)")
        return 1
    run = Run.start(names)
    started = time.perf_counter()
    with make_progress(console) as progress:
        ctx = Context(console, progress, quick=args.quick, revisions=revisions)
        for name in names:
            rows = _run_one(name, ctx)
            run.measurements.extend(rows)
            for row in rows:
                params = " ".join(f"{k}={v}" for k, v in row.params.items())
                shown = format_value(row.value, row.unit) if row.measured else row.note
                progress.console.print(
                    f"  {name:10} {row.metric} {params}: {shown}", soft_wrap=True
                )
    run.seconds = time.perf_counter() - started
    run.machine["load_average_end"] = load_average()
    if args.quick:
        console.print("--quick: results not saved (smoke test)")
        return 0
    if not args.no_save:
        append_run(run)
        report.write(load_runs())
        console.print(f"appended to {RESULTS_FILE}; wrote {report.REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
