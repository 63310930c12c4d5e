"""The benchmark harness: measurements, statistics, run metadata and ``results.json``.

Every benchmark module exposes ``run(ctx: Context) -> list[Measurement]``. A benchmark
that cannot run yet (a part of the system not built, a service not reachable) returns
rows made by :func:`not_measured` with the reason: the report shows the reason, never a
made-up number. The pure helpers here (statistics, formatting, the results file) are
tested in ``tests/bench``; the benchmarks themselves are not part of ``make test``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS_FILE = ROOT / "bench" / "results.json"

Params = dict[str, str | int | float | bool]


@dataclass(frozen=True)
class Measurement:
    """One number (or one honest "not measured yet") of one benchmark.

    ``metric`` names what was measured (``purchase_mac1``), ``params`` the conditions
    (``{"clients": 8}``), ``value`` is ``None`` exactly when ``note`` says why.
    """

    benchmark: str
    metric: str
    value: float | None
    unit: str
    params: Params = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Measurement:
        return cls(
            benchmark=str(raw["benchmark"]),
            metric=str(raw["metric"]),
            value=None if raw.get("value") is None else float(raw["value"]),
            unit=str(raw.get("unit", "")),
            params=dict(raw.get("params") or {}),
            note=str(raw.get("note", "")),
        )

    @property
    def measured(self) -> bool:
        return self.value is not None


_T = TypeVar("_T")


def run_async(main: Coroutine[Any, Any, _T]) -> _T:
    """Run a bench's client the way the shop's own server runs it: on uvloop where it is
    installed (uvicorn's ``loop="auto"``, which ``webpurse.listen`` keeps, picks it), else
    on asyncio's own loop. The shoppers' side of a window is the merchant's batcher, so it
    is measured on the merchant's event loop (issue 20)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the lock
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def not_measured(benchmark: str, metric: str, unit: str, reason: str, **params: Any) -> Measurement:
    """A row that says why there is no number (yet)."""
    return Measurement(benchmark, metric, None, unit, dict(params), f"not measured yet: {reason}")


# --- statistics -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be within 0..100")
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = math.ceil(position)
    fraction = position - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


@dataclass(frozen=True)
class Summary:
    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


def summarise(values: Sequence[float]) -> Summary:
    if not values:
        raise ValueError("summary of no values")
    return Summary(
        count=len(values),
        mean=sum(values) / len(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
        max=float(max(values)),
    )


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the base is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def format_value(value: float | None, unit: str = "") -> str:
    """Human figures: three significant digits, thousands separators for big numbers."""
    if value is None:
        return "—"
    if value == 0:
        text = "0"
    elif abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip() if unit else text


# --- timing -----------------------------------------------------------------------------


Clock = Callable[[], float]


def measure_rate(
    operation: Callable[[], object],
    *,
    min_seconds: float = 1.0,
    min_operations: int = 10,
    clock: Clock = time.perf_counter,
    max_operations: int | None = None,
) -> tuple[int, float]:
    """Run ``operation`` until ``min_seconds`` passed and at least ``min_operations`` ran.

    Returns ``(operations, seconds)``; the rate is their quotient. The loop checks the
    clock in growing batches so the clock's own cost stays out of fast operations.
    """
    operations = 0
    batch = 1
    started = clock()
    elapsed = 0.0
    while True:
        for _ in range(batch):
            operation()
        operations += batch
        elapsed = clock() - started
        if max_operations is not None and operations >= max_operations:
            break
        if elapsed >= min_seconds and operations >= min_operations:
            break
        # Size the next batch to take about a twentieth of the window, so slow operations
        # (an fsync) never overshoot it by much and fast ones rarely read the clock.
        per_operation = elapsed / operations
        target = min_seconds / 20
        fits = 4096 if per_operation <= 0 else int(target / per_operation)
        batch = max(1, min(batch * 2, 4096, fits))
        if max_operations is not None:
            batch = max(1, min(batch, max_operations - operations))
    return operations, elapsed


# --- run metadata ------------------------------------------------------------------------


def git_commit(root: Path = ROOT) -> tuple[str, bool]:
    """The checked-out commit and whether tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                # only what can change the numbers: the code under test and the benchmarks
                [
                    *("git", "status", "--porcelain", "--untracked-files=no", "--"),
                    *("src", "bench", ":!bench/results.json", ":!bench/*.txt"),
                    ":!bench/findings.md",
                ],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, dirty


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "load_average": load_average(),
    }


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: how busy the (shared) machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# --- results file -----------------------------------------------------------------------


@dataclass
class Run:
    """One ``python -m bench`` invocation: metadata and every measurement it made."""

    date: str
    commit: str
    dirty: bool
    machine: dict[str, Any]
    benchmarks: list[str]
    measurements: list[Measurement] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "commit": self.commit,
            "dirty": self.dirty,
            "machine": self.machine,
            "benchmarks": self.benchmarks,
            "seconds": round(self.seconds, 1),
            "measurements": [m.to_json() for m in self.measurements],
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Run:
        return cls(
            date=str(raw["date"]),
            commit=str(raw.get("commit", "unknown")),
            dirty=bool(raw.get("dirty", False)),
            machine=dict(raw.get("machine") or {}),
            benchmarks=[str(b) for b in raw.get("benchmarks", [])],
            measurements=[Measurement.from_json(m) for m in raw.get("measurements", [])],
            seconds=float(raw.get("seconds", 0.0)),
        )

    @classmethod
    def start(cls, benchmarks: list[str], now: dt.datetime | None = None) -> Run:
        commit, dirty = git_commit()
        when = now or dt.datetime.now(dt.UTC)
        return cls(
            date=when.isoformat(timespec="seconds"),
            commit=commit,
            dirty=dirty,
            machine=machine_info(),
            benchmarks=benchmarks,
        )


def load_runs(path: Path = RESULTS_FILE) -> list[Run]:
    if not path.exists():
        return []
    raw = json.loads(path.read_text(encoding="utf-8"))
    return [Run.from_json(r) for r in raw.get("runs", [])]


def append_run(run: Run, path: Path = RESULTS_FILE) -> None:
    """Append ``run`` to the results file (atomically replaced, never half-written)."""
    runs = load_runs(path)
    runs.append(run)
    payload = {"format": 1, "runs": [r.to_json() for r in runs]}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def latest_by_benchmark(runs: Sequence[Run]) -> dict[str, tuple[Run, list[Measurement]]]:
    """For each benchmark, the most recent run that ran it and that run's rows for it."""
    latest: dict[str, tuple[Run, list[Measurement]]] = {}
    for run in runs:
        for name in run.benchmarks:
            rows = [m for m in run.measurements if m.benchmark == name]
            latest[name] = (run, rows)
    return latest


# --- progress and context ----------------------------------------------------------------


class Context:
    """What a benchmark gets: a console, Rich progress, the ``quick`` switch, and the git
    revisions to compare (``--rev``; only the ``versions`` benchmark reads them)."""

    def __init__(
        self,
        console: Console,
        progress: Progress,
        *,
        quick: bool = False,
        revisions: Sequence[str] = (),
    ) -> None:
        self.console = console
        self.progress = progress
        self.quick = quick
        self.revisions = tuple(revisions)

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
        """A progress bar; yields ``advance(n=1)``."""
        task_id = self.progress.add_task(description, total=total)

        def advance(n: float = 1) -> None:
            self.progress.advance(task_id, n)

        try:
            yield advance
        finally:
            self.progress.update(task_id, completed=total if total is not None else 1, total=total)
            self.progress.stop_task(task_id)

    def log(self, message: str) -> None:
        self.progress.console.log(message)

    def seconds(self, full: float) -> float:
        """A measuring window: ``full`` normally, a tenth of it (at least 0.2 s) when quick."""
        return max(0.2, full / 10) if self.quick else full


def make_progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
