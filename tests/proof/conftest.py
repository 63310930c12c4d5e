"""Fixtures of the proof suites: the proof table, and rendering it when the session ends."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytest

from tests.proof import proof_table
from tests.proof.proof_table import Row, proof_row


class Proof:
    """``proof.row(suite, scenario, expected=...)``: see :mod:`tests.proof.proof_table`."""

    row: Callable[..., AbstractContextManager[Row]] = staticmethod(proof_row)


@pytest.fixture
def proof() -> Proof:
    return Proof()


def pytest_sessionfinish(session: pytest.Session, exitstatus: Any) -> None:
    """Render docs/proof.md from the rows, if this session recorded any."""
    if proof_table.recorded_this_process():
        from tests.proof.render import render

        render()


# --- the fault matrix's time budget --------------------------------------------------

FAULT_BUDGET_SECONDS = 240.0  # the whole fault matrix, on 2 cores (ARCHITECTURE.md "Testing")
_fault_seconds: dict[str, float] = {}  # per suite (test_faults_*.py): setup+call+teardown


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.replace("\\", "/").split("::", 1)[0]
    name = path.rsplit("/", 1)[-1].removesuffix(".py")
    if name.startswith("test_faults_"):
        _fault_seconds[name] = _fault_seconds.get(name, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _fault_seconds:
        return
    total = sum(_fault_seconds.values())
    verdict = "within" if total <= FAULT_BUDGET_SECONDS else "OVER"
    terminalreporter.write_line(
        f"fault matrix: {total:.0f} s of setup+call+teardown, {verdict} its "
        f"{FAULT_BUDGET_SECONDS:.0f} s budget"
    )
    for suite, seconds in sorted(_fault_seconds.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"  {suite}: {seconds:.0f} s")
