"""Payments: create, authorise (MAC1), capture (MAC2/TAC), uncertain, resolve, cancel.

Each function runs inside the caller's transaction and raises
:mod:`~webpurse.settlement.errors` to refuse. The decisions themselves are
in :mod:`.decisions`; here they meet the database, the security module and the ledger.
Ledger moves: authorise holds the amount (card → ``held:purchases``); capture posts it to
the merchant (held → merchant); a release returns it (held → card).

An uncertain payment is released only on authenticated evidence that its counter was not
used: a payment of the same card captured at that counter with a verified MAC2/TAC (its
session key binds the counter), or its own merchant's resolve. A new authorisation past an
uncertain one (the card says its counter did not move — INITIALIZE carries no MAC, so that
may be fabricated) is linked to it (``supersedes``) and releases it when it is captured.
"""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy import select

from webpurse.protocol.commands import (
    DebitForPurchase,
    DebitForPurchaseResponse,
    InitializeForPurchaseResponse,
    TransactionProof,
)
from webpurse.protocol.records import TransactionType, decode_bcd_date, decode_bcd_time
from webpurse.settlement import card_checks, events, hold_guards, ledger, quotas, registry
from webpurse.settlement.decisions import (
    DeclineCode,
    OpenTransaction,
    Outcome,
    PurchaseInputs,
    decide_purchase,
    decide_resolution,
)
from webpurse.settlement.errors import (
    conflict,
    declined,
    not_found,
    verification_failed,
)
from webpurse.settlement.merchants import next_terminal_seq
from webpurse.settlement.models import Card, Merchant, Payment
from webpurse.settlement.schemas import (
    Cancel,
    PaymentCreate,
    PurchaseAuthorise,
    PurchaseCapture,
    Resolve,
)
from webpurse.settlement.service import Ctx, card_time, new_id, parse, parse_issuer
from webpurse.settlement.transactions import OPEN, Kind, Status, move

log = structlog.get_logger(__name__)

PAYMENT = Kind.PAYMENT


def payment_json(payment: Payment) -> dict[str, Any]:
    authorisation = None
    if payment.mac1 is not None and payment.terminal_seq is not None:
        debit = DebitForPurchase(
            payment.terminal_seq,
            decode_bcd_date(bytes.fromhex(payment.txn_date or "")),
            decode_bcd_time(bytes.fromhex(payment.txn_time or "")),
            bytes.fromhex(payment.mac1),
        )
        authorisation = {
            "terminal_seq": payment.terminal_seq,
            "date": payment.txn_date,
            "time": payment.txn_time,
            "mac1": payment.mac1,
            "debit_apdu": debit.to_apdu().to_bytes().hex().upper(),
        }
    return {
        "id": payment.id,
        "object": "payment",
        "status": payment.status,
        "amount": payment.amount,
        "currency": payment.currency,
        "description": payment.description,
        "merchant_reference": payment.merchant_reference,
        "metadata": payment.metadata_,
        "terminal_id": payment.terminal_id,
        "key_index": payment.key_index,
        "card_number": payment.card_number,
        "decline_code": payment.decline_code,
        "tac": payment.tac,
        "amount_refunded": payment.refunded_amount,
        "created_at": payment.created_at.isoformat(),
        "updated_at": payment.updated_at.isoformat(),
        "authorisation": authorisation,
    }


def _emit(ctx: Ctx, payment: Payment, event_type: str) -> None:
    events.emit(ctx.session, payment.merchant_id, event_type, payment_json(payment), now=ctx.now)


def get_payment(ctx: Ctx, payment_id: str, *, lock: bool = False) -> Payment:
    """The caller's payment (another merchant's is "no such payment": 404)."""
    stmt = select(Payment).where(Payment.id == payment_id)
    if not ctx.principal.is_operator:
        stmt = stmt.where(Payment.merchant_id == ctx.principal.merchant_id)
    if lock and ctx.session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    payment = ctx.session.scalars(stmt.execution_options(populate_existing=lock)).first()
    if payment is None:
        raise not_found("payment", "id")
    return payment


