"""The card-transaction lifecycle, written once over payments and loads.

A payment (a debit) and a load (a credit) go through the same steps: authorised with the
card locked, declined, proven (capture / complete), uncertain, resolved from the card's
counter and proof, released, canceled, expired (docs/architecture.md draws the table).
The steps are here; what differs per kind — its INITIALIZE parser, its MAC step, its proof
check, its ledger accounts, its counter, its event names — is the kind's
:class:`Strategy`, defined beside its service (:data:`.payments.STRATEGY`,
:data:`.loads.STRATEGY`). Every status change goes through the lifecycle table
(:mod:`.transactions`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

import structlog
from sqlalchemy import select

from webpurse.protocol.commands import TransactionProof
from webpurse.protocol.records import IssuerData, TransactionType
from webpurse.settlement import card_checks, changes, events, ledger, registry
from webpurse.settlement.decisions import (
    Decision,
    DeclineCode,
    OpenTransaction,
    Outcome,
    decide_resolution,
)
from webpurse.settlement.errors import conflict, declined, not_found, verification_failed
from webpurse.settlement.ledger import TransferSpec
from webpurse.settlement.models import Card, Load, Payment
from webpurse.settlement.schemas import Cancel, Resolve
from webpurse.settlement.service import Ctx, card_time, parse, parse_issuer
from webpurse.settlement.transactions import OPEN, Kind, Status, move

log = structlog.get_logger(__name__)

Row = TypeVar("Row", Payment, Load)
A = TypeVar("A")


@dataclass(frozen=True, slots=True)
class Initialize:
    """What resolve reads of the card's fresh INITIALIZE answer (either command's)."""

    counter: int  # offline (purchase) or online (load)
    balance: int
    random: bytes


@dataclass(frozen=True)
class Strategy(Generic[Row]):
    """One kind of card transaction: what the shared steps need to know of it."""

    kind: Kind
    model: type[Row]
    transaction_type: TransactionType  # its GET TRANSACTION PROVE type
    to_json: Callable[[Row], dict[str, Any]]
    events: dict[Status, str]  # the webhook event a move to this status emits
    initialize: Callable[[str], Initialize]  # parse the card's INITIALIZE answer
    proof_valid: Callable[[Ctx, Row, Card, TransactionProof], bool]
    succeed: Callable[[Ctx, Row, Card, TransactionProof], None]  # with a verified proof
    release: Callable[[Ctx, Row, Card, str], None]
    unproven_needs_proof: bool  # a load: "the counter did not move" proves nothing

    @property
    def name(self) -> str:
        return self.kind.value


def emit(ctx: Ctx, strategy: Strategy[Row], row: Row, status: Status) -> None:
    """The kind's webhook event for ``row`` now being ``status``."""
    events.emit(
        ctx.session, row.merchant_id, strategy.events[status], strategy.to_json(row), now=ctx.now
    )


def get(ctx: Ctx, strategy: Strategy[Row], object_id: str, *, lock: bool = False) -> Row:
    """The caller's payment or load (another merchant's is "no such": 404)."""
    model = strategy.model
    stmt = select(model).where(model.id == object_id)
    if not ctx.principal.is_operator:
        stmt = stmt.where(model.merchant_id == ctx.principal.merchant_id)
    if lock and ctx.session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = ctx.session.scalars(stmt.execution_options(populate_existing=lock)).first()
    if row is None:
        raise not_found(strategy.name, "id")
    return row


def need_status(strategy: Strategy[Row], row: Row, *allowed: str) -> None:
    if row.status not in allowed:
        raise conflict(
            f"invalid_{strategy.name}_state",
            f"the {strategy.name} is {row.status}; this needs {' or '.join(allowed)}",
        )


def lock_with_card(ctx: Ctx, strategy: Strategy[Row], object_id: str) -> tuple[Row, Card | None]:
    """The payment or load and its card, both locked on PostgreSQL: the card row first.

    Capture, complete and resolve may release *other* transactions of the card
    (:func:`release_disproved`), so they lock the card before any of them: were the row
    taken first, shop A resolving its uncertain payment (its row, then the card) and shop B
    capturing the one that superseded it (its row, the card, then A's row) would each hold
    what the other waits for, and PostgreSQL would abort one as a deadlock. The rows are
    then locked after the card (the others in id order). SQLite serialises writers.
    """
    model = strategy.model
    owner = select(model.card_id).where(model.id == object_id)
    if not ctx.principal.is_operator:
        owner = owner.where(model.merchant_id == ctx.principal.merchant_id)
    card_id = ctx.session.scalar(owner)
    card = registry.lock_card_id(ctx.session, card_id) if card_id else None
    row = get(ctx, strategy, object_id, lock=True)
    if row.card_id != card_id:  # authorised in between: its card is locked only now
        card = registry.lock_card_id(ctx.session, row.card_id) if row.card_id else None
    return row, card


