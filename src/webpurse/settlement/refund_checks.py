"""Refunds that can no longer be delivered, and the ledger check's refund rule.

Queries only (models in, findings out), below :mod:`.ledger` and :mod:`.refunds`: the ledger
check calls :func:`open_refund_problems` without importing the refund service.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from webpurse.settlement.models import Load, Refund
from webpurse.settlement.transactions import OPEN, Status
from webpurse.settlement.transactions import RETURNED as RETURNED

REFUNDS_PENDING = "refunds:pending"
"""The ledger account pending refunds wait in (``ledger.REFUNDS_PENDING``)."""

LIVE_LOAD = (Status.REQUIRES_CARD, *OPEN)


def stuck(session: Session) -> list[tuple[Refund, Load | None]]:
    """Pending refunds whose load can no longer deliver them (left by an older version)."""
    rows = session.execute(
        select(Refund, Load)
        .outerjoin(Load, Load.id == Refund.load_id)
        .where(Refund.status == Status.PENDING)
        .where((Load.id.is_(None)) | (Load.status.not_in(LIVE_LOAD)))
        .order_by(Refund.id)
    ).all()
    return [(refund, load) for refund, load in rows]


def open_refund_problems(session: Session, refunds_pending: int) -> list[str]:
    """``refunds:pending`` against the refunds actually open (for ``ledger check``).

    A pending refund's amount is in ``held:loads`` while its load is in flight; nothing else
    may sit in ``refunds:pending``. A pending refund whose load ended is stuck.
    """
    problems = [
        f"refund {refund.id} is pending but its load {refund.load_id} is"
        f" {load.status if load is not None else 'missing'}: stuck"
        for refund, load in stuck(session)
    ]
    expected = (
        session.scalar(
            select(func.coalesce(func.sum(Refund.amount), 0))
            .outerjoin(Load, Load.id == Refund.load_id)
            .where(Refund.status == Status.PENDING)
            .where((Load.id.is_(None)) | (Load.status.not_in(LIVE_LOAD)))
        )
        or 0
    )
    actual = refunds_pending
    if actual != expected:
        problems.append(
            f"{REFUNDS_PENDING} holds {actual} fen, but the pending refunds with no load"
            f" in flight amount to {expected} fen"
        )
    return problems