def _need_status(payment: Payment, *allowed: str) -> None:
    if payment.status not in allowed:
        raise conflict(
            "invalid_payment_state",
            f"the payment is {payment.status}; this needs {' or '.join(allowed)}",
        )


def create(ctx: Ctx, body: PaymentCreate) -> Payment:
    merchant = ctx.session.get(Merchant, ctx.principal.merchant_id)
    if merchant is None:
        raise not_found("merchant")
    quotas.ensure_room(ctx.session, merchant.id, "payment", ctx.max_open_orders)
    payment = Payment(
        id=new_id("pay"),
        merchant_id=merchant.id,
        status=Status.REQUIRES_CARD,
        amount=body.amount,
        currency=body.currency,
        description=body.description,
        merchant_reference=body.merchant_reference,
        metadata_=dict(body.metadata),
        terminal_id=merchant.terminal_id,
        key_index=1,
        refunded_amount=0,
        created_at=ctx.now,
        updated_at=ctx.now,
    )
    ctx.session.add(payment)
    ctx.session.flush()
    log.info("payment.created", payment=payment.id, amount=payment.amount)
    return payment


def _release(ctx: Ctx, payment: Payment, card: Card, reason: str) -> None:
    """The card proved no debit happened: return the hold, close the payment."""
    ledger.post_transfer(
        ctx.session,
        f"{payment.id}:release",
        ledger.HELD_PURCHASES,
        ledger.card_account(card.id),
        payment.amount,
        "purchase_release",
        now=ctx.now,
        reference=payment.id,
    )
    move(PAYMENT, payment, Status.CANCELED)
    payment.updated_at = ctx.now
    if card.open_transaction == payment.id:
        card.open_transaction = _still_open(ctx, payment)
    card.updated_at = ctx.now
    registry.record_event(
        ctx.session, card, "purchase_released", ctx.now, {"payment": payment.id, "reason": reason}
    )
    _emit(ctx, payment, "payment.canceled")


def _still_open(ctx: Ctx, payment: Payment) -> str | None:
    """The newest payment ``payment`` superseded that is still open: the card's open one now."""
    seen = {payment.id}
    older_id = payment.supersedes
    while older_id is not None and older_id not in seen:
        seen.add(older_id)
        older = ctx.session.get(Payment, older_id)
        if older is None:
            return None
        if older.status in OPEN and older.card_id == payment.card_id:
            return older.id
        older_id = older.supersedes
    return None


def _release_disproved(ctx: Ctx, payment: Payment, card: Card) -> None:
    """``payment``'s verified MAC2/TAC proves the card used its counter for it, so every
    other open payment of this card at that counter never ran: release them (spec §6)."""
    others = ctx.session.scalars(
        select(Payment)
        .where(
            Payment.card_id == card.id,
            Payment.status.in_(OPEN),
            Payment.counter == payment.counter,
            Payment.id != payment.id,
        )
        .order_by(Payment.id)
        .execution_options(populate_existing=True)
    ).all()
    for other in others:
        _release(ctx, other, card, f"counter {payment.counter} was used by {payment.id}")


