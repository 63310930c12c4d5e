"""A card's proof of a debit or credit: verified, recorded, posted; what it disproves."""

from __future__ import annotations

from collections.abc import Callable

import structlog
from sqlalchemy import select

from webpurse.settlement import changes, ledger, registry
from webpurse.settlement.errors import verification_failed
from webpurse.settlement.lifecycle.release import release
from webpurse.settlement.lifecycle.rows import card_of, lock_with_card, need_status
from webpurse.settlement.lifecycle.strategy import CardProof, Row, Strategy, emit
from webpurse.settlement.models import Card
from webpurse.settlement.service import Ctx
from webpurse.settlement.transactions import OPEN, Kind, Status

log = structlog.get_logger(__name__)


def prove(
    ctx: Ctx,
    strategy: Strategy[Row],
    object_id: str,
    answer: Callable[[], CardProof],
    failure: str,
) -> Row:
    """Capture or complete: the card's answer to the DEBIT or CREDIT proves it.

    An uncertain transaction (the sweep timed it out) is proven too when the card's own
    answer arrives: it proves the debit or credit just as well as GET TRANSACTION PROVE.
    """
    row, locked_card = lock_with_card(ctx, strategy, object_id)
    need_status(strategy, row, *OPEN)
    proof = answer()
    card = card_of(strategy, locked_card)
    if not strategy.verify(ctx, row, card, proof):
        verification_failure(ctx, strategy, row, card)
        raise verification_failed(failure)
    succeed(ctx, strategy, row, card, proof)
    return row


def succeed(ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card, proof: CardProof) -> None:
    """The card proved ``row`` (``proof`` verified): record it, tell the merchant, post it.

    Open transactions of the card at the same counter (uncertain ones it superseded, or that
    superseded it) are released first: this verified answer proves they never ran, and
    releasing a refund's load locks its payment, which must come before any ledger account
    (``refunds``: the lock order of a refund's creation). The one ledger transfer comes
    last, so a purchase's merchant payable (a hot account) stays locked only for the
    transfer itself and the commit. A load's proof carries settlement's own MAC2, verified
    equal, so recording it changes nothing.
    """
    linked = row.supersedes is not None or card.open_transaction != row.id
    succeeded = changes.succeeded(
        strategy.kind, row.status, mac2=proof.mac2, tac=proof.tac, now=ctx.now
    )
    record_proof(ctx, strategy, row, card, succeeded)
    if linked or strategy.releases_unlinked:
        release_disproved(ctx, strategy, row, card)
    emit(ctx, strategy, row, Status.SUCCEEDED)
    ctx.session.flush()
    post(ctx, strategy.transfer(row, card))
    strategy.after_success(ctx, row)
    log.info(f"{strategy.name}.succeeded", **{strategy.name: row.id})


def record_proof(
    ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card, succeeded: changes.Changes
) -> None:
    """The card proved ``row``: its columns, the shadow purse one step on, the card's history.

    A payment adds no card event: the payment row (its TAC, counter and ``succeeded_at``)
    is the card's purchase record, listed with the card's events (``routes_admin``).
    """
    assert row.balance_before is not None and row.counter is not None
    changes.apply(row, succeeded)
    settled = changes.card_settled(
        strategy.kind,
        balance_before=row.balance_before,
        amount=row.amount,
        counter=row.counter,
        now=ctx.now,
    )
    changes.apply(card, settled)
    if card.open_transaction == row.id:
        card.open_transaction = None
    if strategy.kind is Kind.PAYMENT:
        return
    event, detail = changes.card_event(
        strategy.kind, row.id, row.amount, row.counter, succeeded["tac"]
    )
    registry.record_event(ctx.session, card, event, ctx.now, detail)


def release_disproved(ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card) -> None:
    """``row``'s verified answer proves the card used its counter for it, so every other open
    transaction of this kind of the card at that counter never ran: release them (spec §6)."""
    model = strategy.model
    others = ctx.session.scalars(
        select(model)
        .where(
            model.card_id == card.id,
            model.status.in_(OPEN),
            model.counter == row.counter,
            model.id != row.id,
        )
        .order_by(model.id)
        .execution_options(populate_existing=True)
    ).all()
    for other in others:
        release(ctx, strategy, other, card, f"counter {row.counter} was used by {row.id}")


def verification_failure(ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card) -> None:
    """Record a card answer that does not verify (kept: the refusal commits it)."""
    registry.record_event(
        ctx.session, card, "verification_failed", ctx.now, {strategy.name: row.id}
    )


def post(ctx: Ctx, transfer: ledger.TransferSpec) -> None:
    """Post one transfer a step built (:mod:`.changes`) in the request's transaction."""
    ledger.post_transfer(
        ctx.session,
        transfer.id,
        transfer.debit_account,
        transfer.credit_account,
        transfer.amount,
        transfer.kind,
        now=ctx.now,
        reference=transfer.reference,
    )
