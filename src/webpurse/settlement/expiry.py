"""Expiry of stale payments and loads: a sweep with the clock injected.

- ``requires_card`` older than ``requires_card_ttl``: ``expired`` (loads return their funds),
  told to the merchant like every other change: ``payment.expired`` (loads: ``load.failed``);
  refunds and funded bank-transfer top-ups wait for their card however long it takes;
- ``requires_funding`` (an unpaid bank-transfer order) past its ``expires_at``: ``expired``;
- ``authorised`` older than ``authorised_ttl``: ``uncertain`` — after MAC1 (or MAC2) was
  issued a DEBIT (or CREDIT) may have reached the card, so nothing is guessed; the card's
  next contact or its proof settles it (spec §6).

An open payment or load that has held its card longer than ``card_hold_ttl`` (from its
authorisation) frees the card for other merchants (:func:`holds.release_stale`).

A refund left ``pending`` with a load that ended (by a version before refunds failed with
their load) is failed, its amount back in the payable (:func:`refunds.heal_stuck`).

The same sweep forgets idempotency keys after their retention and delivered webhooks after
theirs (:func:`webpurse.settlement.webhooks.prune_delivered`).

:func:`sweep` runs it in small committed chunks (at most :data:`CHUNK` rows of each kind per
transaction): one transaction over thousands of stale rows would hold ``held:loads`` and
the merchants' accounts for its whole length, stalling every other merchant's creates behind
it (issue 19, finding 4). :func:`expire_stale` is one chunk, in the caller's transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import structlog
from fastapi import FastAPI
from sqlalchemy import Select, select, true
from sqlalchemy.orm import Session

from webpurse.settlement import holds, idempotency, loads, payments, refunds, webhooks
from webpurse.settlement.auth import OPERATOR, Principal
from webpurse.settlement.leader import SWEEP_JOB, Leadership
from webpurse.settlement.models import Load, Payment
from webpurse.settlement.security import SecurityModule
from webpurse.settlement.service import Ctx
from webpurse.settlement.transactions import Status

log = structlog.get_logger(__name__)

SYSTEM = Principal(role=OPERATOR, key_id="system")


class _NoKeys:
    """The sweep never needs a key; touching one is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("the expiry sweep must not use the security module")


CHUNK = 200
"""At most this many rows of each kind change per sweep transaction."""


@dataclass(frozen=True)
class SweepReport:
    payments_expired: int = 0
    payments_uncertain: int = 0
    loads_expired: int = 0
    loads_uncertain: int = 0
    chunks: int = 1

    def __add__(self, other: SweepReport) -> SweepReport:
        return SweepReport(
            self.payments_expired + other.payments_expired,
            self.payments_uncertain + other.payments_uncertain,
            self.loads_expired + other.loads_expired,
            self.loads_uncertain + other.loads_uncertain,
            self.chunks + other.chunks,
        )

    def most(self) -> int:
        """The largest count of one kind: a chunk that reached its limit may have left more."""
        return max(
            self.payments_expired, self.payments_uncertain, self.loads_expired, self.loads_uncertain
        )

    def to_json(self) -> dict[str, int]:
        return {
            "payments_expired": self.payments_expired,
            "payments_uncertain": self.payments_uncertain,
            "loads_expired": self.loads_expired,
            "loads_uncertain": self.loads_uncertain,
        }


S = TypeVar("S", bound="Select[Any]")


def _claim(statement: S) -> S:
    """Lock the rows the sweep will change and read them afresh.

    A request may authorise or capture the same row while the sweep runs: without the lock
    the sweep would act on a stale status (expire a load whose MAC2 just left, turn a
    succeeded payment back into uncertain). Rows a request holds are skipped this pass
    (PostgreSQL ``SKIP LOCKED``); SQLite serialises writers, so there it changes nothing.
    """
    return statement.with_for_update(skip_locked=True).execution_options(populate_existing=True)


def _claim_first(limit: int | None, statement: S) -> S:
    """:func:`_claim`, the oldest ``limit`` rows first."""
    entity = statement.column_descriptions[0]["entity"]
    ordered = statement.order_by(entity.created_at, entity.id)
    return _claim(ordered if limit is None else ordered.limit(limit))


def _housekeeping(ctx: Ctx, card_hold_ttl: dt.timedelta, purge_chunk: int | None = None) -> int:
    """Free cards held past the bound, fail refunds left stuck, purge what has aged out.

    Forgets at most ``purge_chunk`` idempotency keys (``idempotency.PURGE_CHUNK``) and
    returns how many: :func:`sweep` goes on in further committed chunks while that many.
    """
    holds_released, holds_unblocked = holds.release_stale(ctx, card_hold_ttl)
    if holds_released or holds_unblocked:
        log.warning("sweep.holds", released=holds_released, unblocked=holds_unblocked)
    refunds_failed = refunds.heal_stuck(ctx)  # left pending by an older version
    if refunds_failed:
        log.warning("sweep.refunds_failed", count=refunds_failed)
    purged = idempotency.purge(ctx.session, ctx.now, limit=purge_chunk)
    webhooks.prune_delivered(ctx.session, ctx.now)
    return purged


