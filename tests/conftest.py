"""What every test shares: logging configuration does not leak from one test to the next.

A CLI command run in process (``CliRunner``) configures structlog and the root logger for
its "process" (``webpurse.settlement.logs.configure_logging``, e.g. WARNING for
``ledger check``); a later test that captures INFO events would then see none.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _logging_configuration_is_per_test() -> Iterator[None]:
    saved = structlog.get_config()
    root_level = logging.getLogger().level
    yield
    structlog.configure(**saved)
    logging.getLogger().setLevel(root_level)