def authorise(ctx: Ctx, payment_id: str, body: PurchaseAuthorise) -> Payment:
    payment = get_payment(ctx, payment_id, lock=True)
    _need_status(payment, Status.REQUIRES_CARD)
    issuer = parse_issuer(body.issuer_data)
    init = parse(
        body.initialize_response, "initialize_response", InitializeForPurchaseResponse.from_data
    )
    merchant = ctx.session.get(Merchant, payment.merchant_id)
    assert merchant is not None
    card = registry.find_card(ctx.session, issuer.card_number, lock=True)
    hold_guards.refuse_rehold(ctx, card, payment.merchant_id, init.offline_counter)
    record = registry.card_record(ctx.session, card, payment.merchant_id) if card else None
    decision = decide_purchase(
        record,
        PurchaseInputs(
            issuer=issuer,
            initialize=init,
            terminal_id=bytes.fromhex(body.terminal_id),
            merchant_terminal_id=bytes.fromhex(merchant.terminal_id),
            amount=payment.amount,
            initialize_amount=body.amount,
        ),
        ctx.now,
    )
    decision = hold_guards.heal_instead(
        ctx, card, decision, "payment", init.offline_counter, init.balance
    )
    payment.card_number = issuer.card_number
    payment.updated_at = ctx.now
    if not decision.approved:
        assert decision.decline_code is not None
        if card is not None:
            payment.card_id = card.id
        # INITIALIZE FOR PURCHASE carries no MAC: a mismatch declines this payment, is
        # observed for the operator and offers a card check; the card stays as it is.
        extra: dict[str, Any] = {}
        check = card_checks.on_decline(
            ctx,
            card,
            issuer.card_number,
            decision,
            reference=payment.id,
            merchant_id=payment.merchant_id,
            claimed={"balance": init.balance, "counter": init.offline_counter},
        )
        if check is not None:
            extra["card_check"] = check
        if decision.decline_code is DeclineCode.RECOVERY_REQUIRED and decision.recover:
            # The payment stays requires_card: pay it once the open transaction is settled.
            extra["recover"] = decision.recover.to_json()
        else:
            move(PAYMENT, payment, Status.DECLINED)
            payment.decline_code = decision.decline_code.value
            _emit(ctx, payment, "payment.failed")
        extra["payment"] = payment_json(payment)
        log.info("payment.declined", payment=payment.id, decline_code=decision.decline_code.value)
        raise declined(decision.decline_code.value, decision.detail, extra=extra)
    assert card is not None
    if decision.supersedes is not None:
        log.info(
            "payment.supersedes",
            payment=payment.id,
            uncertain=decision.supersedes.id,
            counter=init.offline_counter,
        )
    date, time = card_time(ctx.now)
    payment.supersedes = decision.supersedes.id if decision.supersedes is not None else None
    move(PAYMENT, payment, Status.AUTHORISED)
    payment.card_id = card.id
    payment.balance_before = init.balance
    payment.counter = init.offline_counter
    payment.key_version = card.key_version
    payment.card_random = init.random.hex().upper()
    payment.txn_date = date.strftime("%Y%m%d")
    payment.txn_time = time.strftime("%H%M%S")
    payment.authorised_at = ctx.now
    card.open_transaction = payment.id
    card.updated_at = ctx.now
    # The hot rows (the merchant's sequence counter, the held account) are touched last,
    # so they stay locked only for their own statements and the commit.
    ctx.session.flush()
    seq = next_terminal_seq(ctx.session, merchant.id)
    mac1 = ctx.security.purchase_mac1(
        issuer.serial,
        card.key_version,
        random=init.random,
        offline_counter=init.offline_counter,
        terminal_seq=seq,
        amount=payment.amount,
        terminal_id=bytes.fromhex(merchant.terminal_id),
        date=date,
        time=time,
    )
    payment.terminal_seq = seq
    payment.mac1 = mac1.hex().upper()
    ledger.post_transfer(
        ctx.session,
        f"{payment.id}:hold",
        ledger.card_account(card.id),
        ledger.HELD_PURCHASES,
        payment.amount,
        "purchase_hold",
        now=ctx.now,
        reference=payment.id,
    )
    log.info("payment.authorised", payment=payment.id, card=card.card_number, seq=seq)
    return payment


def verify(ctx: Ctx, payment: Payment, card: Card, mac2: bytes, tac: bytes) -> bool:
    """Whether the card's MAC2 and TAC prove this payment's debit (spec §4)."""
    return ctx.security.verify_purchase_mac2_and_tac(
        bytes.fromhex(card.card_number),
        payment.key_version or card.key_version,
        random=bytes.fromhex(payment.card_random or ""),
        offline_counter=payment.counter or 0,
        terminal_seq=payment.terminal_seq or 0,
        amount=payment.amount,
        terminal_id=bytes.fromhex(payment.terminal_id),
        date=decode_bcd_date(bytes.fromhex(payment.txn_date or "")),
        time=decode_bcd_time(bytes.fromhex(payment.txn_time or "")),
        mac2=mac2,
        tac=tac,
    )


