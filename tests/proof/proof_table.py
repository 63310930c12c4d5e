"""The proof table: every proof scenario records one row, a renderer turns them into Markdown.

A row says what a scenario is, what the system must do (``expected``), what it did
(``observed``) and whether the test's assertions held. Rows go to
``artifacts/proof/<suite>.jsonl`` (one file per suite, so suites written by different
people or run separately never clobber each other); a row replaces the earlier row of the
same scenario, so running a few tests updates just their rows (delete a suite's file to
start it afresh).
``python -m tests.proof.render`` (also run at the end of any pytest session that recorded
rows) writes the table into ``docs/proof.md``.

Use it through the ``proof`` fixture (``tests/proof/conftest.py``)::

    with proof.row("faults", "purchase: card removed after DEBIT", expected="paid once") as row:
        ...                       # the scenario and its assertions
        row.observed = "paid, card 8750, ledger ok"

A row passes exactly when the block finishes without an exception; an exception records
the row as failed (its message is the observation) and propagates, so pytest fails too.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS: Path = Path(os.environ.get("WEBPURSE_PROOF_DIR", ROOT / "artifacts" / "proof"))

_started: set[str] = set()


@dataclass
class Row:
    suite: str
    scenario: str
    expected: str
    observed: str = ""
    passed: bool = False
    seconds: float = 0.0
    recorded_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def suite_file(suite: str) -> Path:
    if not suite or not all(c.isalnum() or c in "-_" for c in suite):
        raise ValueError(f"suite names are [A-Za-z0-9_-]+, got {suite!r}")
    return ARTIFACTS / f"{suite}.jsonl"


def _line(row: Row) -> str:
    return json.dumps(asdict(row), ensure_ascii=False, sort_keys=True) + "\n"


def record(row: Row) -> Row:
    """Append ``row`` to its suite's file; it replaces an earlier row of the same scenario.

    The first write of a process compacts the file (one row per scenario), so a run of a
    few tests updates their rows and keeps the others.
    """
    row.recorded_at = row.recorded_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    path = suite_file(row.suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    if row.suite not in _started and path.exists():
        kept = load_rows(path.parent).get(row.suite, [])
        path.write_text("".join(_line(r) for r in kept), encoding="utf-8")
    _started.add(row.suite)
    with path.open("a", encoding="utf-8") as out:
        out.write(_line(row))
    return row


def recorded_this_process() -> bool:
    return bool(_started)


@contextmanager
def proof_row(suite: str, scenario: str, expected: str, **extra: Any) -> Iterator[Row]:
    """Run one scenario; record it as passed if the block completes, failed if it raises."""
    row = Row(suite=suite, scenario=scenario, expected=expected, extra=dict(extra))
    started = time.perf_counter()
    try:
        yield row
    except BaseException as exc:
        row.passed = False
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row.observed = f"FAILED: {type(exc).__name__}: {message}"[:300]
        row.seconds = round(time.perf_counter() - started, 3)
        record(row)
        raise
    row.passed = True
    row.seconds = round(time.perf_counter() - started, 3)
    record(row)


def load_rows(directory: Path = ARTIFACTS) -> dict[str, list[Row]]:
    """Every suite's rows, the last row of a repeated scenario winning."""
    suites: dict[str, list[Row]] = {}
    for path in sorted(directory.glob("*.jsonl")):
        by_scenario: dict[str, Row] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                raw = json.loads(line)
                row = Row(**raw)
                by_scenario[row.scenario] = row
        if by_scenario:
            suites[path.stem] = list(by_scenario.values())
    return suites
