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


# The suites run against both security modules; on the token only with SQLite, which keeps
# the extra time small (the token does the same work whatever the database).
BOTH_MODULES = {"test_payments", "test_loads", "test_refunds"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "world" not in metafunc.fixturenames:
        return
    if metafunc.module.__name__.rsplit(".", 1)[-1] not in BOTH_MODULES:
        return
    metafunc.parametrize(
        "security_module",
        ["software", pytest.param("pkcs11", marks=pytest.mark.pkcs11)],
        indirect=True,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Drop token x PostgreSQL: the token's work does not depend on the database."""
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        chosen = params.params if params is not None else {}
        if chosen.get("security_module") == "pkcs11" and chosen.get("backend") == "postgresql":
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def security_module(request: pytest.FixtureRequest) -> str:
    """software, unless the test is parametrised over the module (see above)."""
    return str(getattr(request, "param", "software"))


@pytest.fixture
def migrated_db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database already at the migrations' head (cloned from a migrated template)."""
    with database_url(backend, tmp_path, migrated=True) as url:
        yield url


@pytest.fixture
def world(migrated_db_url: str, security_module: str) -> Iterator[World]:
    with make_world(migrated_db_url, security_module=security_module) as w:
        yield w


@pytest.fixture(autouse=True)
def _restore_logging_configuration() -> Iterator[None]:
    """The CLI configures structlog globally (WARNING); later tests capture INFO events."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
