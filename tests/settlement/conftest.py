"""Fixtures of the settlement core tests (see support.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.settlement.support import BACKENDS, World, database_url, make_world


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    with database_url(backend, tmp_path) as url:
        yield url


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    with make_world(db_url) as w:
        yield w


@pytest.fixture(autouse=True)
def _restore_logging_configuration() -> Iterator[None]:
    """The CLI configures structlog globally (WARNING); later tests capture INFO events."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