def sweep(
    session_factory: Callable[[], Session],
    now: dt.datetime,
    *,
    requires_card_ttl: dt.timedelta,
    authorised_ttl: dt.timedelta,
    card_hold_ttl: dt.timedelta = dt.timedelta(hours=1),
    chunk: int = CHUNK,
    purge_chunk: int = idempotency.PURGE_CHUNK,
) -> SweepReport:
    """Expire everything stale at ``now`` in committed chunks of at most ``chunk`` rows each.

    Each chunk is its own short transaction, so the locks a chunk takes (the held accounts,
    the merchants' payables) are released after ``chunk`` rows and other merchants' requests
    run between chunks. Ends when a chunk finds fewer than ``chunk`` rows of every kind
    (rows a request holds are skipped and left for the next sweep); then the housekeeping
    (cards held past ``card_hold_ttl``, stuck refunds of old, idempotency keys, delivered
    webhooks) runs in one more short transaction, and old idempotency keys are forgotten
    in further committed chunks of at most ``purge_chunk`` until a chunk finds fewer.
    """
    if chunk < 1:
        raise ValueError("a sweep chunk holds at least one row")
    total: SweepReport | None = None
    while True:
        with session_factory() as session, session.begin():
            report = expire_stale(
                session,
                now,
                requires_card_ttl=requires_card_ttl,
                authorised_ttl=authorised_ttl,
                limit=chunk,
                housekeeping=False,
            )
        total = report if total is None else total + report
        if report.most() < chunk:
            break
    with session_factory() as session, session.begin():
        ctx = Ctx(session, cast(SecurityModule, _NoKeys()), now, SYSTEM)
        purged = forgotten = _housekeeping(ctx, card_hold_ttl, purge_chunk)
    while purged == purge_chunk:
        with session_factory() as session, session.begin():
            purged = idempotency.purge(session, now, limit=purge_chunk)
        forgotten += purged
    log.info("sweep.finished", **total.to_json(), chunks=total.chunks, keys_forgotten=forgotten)
    return total


def expire_stale(
    session: Session,
    now: dt.datetime,
    *,
    requires_card_ttl: dt.timedelta,
    authorised_ttl: dt.timedelta,
    card_hold_ttl: dt.timedelta = dt.timedelta(hours=1),
    limit: int | None = None,
    housekeeping: bool = True,
) -> SweepReport:
    """Run one sweep (at most ``limit`` rows of each kind) in the caller's transaction.

    Returns what it changed; a count equal to ``limit`` means more may be left (see
    :func:`sweep`). ``housekeeping`` also frees cards held past ``card_hold_ttl``, fails
    refunds an older version left stuck, and purges idempotency keys and delivered webhooks.
    """
    ctx = Ctx(session, cast(SecurityModule, _NoKeys()), now, SYSTEM)
    created_before = now - requires_card_ttl
    authorised_before = now - authorised_ttl
    # (what it counts, the rows, the lifecycle step): run in this order, each query after
    # the previous step's changes.
    steps: list[tuple[str, Any, Callable[[Any], None]]] = [
        (
            "pe",
            select(Payment).where(
                Payment.awaiting_card == true(),  # ix_payments_merchant_open
                Payment.status == Status.REQUIRES_CARD,
                Payment.created_at < created_before,
            ),
            lambda payment: payments.expire(ctx, payment),
        ),
        (
            "pu",
            select(Payment).where(
                Payment.id.in_(holds.held_before(authorised_before)),
                Payment.status == Status.AUTHORISED,
            ),
            lambda payment: payments.mark_uncertain(ctx, payment),
        ),
        (
            "le",
            select(Load).where(
                Load.status == Status.REQUIRES_CARD,
                Load.created_at < created_before,
                # a refund waits for the card's next online contact, however long that takes;
                # so does a top-up the cardholder paid for by bank transfer
                Load.refund_id.is_(None),
                Load.funding_method != "bank_transfer",
            ),
            lambda load: loads.expire(ctx, load),
        ),
        (  # an unpaid bank-transfer order: nothing was held
            "le",
            select(Load).where(Load.status == Status.REQUIRES_FUNDING, Load.expires_at <= now),
            lambda load: loads.expire(ctx, load),
        ),
        (
            "lu",
            select(Load).where(
                Load.status == Status.AUTHORISED, Load.authorised_at < authorised_before
            ),
            lambda load: loads.mark_uncertain(ctx, load),
        ),
    ]
    counts = {"pe": 0, "pu": 0, "le": 0, "lu": 0}
    for key, rows, step in steps:
        for row in session.scalars(_claim_first(limit, rows)):
            step(row)
            counts[key] += 1
    if housekeeping:
        _housekeeping(ctx, card_hold_ttl)
    report = SweepReport(counts["pe"], counts["pu"], counts["le"], counts["lu"])
    log.info("sweep.done", **report.to_json())
    return report


@asynccontextmanager
async def sweeper_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run :func:`expire_stale` every ``settings.sweep_interval`` seconds while serving."""
    state = app.state.settlement
    settings = state.settings
    if settings.sweep_interval <= 0:
        yield
        return

    def sweep_once() -> None:
        sweep(
            state.session_factory,
            state.clock(),
            requires_card_ttl=settings.requires_card_ttl,
            authorised_ttl=settings.authorised_ttl,
            card_hold_ttl=settings.card_hold_ttl,
        )

    # One process at a time sweeps, however many share the database (leader.py).
    leadership = Leadership(state.engine, SWEEP_JOB)

    async def loop() -> None:
        while True:
            await asyncio.sleep(settings.sweep_interval)  # a periodic timer
            try:
                if await asyncio.to_thread(leadership.lead):
                    await asyncio.to_thread(sweep_once)
                    log.info("sweep.tick", pid=os.getpid())
            except Exception:  # keep sweeping; the next round retries
                log.exception("sweep.failed")

    task = asyncio.create_task(loop(), name="settlement-sweeper")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.to_thread(leadership.release)
