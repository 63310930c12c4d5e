"""Structured logs: structlog JSON lines with the request id bound per request."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


class _StderrLoggerFactory:
    """Looks ``sys.stderr`` up when a logger is made, so a swapped stream is followed."""

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        return structlog.PrintLogger(sys.stderr)


def configure_logging(level: int = logging.INFO) -> None:
    """JSON lines on stderr, filtered at ``level``."""
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=level)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_StderrLoggerFactory(),
        cache_logger_on_first_use=False,
    )
