"""Clearing failures: the exception classes and their stable machine codes."""

from __future__ import annotations


class ClearingError(Exception):
    """Base class of clearing failures; ``code`` is the stable machine code."""

    code = "clearing_error"


class DayNotOverError(ClearingError):
    """A batch was asked for a business day that has not ended yet."""

    code = "day_not_over"


class OutOfOrderError(ClearingError):
    """A batch was asked for a day before the merchant's latest batch."""

    code = "clearing_out_of_order"


class UnknownMerchantError(ClearingError):
    """No merchant with that id."""

    code = "unknown_merchant"


class DayOutOfRangeError(ClearingError):
    """A business day outside the years clearing handles (2000-9998)."""

    code = "day_out_of_range"
