"""Refunds: a pending credit to the paying card, delivered as a load at its next contact.

Creating a refund moves the amount from the merchant's payable to ``refunds:pending`` and
opens a load order funded from there, bound to the card that paid; when that load
succeeds the refund succeeds. Several partial refunds are allowed up to the captured
amount. A refusal raises an :class:`ApiError` that is not committed, so
:func:`webpurse.settlement.idempotency.run` rolls the refund back and stores the refusal
under the request's idempotency key.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select

from webpurse.settlement import events, ledger
from webpurse.settlement.ledger import LedgerError
from webpurse.settlement.models import Payment, Refund
from webpurse.settlement.payments import get_payment
from webpurse.settlement.problems import ApiError, conflict, ledger_refused, not_found
from webpurse.settlement.schemas import RefundCreate
from webpurse.settlement.service import Ctx, new_id

log = structlog.get_logger(__name__)


def refund_json(refund: Refund) -> dict[str, Any]:
    return {
        "id": refund.id,
        "object": "refund",
        "status": refund.status,
        "payment": refund.payment_id,
        "amount": refund.amount,
        "currency": refund.currency,
        "load": refund.load_id,
        "created_at": refund.created_at.isoformat(),
        "updated_at": refund.updated_at.isoformat(),
    }


def get_refund(ctx: Ctx, refund_id: str) -> Refund:
    stmt = select(Refund).where(Refund.id == refund_id)
    if not ctx.principal.is_operator:
        stmt = stmt.where(Refund.merchant_id == ctx.principal.merchant_id)
    refund = ctx.session.scalars(stmt).first()
    if refund is None:
        raise not_found("refund", "id")
    return refund


def create(ctx: Ctx, body: RefundCreate) -> Refund:
    from webpurse.settlement import loads

    payment: Payment = get_payment(ctx, body.payment, lock=True)
    if payment.status != "succeeded":
        raise conflict("invalid_payment_state", f"the payment is {payment.status}, not succeeded")
    remaining = payment.amount - payment.refunded_amount
    amount = body.amount if body.amount is not None else remaining
    if amount <= 0 or amount > remaining:
        raise ApiError(
            422,
            "amount_too_large",
            f"at most {remaining} fen of this payment can still be refunded",
            param="amount",
        )
    refund = Refund(
        id=new_id("re"),
        merchant_id=payment.merchant_id,
        payment_id=payment.id,
        amount=amount,
        currency=payment.currency,
        status="pending",
        created_at=ctx.now,
        updated_at=ctx.now,
    )
    ctx.session.add(refund)
    ctx.session.flush()
    payable = ledger.merchant_account(payment.merchant_id)
    try:
        ledger.post_transfer(
            ctx.session,
            f"{refund.id}:reserve",
            payable,
            ledger.REFUNDS_PENDING,
            amount,
            "refund_reserve",
            now=ctx.now,
            reference=refund.id,
        )
    except LedgerError as exc:
        # The transfer locked the payable account: its balance read now is the one refused.
        available = ledger.balance(ctx.session, payable)
        if available < amount:
            log.info("refund.refused", payment=payment.id, amount=amount, payable=available)
            raise conflict(
                "insufficient_merchant_balance",
                f"the merchant's payable balance ({available} fen) cannot cover {amount} fen",
            ) from None
        log.warning("refund.ledger_refused", payment=payment.id, detail=str(exc))
        raise ledger_refused(str(exc)) from None
    load = loads.create_order(
        ctx,
        amount=amount,
        currency=payment.currency,
        funding_method="refund",
        funding_reference=refund.id,
        merchant_id=payment.merchant_id,
        card_number=payment.card_number,
        refund_id=refund.id,
    )
    refund.load_id = load.id
    payment.refunded_amount += amount
    payment.updated_at = ctx.now
    events.emit(ctx.session, refund.merchant_id, "refund.created", refund_json(refund), now=ctx.now)
    log.info("refund.created", refund=refund.id, payment=payment.id, amount=amount)
    return refund
