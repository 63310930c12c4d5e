"""The retry schedule (pure): exponential backoff with jitter, capped, given up at a maximum age."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, capped per wait, given up after ``max_age``.

    The wait after the n-th failed attempt (n ≥ 1) is ``min(cap, base · factor^(n-1))``
    scaled by a jitter factor drawn uniformly from ``[1 - jitter, 1 + jitter]``. With the
    defaults the waits are about 5 s, 10 s, 20 s, … reaching the 6 h cap after 13 attempts,
    and a message still undelivered 3 days after its event is marked failed.
    """

    base: timedelta = timedelta(seconds=5)
    factor: float = 2.0
    cap: timedelta = timedelta(hours=6)
    max_age: timedelta = timedelta(days=3)
    jitter: float = 0.2

    def next_delay(self, failed_attempts: int, unit_random: float) -> timedelta:
        """The wait before the next attempt, after ``failed_attempts`` failures.

        ``unit_random`` is a number in [0, 1) from the injected randomness.
        """
        if failed_attempts < 1:
            raise ValueError("failed_attempts counts from 1")
        exponent = min(failed_attempts - 1, 64)
        raw = min(self.cap.total_seconds(), self.base.total_seconds() * self.factor**exponent)
        scale = 1.0 - self.jitter + 2.0 * self.jitter * unit_random
        return timedelta(seconds=raw * scale)

    def next_attempt_at(
        self, first_created_at: datetime, now: datetime, failed_attempts: int, unit_random: float
    ) -> datetime | None:
        """When to try again, or ``None`` when the message has run out of time (give up)."""
        at = now + self.next_delay(failed_attempts, unit_random)
        if at - first_created_at > self.max_age:
            return None
        return at
