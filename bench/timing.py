"""Timing hooks attached from outside: wrappers around a reader and a settlement client,
and SQLAlchemy event listeners on the settlement engine. Nothing in webpurse is edited.

Every timer adds to a :class:`StageClock`; a purchase reads its clock's totals and resets
it. Purchases run one at a time, so wall-clock sums per stage are exact.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event

from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.base import CardInfo, Reader, Step
from webpurse.reader.sim import ApduEvent, Phase, SimReader


@dataclass
class StageClock:
    """Seconds spent per stage, and counters (APDUs, round trips, HTTP calls)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] += seconds

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] += n

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        """The totals so far; the clock starts again from zero."""
        seconds, counts = dict(self.seconds), dict(self.counts)
        self.seconds.clear()
        self.counts.clear()
        return seconds, counts


class TimedReader:
    """A :class:`Reader` that times ``transmit`` into ``stage`` and counts batches/APDUs."""

    def __init__(self, inner: Reader, clock: StageClock, stage: str) -> None:
        self._inner = inner
        self._clock = clock
        self._stage = stage

    @property
    def name(self) -> str:
        return self._inner.name

    async def wait_for_card(self, timeout: float) -> CardInfo:
        return await self._inner.wait_for_card(timeout)

    async def wait_for_removal(self, timeout: float) -> None:
        await self._inner.wait_for_removal(timeout)

    async def transmit(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        started = time.perf_counter()
        try:
            return await self._inner.transmit(batch)
        finally:
            self._clock.add(self._stage, time.perf_counter() - started)
            self._clock.count(f"{self._stage} batches")
            self._clock.count(f"{self._stage} steps", len(batch))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def time_card(sim: SimReader, clock: StageClock) -> None:
    """Time the emulator's own processing of every APDU through ``sim``'s hooks."""
    started: list[float] = [0.0]

    def hook(apdu_event: ApduEvent) -> None:
        if apdu_event.phase is Phase.BEFORE:
            started[0] = time.perf_counter()
        else:
            clock.add("card", time.perf_counter() - started[0])
            clock.count("apdus")

    sim.add_hook(hook)


class TimedSettlement:
    """Wraps a settlement client: every coroutine method is timed into ``settlement``."""

    def __init__(self, inner: Any, clock: StageClock) -> None:
        self._inner = inner
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attribute(*args, **kwargs)
            finally:
                self._clock.add("settlement", time.perf_counter() - started)
                self._clock.count("settlement calls")

        return timed


def time_database(engine: Engine, clock: StageClock) -> None:
    """Time every statement and every commit/rollback the settlement engine runs.

    Statements through SQLAlchemy's cursor events; commits by wrapping this engine's
    dialect instance (there is no "after commit" event).
    """

    @event.listens_for(engine, "before_cursor_execute")
    def _before(
        conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any
    ) -> None:
        conn.info["bench_started"] = time.perf_counter()

    @event.listens_for(engine, "after_cursor_execute")
    def _after(
        conn: Any, cursor: Any, statement: Any, params: Any, context: Any, many: Any
    ) -> None:
        started = conn.info.pop("bench_started", None)
        if started is not None:
            clock.add("database", time.perf_counter() - started)
            clock.count("statements")

    dialect = engine.dialect
    # A rollback is mostly the pool's reset-on-return after each commit: one round trip.
    for name, counter in (("do_commit", "commits"), ("do_rollback", "rollbacks")):
        original = getattr(dialect, name)

        def timed(
            dbapi_connection: Any, _original: Any = original, _counter: str = counter
        ) -> None:
            started = time.perf_counter()
            try:
                _original(dbapi_connection)
            finally:
                clock.add("database", time.perf_counter() - started)
                clock.count(_counter)

        setattr(dialect, name, timed)
