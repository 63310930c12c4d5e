"""How a refund ends when its load does not credit the card: failed, its money given back.

Called from the load lifecycle (:mod:`.loads`) and the expiry sweep; apart from
:mod:`.refunds` (which creates refunds through :mod:`.loads`) so the two do not import each
other.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from webpurse.settlement import events, ledger
from webpurse.settlement.db import for_update
from webpurse.settlement.ledger import TransferSpec
from webpurse.settlement.models import Payment, Refund
from webpurse.settlement.refund_checks import RETURNED, stuck
from webpurse.settlement.service import Ctx
from webpurse.settlement.transactions import Kind, Status, move
from webpurse.settlement.views import refund_json

log = structlog.get_logger("webpurse.settlement.refunds")


def fail(ctx: Ctx, refund_id: str, returned: TransferSpec | None, reason: str) -> None:
    """The refund's load ended without a credit: fail the refund, give the money back.

    ``returned`` is the load's own return (``held:loads`` → ``refunds:pending``), posted with
    the refund's return (``refunds:pending`` → the merchant's payable) in one posting;
    ``None`` when the load's funds are back in ``refunds:pending`` already (a refund left
    stuck by an older version: :func:`heal_stuck`). The payment is locked first. A refund
    that is not ``pending`` any more only gets the load's return.
    """
    refund = _locked(ctx.session, select(Refund).where(Refund.id == refund_id))
    transfers = [returned] if returned is not None else []
    if refund is None or refund.status != Status.PENDING:
        ledger.post_transfers(ctx.session, transfers, now=ctx.now)
        return
    payment = _locked(ctx.session, select(Payment).where(Payment.id == refund.payment_id))
    transfers.append(
        TransferSpec(
            f"{refund.id}:return",
            ledger.REFUNDS_PENDING,
            ledger.merchant_account(refund.merchant_id),
            refund.amount,
            "refund_return",
            refund.id,
        )
    )
    ledger.post_transfers(ctx.session, transfers, now=ctx.now)
    move(Kind.REFUND, refund, Status.FAILED)
    refund.updated_at = ctx.now
    if payment is not None:
        payment.refunded_amount -= refund.amount
        payment.updated_at = ctx.now
    events.emit(ctx.session, refund.merchant_id, "refund.failed", refund_json(refund), now=ctx.now)
    log.warning("refund.failed", refund=refund.id, load=refund.load_id, reason=reason)


def _locked(session: Session, stmt: Any) -> Any:
    if for_update(session):
        stmt = stmt.with_for_update()
    return session.scalars(stmt.execution_options(populate_existing=True)).first()


def heal_stuck(ctx: Ctx, limit: int = 100) -> int:
    """Fail up to ``limit`` stuck refunds (the expiry sweep calls this); how many.

    Only refunds whose load returned its funds (declined, canceled, expired): their amount
    waits in ``refunds:pending``. Anything else stuck is for the ledger check to report.
    """
    healed = 0
    for refund, load in stuck(ctx.session)[:limit]:
        if load is None or load.status not in RETURNED:
            continue
        fail(ctx, refund.id, None, f"its load {load.id} is {load.status}")
        healed += 1
    return healed