def _lock_with_card(ctx: Ctx, payment_id: str) -> tuple[Payment, Card | None]:
    """The payment and its card, both locked on PostgreSQL: the card row first.

    Capture and resolve may release *other* payments of the card (``_release_disproved``),
    so they lock the card before any payment: were the payment row taken first, shop A
    resolving its uncertain payment (its row, then the card) and shop B capturing the one
    that superseded it (its row, the card, then A's row) would each hold what the other
    waits for, and PostgreSQL would abort one as a deadlock. Payments are then locked
    after the card (the others in id order). SQLite serialises writers: no locks there.
    """
    owner = select(Payment.card_id).where(Payment.id == payment_id)
    if not ctx.principal.is_operator:
        owner = owner.where(Payment.merchant_id == ctx.principal.merchant_id)
    card_id = ctx.session.scalar(owner)
    card = registry.lock_card_id(ctx.session, card_id) if card_id else None
    payment = get_payment(ctx, payment_id, lock=True)
    if payment.card_id != card_id:  # authorised in between: its card is locked only now
        card = registry.lock_card_id(ctx.session, payment.card_id) if payment.card_id else None
    return payment, card


def _card_of(card: Card | None) -> Card:
    if card is None:
        raise conflict("invalid_payment_state", "the payment has no card")
    return card


def _succeed(ctx: Ctx, payment: Payment, card: Card, mac2: bytes, tac: bytes) -> None:
    """The card proved the debit: move the shadow purse on, tell the merchant, post it.

    The ledger transfer comes last so the hot accounts (held, the merchant's payable) stay
    locked only for the transfer itself and the commit. Open payments of the card at the
    same counter (uncertain ones it superseded, or that superseded it) are released: this
    verified answer proves they never ran.
    """
    linked = payment.supersedes is not None or card.open_transaction != payment.id
    move(PAYMENT, payment, Status.SUCCEEDED)
    payment.mac2 = mac2.hex().upper()
    payment.tac = tac.hex().upper()
    payment.updated_at = ctx.now
    assert payment.balance_before is not None and payment.counter is not None
    card.shadow_balance = payment.balance_before - payment.amount
    card.offline_counter = payment.counter + 1
    if card.open_transaction == payment.id:
        card.open_transaction = None
    card.updated_at = ctx.now
    registry.record_event(
        ctx.session,
        card,
        "purchase",
        ctx.now,
        {
            "payment": payment.id,
            "amount": payment.amount,
            "counter": payment.counter,
            "tac": payment.tac,
        },
    )
    if linked:
        _release_disproved(ctx, payment, card)
    _emit(ctx, payment, "payment.succeeded")
    ctx.session.flush()
    ledger.post_transfer(
        ctx.session,
        f"{payment.id}:capture",
        ledger.HELD_PURCHASES,
        ledger.merchant_account(payment.merchant_id),
        payment.amount,
        "purchase_capture",
        now=ctx.now,
        reference=payment.id,
    )
    log.info("payment.succeeded", payment=payment.id)


def capture(ctx: Ctx, payment_id: str, body: PurchaseCapture) -> Payment:
    payment, locked_card = _lock_with_card(ctx, payment_id)
    # An uncertain payment (the sweep timed it out) is captured too when the card's own
    # answer arrives: MAC2 and TAC prove the debit just as well as PROVE would.
    _need_status(payment, *OPEN)
    answer = parse(body.debit_response, "debit_response", DebitForPurchaseResponse.from_data)
    card = _card_of(locked_card)
    if not verify(ctx, payment, card, answer.mac2, answer.tac):
        registry.record_event(
            ctx.session, card, "verification_failed", ctx.now, {"payment": payment.id}
        )
        raise verification_failed("the card's MAC2 or TAC does not verify for this debit")
    _succeed(ctx, payment, card, answer.mac2, answer.tac)
    return payment


