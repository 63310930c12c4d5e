"""Refunds: a pending credit to the paying card, delivered as a load at its next contact.

Creating a refund moves the amount from the merchant's payable to ``refunds:pending`` and
opens a load order funded from there, bound to the card that paid; when that load
succeeds the refund succeeds. Several partial refunds are allowed up to the captured
amount. A refusal raises a :mod:`~webpurse.settlement.errors` error that is not committed, so
:func:`webpurse.settlement.idempotency.run` rolls the refund back and stores the refusal
under the request's idempotency key.

A refund is never left ``pending`` without a load that can still deliver it: when its load
ends without a credit (declined, canceled, released because another load used its
counter, expired) the refund is ``failed`` in the same transaction (:func:`fail`): its
amount goes back from ``refunds:pending`` to the merchant's payable, the payment's
``amount_refunded`` is lowered by it (so a new refund can be made) and the merchant is
told ``refund.failed``. ``refunds:pending`` therefore holds only the amounts of pending
refunds whose load is not in flight — none — and the ledger check proves it
(:func:`open_refund_problems`).

Lock order: the payment row before any ledger account (as :func:`create`), so failing a
refund inside another load's completion (``lifecycle.succeed``) releases before it posts.
"""

from __future__ import annotations

import structlog
from sqlalchemy.orm import Session

from webpurse.settlement import events, ledger, load_orders, refund_checks
from webpurse.settlement.errors import Unprocessable, conflict, ledger_refused
from webpurse.settlement.ledger import LedgerError, TransferSpec
from webpurse.settlement.models import Payment, Refund
from webpurse.settlement.payments import get_payment
from webpurse.settlement.refund_checks import LIVE_LOAD as LIVE_LOAD
from webpurse.settlement.refund_checks import RETURNED as RETURNED
from webpurse.settlement.refund_checks import stuck as stuck
from webpurse.settlement.refund_outcomes import fail as fail
from webpurse.settlement.refund_outcomes import heal_stuck as heal_stuck
from webpurse.settlement.schemas import RefundCreate
from webpurse.settlement.service import Ctx, get_owned, new_id
from webpurse.settlement.transactions import Status
from webpurse.settlement.views import refund_json as refund_json

log = structlog.get_logger(__name__)


def get_refund(ctx: Ctx, refund_id: str) -> Refund:
    return get_owned(ctx, Refund, refund_id, "refund")


def create(ctx: Ctx, body: RefundCreate) -> Refund:
    payment: Payment = get_payment(ctx, body.payment, lock=True)
    if payment.status != Status.SUCCEEDED:
        raise conflict("invalid_payment_state", f"the payment is {payment.status}, not succeeded")
    remaining = payment.amount - payment.refunded_amount
    amount = body.amount if body.amount is not None else remaining
    if amount <= 0 or amount > remaining:
        raise Unprocessable(
            f"at most {remaining} fen of this payment can still be refunded",
            code="amount_too_large",
            param="amount",
        )
    refund = Refund(
        id=new_id("re"),
        merchant_id=payment.merchant_id,
        payment_id=payment.id,
        amount=amount,
        currency=payment.currency,
        status=Status.PENDING,
        created_at=ctx.now,
        updated_at=ctx.now,
    )
    ctx.session.add(refund)
    ctx.session.flush()
    payable = ledger.merchant_account(payment.merchant_id)
    try:
        # The reserve and the load's hold in one posting: every account locked at once, in
        # sorted order, as a failing refund's return does (no lock cycle between them).
        load = load_orders.create_order(
            ctx,
            amount=amount,
            currency=payment.currency,
            funding_method="refund",
            funding_reference=refund.id,
            merchant_id=payment.merchant_id,
            card_number=payment.card_number,
            refund_id=refund.id,
            before_hold=[
                TransferSpec(
                    f"{refund.id}:reserve",
                    payable,
                    ledger.REFUNDS_PENDING,
                    amount,
                    "refund_reserve",
                    refund.id,
                )
            ],
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
    refund.load_id = load.id
    payment.refunded_amount += amount
    payment.updated_at = ctx.now
    events.emit(ctx.session, refund.merchant_id, "refund.created", refund_json(refund), now=ctx.now)
    log.info("refund.created", refund=refund.id, payment=payment.id, amount=amount)
    return refund


def open_refund_problems(session: Session) -> list[str]:
    """``refunds:pending`` against the refunds actually open (for ``ledger check``)."""
    return refund_checks.open_refund_problems(
        session, ledger.balance(session, ledger.REFUNDS_PENDING)
    )
