"""An uncertain transaction (the card's answer was lost) and its resolution (spec §6)."""

from __future__ import annotations

import structlog

from webpurse.protocol.commands import TransactionProof
from webpurse.settlement.decisions import OpenTransaction, Outcome, decide_resolution
from webpurse.settlement.errors import conflict, verification_failed
from webpurse.settlement.lifecycle.proof import succeed, verification_failure
from webpurse.settlement.lifecycle.release import release
from webpurse.settlement.lifecycle.rows import card_of, get, lock_with_card, need_status
from webpurse.settlement.lifecycle.strategy import CardProof, Row, Strategy, emit
from webpurse.settlement.schemas import Resolve
from webpurse.settlement.service import Ctx, parse, parse_issuer
from webpurse.settlement.transactions import OPEN, Status, move

log = structlog.get_logger(__name__)


def mark_uncertain(ctx: Ctx, strategy: Strategy[Row], row: Row) -> None:
    """The card's answer was lost: the row waits for the card's proof or its release."""
    move(strategy.kind, row, Status.UNCERTAIN)
    row.updated_at = ctx.now
    emit(ctx, strategy, row, Status.UNCERTAIN)
    log.warning(f"{strategy.name}.uncertain", **{strategy.name: row.id})


def uncertain(ctx: Ctx, strategy: Strategy[Row], object_id: str) -> Row:
    row = get(ctx, strategy, object_id, lock=True)
    if row.status == Status.UNCERTAIN:
        return row
    need_status(strategy, row, Status.AUTHORISED)
    mark_uncertain(ctx, strategy, row)
    return row


def resolve(ctx: Ctx, strategy: Strategy[Row], object_id: str, body: Resolve) -> Row:
    """Settle an authorised or uncertain transaction from the card's fresh INITIALIZE and,
    once its counter moved, GET TRANSACTION PROVE's answer (spec §6)."""
    row, locked_card = lock_with_card(ctx, strategy, object_id)
    need_status(strategy, row, *OPEN)
    init = strategy.initialize(body.initialize_response)
    card = card_of(strategy, locked_card)
    if (
        body.issuer_data is not None
        and parse_issuer(body.issuer_data).card_number != card.card_number
    ):
        raise conflict(
            "card_mismatch", f"issuer_data names another card than this {strategy.name}'s"
        )
    proof = (
        parse(body.prove_response, "prove_response", TransactionProof.from_data)
        if body.prove_response is not None
        else None
    )
    card_proof = CardProof(tac=proof.tac, mac2=proof.mac2) if proof is not None else None
    open_txn = OpenTransaction(
        id=row.id,
        kind=strategy.name,
        status=row.status,
        counter=row.counter or 0,
        amount=row.amount,
        balance_before=row.balance_before or 0,
        random=bytes.fromhex(row.card_random or ""),
        same_merchant=True,
    )
    resolution = decide_resolution(
        open_txn,
        counter=init.counter,
        balance=init.balance,
        random=init.random,
        proof_given=card_proof is not None,
        proof_valid=card_proof is not None and strategy.verify(ctx, row, card, card_proof),
    )
    outcome = resolution.outcome
    if outcome is Outcome.SUCCEEDED:
        assert card_proof is not None
        succeed(ctx, strategy, row, card, card_proof)
    elif outcome is Outcome.CANCELED:
        release(ctx, strategy, row, card, "resolved: counter did not move")
    elif outcome is Outcome.PROOF_REQUIRED or (
        outcome is Outcome.UNPROVEN and strategy.unproven_needs_proof
    ):
        if strategy.unproven_needs_proof:
            # UNPROVEN: "the counter did not move" is never proof for a load
            # (decide_resolution): nothing changes; one completed at that counter releases it.
            log.info(
                f"{strategy.name}.resolve_needs_proof",
                **{strategy.name: row.id},
                outcome=outcome.value,
                counter=init.counter,
            )
        raise conflict(
            "proof_required",
            resolution.detail,
            extra={
                "recover": {
                    f"{strategy.name}_id": row.id,
                    "transaction_type": f"{strategy.transaction_type:02X}",
                    "counter": open_txn.counter,
                }
            },
        )
    elif outcome is Outcome.PROOF_INVALID:
        verification_failure(ctx, strategy, row, card)
        raise verification_failed(resolution.detail)
    else:
        raise conflict("resolution_mismatch", resolution.detail)
    return row