def card_of(strategy: Strategy[Row], card: Card | None) -> Card:
    if card is None:
        raise conflict(f"invalid_{strategy.name}_state", f"the {strategy.name} has no card")
    return card


def still_open(ctx: Ctx, strategy: Strategy[Row], row: Row) -> str | None:
    """The newest transaction ``row`` superseded that is still open: the card's open one now."""
    seen = {row.id}
    older_id = row.supersedes
    while older_id is not None and older_id not in seen:
        seen.add(older_id)
        older = ctx.session.get(strategy.model, older_id)
        if older is None:
            return None
        if older.status in OPEN and older.card_id == row.card_id:
            return older.id
        older_id = older.supersedes
    return None


def free_card(ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card) -> None:
    """``row`` is settled: the card's open transaction is the one it superseded, if open."""
    if card.open_transaction == row.id:
        card.open_transaction = still_open(ctx, strategy, row)
    card.updated_at = ctx.now


def bind(
    ctx: Ctx,
    strategy: Strategy[Row],
    row: Row,
    card: Card,
    init: Initialize,
    *,
    card_number: str,
    supersedes: OpenTransaction | None,
) -> tuple[dt.date, dt.time]:
    """Authorise: ``row`` is bound to the card's INITIALIZE and is the card's open one
    (past ``supersedes``, an uncertain one at the same counter, if the decision said so).

    Returns the transaction's date and time (what the MAC covers)."""
    if supersedes is not None:
        log.info(
            f"{strategy.name}.supersedes",
            **{strategy.name: row.id},
            uncertain=supersedes.id,
            counter=init.counter,
        )
    date, time = card_time(ctx.now)
    changes.apply(
        row,
        changes.authorised(
            strategy.kind,
            row.status,
            card_id=card.id,
            card_number=card_number,
            key_version=card.key_version,
            balance=init.balance,
            counter=init.counter,
            random=init.random,
            date=date,
            time=time,
            now=ctx.now,
            supersedes=supersedes.id if supersedes is not None else None,
        ),
    )
    card.open_transaction = row.id
    card.updated_at = ctx.now
    return date, time


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


def released(ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card, reason: str) -> None:
    """``row`` was released (its funds are back): free the card, note it, tell the merchant."""
    free_card(ctx, strategy, row, card)
    event = "purchase_released" if strategy.kind is Kind.PAYMENT else "load_released"
    registry.record_event(
        ctx.session, card, event, ctx.now, {strategy.name: row.id, "reason": reason}
    )
    emit(ctx, strategy, row, Status.CANCELED)


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
        strategy.release(ctx, other, card, f"counter {row.counter} was used by {row.id}")


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


def verification_failure(ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card) -> None:
    """Record a card answer that does not verify (kept: the refusal commits it)."""
    registry.record_event(
        ctx.session, card, "verification_failed", ctx.now, {strategy.name: row.id}
    )


def prove(
    ctx: Ctx,
    strategy: Strategy[Row],
    object_id: str,
    answer: Callable[[], A],
    verified: Callable[[Row, Card, A], bool],
    succeed: Callable[[Row, Card, A], None],
    failure: str,
) -> Row:
    """Capture or complete: the card's answer to the DEBIT or CREDIT proves it.

    An uncertain transaction (the sweep timed it out) is proven too when the card's own
    answer arrives: it proves the debit or credit just as well as GET TRANSACTION PROVE.
    """
    row, locked_card = lock_with_card(ctx, strategy, object_id)
    need_status(strategy, row, *OPEN)
    parsed = answer()
    card = card_of(strategy, locked_card)
    if not verified(row, card, parsed):
        verification_failure(ctx, strategy, row, card)
        raise verification_failed(failure)
    succeed(row, card, parsed)
    return row


