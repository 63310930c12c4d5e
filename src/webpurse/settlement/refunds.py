"""Refunds: a pending credit to the paying card, delivered as a load at its next contact.

Creating a refund moves the amount from the merchant's payable to ``refunds:pending`` and
opens a load order funded from there, bound to the card that paid; when that load
succeeds the refund succeeds. Several partial refunds are allowed up to the captured
amount. A refusal raises an :class:`ApiError` that is not committed, so
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
refund inside another load's completion (``loads._succeed``) releases before it posts.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from webpurse.settlement import events, ledger
from webpurse.settlement.db import for_update
from webpurse.settlement.ledger import LedgerError, TransferSpec
from webpurse.settlement.models import Load, Payment, Refund
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
        # The reserve and the load's hold in one posting: every account locked at once, in
        # sorted order, as a failing refund's return does (no lock cycle between them).
        load = loads.create_order(
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


LIVE_LOAD = ("requires_card", "authorised", "uncertain")
RETURNED = ("declined", "canceled", "expired")  # a load that gave its funds back


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
    if refund is None or refund.status != "pending":
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
    refund.status = "failed"
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


def stuck(session: Session) -> list[tuple[Refund, Load | None]]:
    """Pending refunds whose load can no longer deliver them (left by an older version)."""
    rows = session.execute(
        select(Refund, Load)
        .outerjoin(Load, Load.id == Refund.load_id)
        .where(Refund.status == "pending")
        .where((Load.id.is_(None)) | (Load.status.not_in(LIVE_LOAD)))
        .order_by(Refund.id)
    ).all()
    return [(refund, load) for refund, load in rows]


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


def open_refund_problems(session: Session) -> list[str]:
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
            .where(Refund.status == "pending")
            .where((Load.id.is_(None)) | (Load.status.not_in(LIVE_LOAD)))
        )
        or 0
    )
    actual = ledger.balance(session, ledger.REFUNDS_PENDING)
    if actual != expected:
        problems.append(
            f"{ledger.REFUNDS_PENDING} holds {actual} fen, but the pending refunds with no load"
            f" in flight amount to {expected} fen"
        )
    return problems
