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
