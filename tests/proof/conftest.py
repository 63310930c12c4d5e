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
_fault_seconds: list[float] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "/test_faults_" in report.nodeid.replace("\\", "/"):
        _fault_seconds.append(report.duration)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _fault_seconds:
        return
    total = sum(_fault_seconds)
    verdict = "within" if total <= FAULT_BUDGET_SECONDS else "OVER"
    terminalreporter.write_line(
        f"fault matrix: {total:.0f} s of setup+call+teardown, {verdict} its "
        f"{FAULT_BUDGET_SECONDS:.0f} s budget"
    )
