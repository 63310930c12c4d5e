"""Card holds: no merchant keeps a card from the others longer than a bound, and gaps heal.

A payment or load that is ``authorised`` or ``uncertain`` is the card's open transaction:
other merchants get ``recovery_required`` for it (spec §6). One merchant could keep a card
that way for good (e.g. authorise the whole balance on a forged INITIALIZE and call it
uncertain), so every open transaction holds its card at most ``card_hold_ttl`` after its
authorisation (``Settings.card_hold_ttl``, ``WEBPURSE_CARD_HOLD_TTL``); then the expiry
sweep (:func:`release_stale`):

- releases a stale *payment*: its hold ends (the card may spend it again), the payment is
  ``canceled`` with ``decline_code`` ``hold_expired`` (``payment.canceled``), the card is free;
- frees the card of a stale *load* but leaves the load ``uncertain`` with its funds held
  (returning them without proof could create value): a later load at its counter releases
  it (its verified TAC proves the counter was used by the other), its own proof settles it.

Nothing is lost by releasing a payment that did debit the card: the card then shows its
counter one ahead of the shadow, and the card's own authenticated proof settles it. When an
authorisation finds the card one transaction ahead and settlement issued the MAC for the
missing counter (an open or released transaction of the card at that counter), the answer
is ``recovery_required`` with ``recover.heal`` instead of a decline for good; whoever holds
the card sends GET TRANSACTION PROVE's answer for that counter to ``POST /v1/heal``
(:func:`heal`), and a proof that verifies — a MAC2/TAC over settlement's own terminal
sequence number and amount (payments), the MAC2 settlement issued and a TAC over the new
balance (loads) — settles that transaction against the merchant that authorised it (and
released it), moving the shadow on. An answer that does not verify changes nothing (the
evidence rule: only authenticated, fresh evidence changes a card).

Operators see stale holds and released payments still awaiting their card's proof
(:func:`queue`, ``GET /v1/holds``) and may release any merchant's open transaction
(:func:`operator_release`, ``POST /v1/holds/{id}/release``): audited as the card event
``operator_released`` naming the operator key, the time and the reason.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import structlog
from sqlalchemy import Select, and_, or_, select

from webpurse.protocol.commands import TransactionProof
from webpurse.protocol.records import TransactionType
from webpurse.settlement import lifecycle, loads, payments, registry
from webpurse.settlement.errors import conflict, not_found, verification_failed
from webpurse.settlement.hold_guards import HOLD_EXPIRED as HOLD_EXPIRED
from webpurse.settlement.hold_guards import OPEN as OPEN
from webpurse.settlement.hold_guards import _loads_at, _locked_rows, _payments_at
from webpurse.settlement.hold_guards import exhausted as exhausted
from webpurse.settlement.hold_guards import heal_instead as heal_instead
from webpurse.settlement.hold_guards import refuse_rehold as refuse_rehold
from webpurse.settlement.models import Card, Load, Payment, PaymentHold
from webpurse.settlement.schemas import CardHeal, HoldRelease
from webpurse.settlement.service import Ctx, parse, parse_issuer
from webpurse.settlement.transactions import Status

log = structlog.get_logger(__name__)


def _lock_card(ctx: Ctx, card_id: str, *, skip_locked: bool = False) -> Card | None:
    rows = _locked_rows(ctx, select(Card).where(Card.id == card_id), skip_locked=skip_locked)
    return rows[0] if rows else None


# --- the bound ------------------------------------------------------------------------


def held_before(before: dt.datetime) -> Select[Any]:
    """The ids of the open payments authorised before ``before``, by their hold rows
    (``ix_payment_holds_authorised``; no index on the payments names their status)."""
    return select(PaymentHold.payment_id).where(PaymentHold.authorised_at < before)


def release_stale(ctx: Ctx, ttl: dt.timedelta) -> tuple[int, int]:
    """Free every card an open transaction has held for longer than ``ttl`` (the sweep).

    Returns (payments released, loads unblocked). The card row is locked before the
    payment or load (as capture and complete lock them); rows a request holds are skipped
    this pass (``SKIP LOCKED``) and taken by the next.
    """
    before = ctx.now - ttl
    stale_payments = ctx.session.execute(
        select(PaymentHold.payment_id, PaymentHold.card_id)
        .where(PaymentHold.authorised_at < before)  # the open payments (ledger.check)
        .order_by(PaymentHold.payment_id)
    ).all()
    released = 0
    for payment_id, held_card in stale_payments:
        card = _lock_card(ctx, held_card, skip_locked=True)
        rows = _locked_rows(ctx, select(Payment).where(Payment.id == payment_id), skip_locked=True)
        if card is None or not rows or rows[0].status not in OPEN:
            continue
        payment: Payment = rows[0]
        payment.decline_code = HOLD_EXPIRED
        lifecycle.release(ctx, payments.STRATEGY, payment, card, f"held the card longer than {ttl}")
        registry.record_event(
            ctx.session,
            card,
            "stale_hold_released",
            ctx.now,
            {
                "payment": payment.id,
                "merchant": payment.merchant_id,
                "authorised_at": payment.authorised_at.isoformat()
                if payment.authorised_at
                else None,
                "bound_seconds": int(ttl.total_seconds()),
            },
        )
        log.warning("hold.released", payment=payment.id, merchant=payment.merchant_id)
        released += 1
    stale_loads = ctx.session.execute(
        select(Load.id, Load.card_id)
        .join(Card, Card.id == Load.card_id)
        .where(Load.status.in_(OPEN), Load.authorised_at < before, Card.open_transaction == Load.id)
        .order_by(Load.id)
    ).all()
    unblocked = 0
    for load_id, card_id in stale_loads:
        card = _lock_card(ctx, str(card_id), skip_locked=True)
        if card is None or card.open_transaction != load_id:
            continue
        card.open_transaction = None
        card.updated_at = ctx.now
        registry.record_event(
            ctx.session,
            card,
            "stale_hold_unblocked",
            ctx.now,
            {"load": load_id, "bound_seconds": int(ttl.total_seconds())},
        )
        log.warning("hold.unblocked", load=load_id)
        unblocked += 1
    return released, unblocked


def heal(ctx: Ctx, body: CardHeal) -> dict[str, Any]:
    """Settle the card's transaction at its missing counter from the card's own proof."""
    issuer = parse_issuer(body.issuer_data)
    proof = parse(body.prove_response, "prove_response", TransactionProof.from_data)
    card_proof = lifecycle.CardProof(tac=proof.tac, mac2=proof.mac2)
    card = registry.find_card(ctx.session, issuer.card_number, lock=True)
    if card is None:
        raise not_found("card", "issuer_data")
    purchase = body.transaction_type == f"{TransactionType.EP_PURCHASE:02X}"
    counter = card.offline_counter if purchase else card.online_counter
    settled: str | None = None
    candidates: list[Payment] | list[Load]
    if purchase:
        candidates = _payments_at(ctx, card, lock=True)
        for payment in candidates:
            if payments.verify(ctx, payment, card, proof.mac2, proof.tac):
                _settle_payment(ctx, payment, card, proof)
                settled = payment.id
                break
    else:
        candidates = _loads_at(ctx, card, lock=True)
        for load in candidates:
            if loads.STRATEGY.verify(ctx, load, card, card_proof):
                lifecycle.succeed(ctx, loads.STRATEGY, load, card, card_proof)
                settled = load.id
                break
    if not candidates:
        raise conflict(
            "nothing_to_heal",
            f"settlement issued no MAC for this card's {'offline' if purchase else 'online'}"
            f" counter {counter}: there is nothing its proof could settle",
        )
    if settled is None:
        registry.record_event(
            ctx.session, card, "verification_failed", ctx.now, {"heal_counter": counter}
        )
        raise verification_failed("the card's proof does not verify for its missing counter")
    registry.record_event(
        ctx.session,
        card,
        "healed",
        ctx.now,
        {"settled": settled, "counter": counter, "by": ctx.principal.subject},
    )
    log.info("card.healed", card=card.card_number, settled=settled, counter=counter)
    return {
        "object": "card_heal",
        "card_number": card.card_number,
        "transaction_type": body.transaction_type,
        "counter": counter,
        "offline_counter": card.offline_counter,
        "online_counter": card.online_counter,
    }


def _settle_payment(ctx: Ctx, payment: Payment, card: Card, proof: TransactionProof) -> None:
    """The card proved ``payment``'s debit: capture it for its merchant (a released one only
    if the card's available value still covers it, as when its hold was posted again), the
    shadow one debit further on."""
    shadow = card.shadow_balance
    if payment.status == Status.CANCELED:
        lifecycle.hold(ctx, payment, card)  # held again: the card must still cover it
        payment.decline_code = None
    lifecycle.succeed(
        ctx, payments.STRATEGY, payment, card, lifecycle.CardProof(proof.tac, proof.mac2)
    )
    # The MAC2/TAC bind the amount and counter, not the balance INITIALIZE claimed.
    card.shadow_balance = shadow - payment.amount


# --- the operator queue ---------------------------------------------------------------


def _hold_json(item: Payment | Load, kind: str, stale_before: dt.datetime) -> dict[str, Any]:
    waiting = "proof" if item.status == Status.CANCELED else "release_or_proof"
    return {
        "object": "hold",
        "id": item.id,
        "kind": kind,
        "merchant": item.merchant_id,
        "card_number": item.card_number,
        "status": item.status,
        "amount": item.amount,
        "counter": item.counter,
        "authorised_at": item.authorised_at.isoformat() if item.authorised_at else None,
        "stale": bool(item.authorised_at and item.authorised_at < stale_before),
        "waiting_for": waiting,
    }


def queue(ctx: Ctx, ttl: dt.timedelta) -> list[dict[str, Any]]:
    """Every merchant's holds past the bound, and released payments still provable."""
    before = ctx.now - ttl
    rows: list[dict[str, Any]] = []
    stale = ctx.session.scalars(
        select(Payment)
        .outerjoin(Card, Card.id == Payment.card_id)
        .where(
            or_(
                Payment.id.in_(held_before(before)),
                and_(
                    Payment.status == Status.CANCELED,
                    Payment.decline_code == HOLD_EXPIRED,
                    Card.offline_counter == Payment.counter,
                ),
            )
        )
        .order_by(Payment.authorised_at, Payment.id)
    )
    rows += [_hold_json(p, "payment", before) for p in stale]
    stale_loads = ctx.session.scalars(
        select(Load)
        .where(Load.status.in_(OPEN), Load.authorised_at < before)
        .order_by(Load.authorised_at, Load.id)
    )
    rows += [_hold_json(x, "load", before) for x in stale_loads]
    return rows


