"""Waiting for bytes until asked to stop: the loop both card servers (vpcd, PN532 pty) run."""

from __future__ import annotations

import selectors
from collections.abc import Callable, Iterator
from typing import Any


def readable_until_stopped(source: Any, wake: Any, stopping: Callable[[], bool]) -> Iterator[None]:
    """Yield each time ``source`` has bytes to read; return as soon as ``wake`` does (a
    ``stop()`` wrote to it, safe from a signal handler) or ``stopping()`` is true."""
    with selectors.DefaultSelector() as selector:
        selector.register(source, selectors.EVENT_READ, "source")
        selector.register(wake, selectors.EVENT_READ, "stop")
        while not stopping():
            ready = selector.select()
            if any(key.data == "stop" for key, _ in ready):
                return
            yield