def decline(
    ctx: Ctx,
    strategy: Strategy[Row],
    row: Row,
    card: Card | None,
    card_number: str,
    decision: Decision,
    claimed: dict[str, Any],
    fail: Callable[[], None],
) -> NoReturn:
    """Refuse the authorisation: 402 ``card_declined`` (kept: the decline is recorded).

    The card's INITIALIZE carries no MAC (and a load's MAC1 may be a recording): a mismatch
    declines this transaction, is observed for the operator and offers a card check; the
    card stays as it is. ``recovery_required`` leaves the row waiting for its card (pay it
    once the open transaction is settled); any other decline runs ``fail``.
    """
    assert decision.decline_code is not None
    extra: dict[str, Any] = {}
    check = card_checks.on_decline(
        ctx,
        card,
        card_number,
        decision,
        reference=row.id,
        merchant_id=row.merchant_id,
        claimed=claimed,
    )
    if check is not None:
        extra["card_check"] = check
    if decision.decline_code is DeclineCode.RECOVERY_REQUIRED and decision.recover:
        extra["recover"] = decision.recover.to_json()
    else:
        fail()
    extra[strategy.name] = strategy.to_json(row)
    log.info(
        f"{strategy.name}.declined",
        **{strategy.name: row.id},
        decline_code=decision.decline_code.value,
    )
    raise declined(decision.decline_code.value, decision.detail, extra=extra)


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
        proof_given=proof is not None,
        proof_valid=proof is not None and strategy.proof_valid(ctx, row, card, proof),
    )
    outcome = resolution.outcome
    if outcome is Outcome.SUCCEEDED:
        assert proof is not None
        strategy.succeed(ctx, row, card, proof)
    elif outcome is Outcome.CANCELED:
        strategy.release(ctx, row, card, "resolved: counter did not move")
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


def post(ctx: Ctx, transfer: TransferSpec) -> None:
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


def hold(ctx: Ctx, row: Payment, card: Card) -> None:
    """Authorise's hold: nothing is posted (the payment's status holds the amount), but the
    card's available value must cover it, else the ledger's refusal (409 ``ledger_refused``)
    as when a transfer to ``held:purchases`` overdrew the card (:mod:`.changes`)."""
    available = ledger.available(ctx.session, [card.id], excluding=row.id)[card.id]
    refusal = changes.purchase_hold_refusal(
        card.id,
        available.amount,
        row.amount,
        currency=row.currency,
        account_currency=available.currency,
    )
    if refusal is not None:
        raise ledger.LedgerError(refusal)


def cancel(
    ctx: Ctx,
    strategy: Strategy[Row],
    object_id: str,
    body: Cancel | None,
    *,
    refused: str,
    release: Callable[[Row], None],
    guard: Callable[[Row], None] = lambda _row: None,
) -> Row:
    """Cancel before any debit or credit could have been sent (canceling twice is a no-op).

    ``release`` gives back what the row holds; ``guard`` may refuse first; ``refused`` says
    why a row past ``requires_card`` cannot be canceled. The card's refusal a cancel
    carries is only observed (:func:`note_refusal`).
    """
    row = get(ctx, strategy, object_id, lock=True)
    issuer = parse_issuer(body.issuer_data) if body and body.issuer_data else None
    if row.status == Status.CANCELED:
        return row
    if row.status == Status.REQUIRES_FUNDING:  # an unpaid load order: nothing is held
        move(strategy.kind, row, Status.CANCELED)
        row.updated_at = ctx.now
        emit(ctx, strategy, row, Status.CANCELED)
        return row
    guard(row)
    if row.status != Status.REQUIRES_CARD:
        raise conflict(
            f"invalid_{strategy.name}_state", f"the {strategy.name} is {row.status}: {refused}"
        )
    release(row)
    note_refusal(ctx, row, issuer, body)
    emit(ctx, strategy, row, Status.CANCELED)
    return row


def note_refusal(ctx: Ctx, row: Row, issuer: IssuerData | None, body: Cancel | None) -> None:
    """A cancel that carries the card's refusal (9303: it locked itself): observe it for the
    operator; the card is not touched."""
    if issuer is None or body is None or body.card_status_word is None:
        return
    registry.note_card_refusal(
        ctx.session,
        issuer.card_number,
        body.card_status_word,
        ctx.now,
        merchant_id=row.merchant_id,
        reference=row.id,
    )