def operator_release(ctx: Ctx, object_id: str, body: HoldRelease) -> dict[str, Any]:
    """An operator releases any merchant's open payment or load, audited (who, when, why)."""
    kind = "payment" if object_id.startswith("pay_") else "load"
    model: type[Payment] | type[Load] = Payment if kind == "payment" else Load
    card_id = ctx.session.scalar(select(model.card_id).where(model.id == object_id))
    card = _lock_card(ctx, card_id) if card_id else None
    rows = _locked_rows(ctx, select(model).where(model.id == object_id))
    if not rows:
        raise not_found(kind, "id")
    item = rows[0]
    if item.status not in OPEN or card is None:
        raise conflict(
            "invalid_hold_state",
            f"the {kind} is {item.status}: only an open (authorised or uncertain) one is released",
        )
    reason = f"operator {ctx.principal.key_id}: {body.reason}"
    if isinstance(item, Payment):
        lifecycle.release(ctx, payments.STRATEGY, item, card, reason)
    else:
        lifecycle.release(ctx, loads.STRATEGY, item, card, reason)
    registry.record_event(
        ctx.session,
        card,
        "operator_released",
        ctx.now,
        {
            kind: item.id,
            "merchant": item.merchant_id,
            "operator": ctx.principal.key_id,
            "at": ctx.now.isoformat(),
            "reason": body.reason,
        },
    )
    log.warning(
        "hold.operator_released", object=item.id, operator=ctx.principal.key_id, reason=body.reason
    )
    return _hold_json(item, kind, ctx.now)