def mark_uncertain(ctx: Ctx, payment: Payment) -> None:
    move(PAYMENT, payment, Status.UNCERTAIN)
    payment.updated_at = ctx.now
    _emit(ctx, payment, "payment.uncertain")
    log.warning("payment.uncertain", payment=payment.id)


def uncertain(ctx: Ctx, payment_id: str) -> Payment:
    payment = get_payment(ctx, payment_id, lock=True)
    if payment.status == Status.UNCERTAIN:
        return payment
    _need_status(payment, Status.AUTHORISED)
    mark_uncertain(ctx, payment)
    return payment


def resolve(ctx: Ctx, payment_id: str, body: Resolve) -> Payment:
    payment, locked_card = _lock_with_card(ctx, payment_id)
    _need_status(payment, *OPEN)
    init = parse(
        body.initialize_response, "initialize_response", InitializeForPurchaseResponse.from_data
    )
    card = _card_of(locked_card)
    if (
        body.issuer_data is not None
        and parse_issuer(body.issuer_data).card_number != card.card_number
    ):
        raise conflict("card_mismatch", "issuer_data names another card than this payment's")
    proof = (
        parse(body.prove_response, "prove_response", TransactionProof.from_data)
        if body.prove_response is not None
        else None
    )
    open_txn = OpenTransaction(
        id=payment.id,
        kind="payment",
        status=payment.status,
        counter=payment.counter or 0,
        amount=payment.amount,
        balance_before=payment.balance_before or 0,
        random=bytes.fromhex(payment.card_random or ""),
        same_merchant=True,
    )
    proof_valid = proof is not None and verify(ctx, payment, card, proof.mac2, proof.tac)
    resolution = decide_resolution(
        open_txn,
        counter=init.offline_counter,
        balance=init.balance,
        random=init.random,
        proof_given=proof is not None,
        proof_valid=proof_valid,
    )
    if resolution.outcome is Outcome.SUCCEEDED:
        assert proof is not None
        _succeed(ctx, payment, card, proof.mac2, proof.tac)
    elif resolution.outcome is Outcome.CANCELED:
        _release(ctx, payment, card, "resolved: counter did not move")
    elif resolution.outcome is Outcome.PROOF_REQUIRED:
        raise conflict(
            "proof_required",
            resolution.detail,
            extra={
                "recover": {
                    "payment_id": payment.id,
                    "transaction_type": f"{TransactionType.EP_PURCHASE:02X}",
                    "counter": open_txn.counter,
                }
            },
        )
    elif resolution.outcome is Outcome.PROOF_INVALID:
        registry.record_event(
            ctx.session, card, "verification_failed", ctx.now, {"payment": payment.id}
        )
        raise verification_failed(resolution.detail)
    else:
        raise conflict("resolution_mismatch", resolution.detail)
    return payment


def cancel(ctx: Ctx, payment_id: str, body: Cancel | None = None) -> Payment:
    payment = get_payment(ctx, payment_id, lock=True)
    issuer = parse_issuer(body.issuer_data) if body and body.issuer_data else None
    if payment.status == Status.CANCELED:
        return payment
    if payment.status != Status.REQUIRES_CARD:
        raise conflict(
            "invalid_payment_state",
            f"the payment is {payment.status}: only a payment before any debit can be canceled"
            " (an authorised one is resolved with the card's proof)",
        )
    move(PAYMENT, payment, Status.CANCELED)
    payment.updated_at = ctx.now
    if issuer is not None and body is not None and body.card_status_word is not None:
        registry.note_card_refusal(
            ctx.session,
            issuer.card_number,
            body.card_status_word,
            ctx.now,
            merchant_id=payment.merchant_id,
            reference=payment.id,
        )
    _emit(ctx, payment, "payment.canceled")
    return payment
