"""Payments: create, authorise (MAC1), capture (MAC2/TAC), uncertain, resolve, cancel.

Each function runs inside the caller's transaction and raises
:mod:`~webpurse.settlement.errors` to refuse. The decisions themselves are
in :mod:`.decisions`; here they meet the database, the security module and the ledger.
Ledger moves: one per purchase, at capture (card → merchant). Authorise holds the amount by
the payment's status (``authorised``, later maybe ``uncertain``) once the card's available
value covers it; a release posts nothing (``held:purchases`` is derived: :func:`ledger.balance`).

An uncertain payment is released only on authenticated evidence that its counter was not
used: a payment of the same card captured at that counter with a verified MAC2/TAC (its
session key binds the counter), or its own merchant's resolve. A new authorisation past an
uncertain one (the card says its counter did not move — INITIALIZE carries no MAC, so that
may be fabricated) is linked to it (``supersedes``) and releases it when it is captured.
"""

from __future__ import annotations

import datetime as dt
import functools

import structlog

from webpurse.protocol.commands import (
    DebitForPurchaseResponse,
    InitializeForPurchaseResponse,
)
from webpurse.protocol.records import (
    IssuerData,
    TransactionType,
    decode_bcd_date,
    decode_bcd_time,
)
from webpurse.settlement import changes, hold_guards, lifecycle, quotas, registry
from webpurse.settlement.decisions import CardRecord, Decision, PurchaseInputs, decide_purchase
from webpurse.settlement.errors import not_found
from webpurse.settlement.ledger import TransferSpec
from webpurse.settlement.merchants import next_terminal_seq
from webpurse.settlement.models import Card, Merchant, Payment
from webpurse.settlement.schemas import (
    Cancel,
    PaymentCreate,
    PurchaseAuthorise,
    PurchaseCapture,
    Resolve,
)
from webpurse.settlement.service import Ctx, new_id, parse, parse_issuer
from webpurse.settlement.transactions import Kind, Status, move
from webpurse.settlement.views import payment_json as payment_json

log = structlog.get_logger(__name__)

PAYMENT = Kind.PAYMENT


def get_payment(ctx: Ctx, payment_id: str, *, lock: bool = False) -> Payment:
    """The caller's payment (another merchant's is "no such payment": 404)."""
    return lifecycle.get(ctx, STRATEGY, payment_id, lock=lock)


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


def decide(
    ctx: Ctx,
    record: CardRecord | None,
    body: PurchaseAuthorise,
    issuer: IssuerData,
    init: InitializeForPurchaseResponse,
    merchant_terminal_id: bytes,
    amount: int,
) -> Decision:
    """The purchase decision on the card's answers (the single path's and the batch's)."""
    inputs = PurchaseInputs(
        issuer=issuer,
        initialize=init,
        terminal_id=bytes.fromhex(body.terminal_id),
        merchant_terminal_id=merchant_terminal_id,
        amount=amount,
        initialize_amount=body.amount,
    )
    return decide_purchase(record, inputs, ctx.now)


def authorise(ctx: Ctx, payment_id: str, body: PurchaseAuthorise) -> Payment:
    payment = lifecycle.waiting_for_card(ctx, STRATEGY, payment_id)
    issuer = parse_issuer(body.issuer_data)
    init = parse(
        body.initialize_response, "initialize_response", InitializeForPurchaseResponse.from_data
    )
    merchant = ctx.session.get(Merchant, payment.merchant_id)
    assert merchant is not None
    card = registry.find_card(ctx.session, issuer.card_number, lock=True)
    hold_guards.refuse_rehold(ctx, card, payment.merchant_id, init.offline_counter)
    record = registry.card_record(ctx.session, card, payment.merchant_id) if card else None
    terminal_id = bytes.fromhex(merchant.terminal_id)
    decision = decide(ctx, record, body, issuer, init, terminal_id, payment.amount)
    decision = hold_guards.heal_instead(
        ctx, card, decision, "payment", init.offline_counter, init.balance
    )
    payment.card_number = issuer.card_number
    payment.updated_at = ctx.now
    if not decision.approved:
        if card is not None:
            payment.card_id = card.id
        claimed = {"balance": init.balance, "counter": init.offline_counter}
        lifecycle.decline(ctx, STRATEGY, payment, card, issuer.card_number, decision, claimed)
    assert card is not None
    date, time = lifecycle.bind(
        ctx,
        STRATEGY,
        payment,
        card,
        lifecycle.Initialize(init.offline_counter, init.balance, init.random),
        card_number=issuer.card_number,
        supersedes=decision.supersedes,
    )
    # The sequence number last (a SEQUENCE on PostgreSQL: no row lock).
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
    lifecycle.hold(ctx, payment, card)
    log.info("payment.authorised", payment=payment.id, card=card.card_number, seq=seq)
    return payment


