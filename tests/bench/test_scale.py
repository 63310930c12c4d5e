"""The scale benchmark's arithmetic."""

from __future__ import annotations

import os

import pytest

from bench.scale import per_connection_kib, rss_mib


def test_memory_per_connection_from_two_readings() -> None:
    assert per_connection_kib(100.0, 150.0, 1000) == pytest.approx(51.2)


def test_memory_per_connection_needs_connections() -> None:
    with pytest.raises(ValueError):
        per_connection_kib(100.0, 150.0, 0)


def test_rss_of_this_process_is_positive() -> None:
    assert rss_mib(os.getpid()) > 1
