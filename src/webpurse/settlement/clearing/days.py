"""Business days (pure): their UTC window, which day an instant falls on, the time zone."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from webpurse.settlement.clearing.errors import ClearingError, DayNotOverError, DayOutOfRangeError

CHINA_STANDARD_TIME = timezone(timedelta(hours=8), "CST")
"""The default clearing time zone: business days are UTC+8 calendar days."""

FIRST_DAY = date(2000, 1, 1)
LAST_DAY = date(9998, 12, 31)


def check_day(day: date) -> date:
    """``day`` if clearing can handle it, else :class:`DayOutOfRangeError`."""
    if not FIRST_DAY <= day <= LAST_DAY:
        raise DayOutOfRangeError(f"day must be between {FIRST_DAY} and {LAST_DAY}")
    return day


def business_day_window(day: date, tz: tzinfo = CHINA_STANDARD_TIME) -> tuple[datetime, datetime]:
    """The UTC instants ``[start, end)`` of business day ``day`` in time zone ``tz``."""
    start = datetime.combine(day, time(0, 0), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), time(0, 0), tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def business_day_of(instant: datetime, tz: tzinfo = CHINA_STANDARD_TIME) -> date:
    """The business day an instant (naive means UTC) belongs to."""
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return instant.astimezone(tz).date()


def last_closed_day(now: datetime, tz: tzinfo = CHINA_STANDARD_TIME) -> date:
    """The most recent business day that has fully ended at ``now`` (yesterday, locally)."""
    return business_day_of(now, tz) - timedelta(days=1)


def ensure_day_over(day: date, now: datetime, tz: tzinfo = CHINA_STANDARD_TIME) -> None:
    """Raise :class:`DayNotOverError` unless business day ``day`` has ended at ``now``."""
    _, end = business_day_window(day, tz)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    if now < end:
        raise DayNotOverError(f"business day {day.isoformat()} ends at {end.isoformat()}")


def parse_timezone(text: str) -> tzinfo:
    """A clearing time zone from config: an IANA name (``Asia/Shanghai``) or ``±HH:MM``."""
    match = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", text.strip())
    if match:
        sign = 1 if match.group(1) == "+" else -1
        offset = timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))
        if offset >= timedelta(hours=24):
            raise ClearingError(f"time zone offset out of range: {text!r}")
        return timezone(sign * offset)
    try:
        return ZoneInfo(text.strip())
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ClearingError(f"unknown time zone {text!r}") from exc


def timezone_from_env(env: Mapping[str, str] | None = None) -> tzinfo:
    """``WEBPURSE_CLEARING_TZ`` (default China Standard Time, UTC+8)."""
    env = os.environ if env is None else env
    text = env.get("WEBPURSE_CLEARING_TZ", "")
    return parse_timezone(text) if text else CHINA_STANDARD_TIME


def _tz_name(tz: tzinfo) -> str:
    """An IANA zone's key, or a fixed offset as ``UTC+08:00``."""
    key = getattr(tz, "key", None)
    if isinstance(key, str):
        return key
    offset = tz.utcoffset(None)
    if offset is None:
        return str(tz)
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"UTC{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