@functools.lru_cache(maxsize=256)
def _txn_date(digits: str) -> dt.date:
    """A row's BCD date as a date (kept: a batch's captures share one date)."""
    return decode_bcd_date(bytes.fromhex(digits))


@functools.lru_cache(maxsize=256)
def _txn_time(digits: str) -> dt.time:
    """A row's BCD time as a time (kept, as :func:`_txn_date`)."""
    return decode_bcd_time(bytes.fromhex(digits))


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
        date=_txn_date(payment.txn_date or ""),
        time=_txn_time(payment.txn_time or ""),
        mac2=mac2,
        tac=tac,
    )


def _proves(ctx: Ctx, payment: Payment, card: Card, proof: lifecycle.CardProof) -> bool:
    """A DEBIT's or GET TRANSACTION PROVE's answer: both carry the card's MAC2."""
    return proof.mac2 is not None and verify(ctx, payment, card, proof.mac2, proof.tac)


def capture(ctx: Ctx, payment_id: str, body: PurchaseCapture) -> Payment:
    def answer() -> lifecycle.CardProof:
        debit = parse(body.debit_response, "debit_response", DebitForPurchaseResponse.from_data)
        return lifecycle.CardProof(tac=debit.tac, mac2=debit.mac2)

    return lifecycle.prove(
        ctx,
        STRATEGY,
        payment_id,
        answer,
        "the card's MAC2 or TAC does not verify for this debit",
    )


def mark_uncertain(ctx: Ctx, payment: Payment) -> None:
    lifecycle.mark_uncertain(ctx, STRATEGY, payment)


def uncertain(ctx: Ctx, payment_id: str) -> Payment:
    return lifecycle.uncertain(ctx, STRATEGY, payment_id)


def resolve(ctx: Ctx, payment_id: str, body: Resolve) -> Payment:
    return lifecycle.resolve(ctx, STRATEGY, payment_id, body)


def cancel(ctx: Ctx, payment_id: str, body: Cancel | None = None) -> Payment:
    return lifecycle.cancel(
        ctx,
        STRATEGY,
        payment_id,
        body,
        refused="only a payment before any debit can be canceled"
        " (an authorised one is resolved with the card's proof)",
    )


def expire(ctx: Ctx, payment: Payment) -> None:
    """A payment nobody brought a card for: nothing was held."""
    lifecycle.expire(ctx, STRATEGY, payment)


def _close(ctx: Ctx, payment: Payment, status: Status) -> None:
    """The payment ends without a debit: its hold (its status) ends with it."""
    move(PAYMENT, payment, status)
    payment.updated_at = ctx.now


def _capture(payment: Payment, card: Card) -> TransferSpec:
    """The purchase's one ledger transfer: card → merchant, at capture."""
    return changes.purchase_capture(payment.id, card.id, payment.merchant_id, payment.amount)


def _initialize(text: str) -> lifecycle.Initialize:
    init = parse(text, "initialize_response", InitializeForPurchaseResponse.from_data)
    return lifecycle.Initialize(init.offline_counter, init.balance, init.random)


STRATEGY: lifecycle.Strategy[Payment] = lifecycle.Strategy(
    kind=PAYMENT,
    model=Payment,
    transaction_type=TransactionType.EP_PURCHASE,
    to_json=payment_json,
    events={
        Status.DECLINED: "payment.failed",
        Status.SUCCEEDED: "payment.succeeded",
        Status.UNCERTAIN: "payment.uncertain",
        Status.CANCELED: "payment.canceled",
        Status.EXPIRED: "payment.expired",
    },
    initialize=_initialize,
    verify=_proves,
    close=_close,
    transfer=_capture,
    keeps_on_decline=lambda payment: False,
    releases_unlinked=False,
    unproven_needs_proof=False,
)
