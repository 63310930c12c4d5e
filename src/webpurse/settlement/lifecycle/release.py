"""Endings without a debit or credit: release (the card proved none), cancel, expire."""

from __future__ import annotations

from collections.abc import Callable

from webpurse.protocol.records import IssuerData
from webpurse.settlement import registry
from webpurse.settlement.errors import conflict
from webpurse.settlement.lifecycle.rows import free_card, get
from webpurse.settlement.lifecycle.strategy import Row, Strategy, emit
from webpurse.settlement.models import Card
from webpurse.settlement.schemas import Cancel
from webpurse.settlement.service import Ctx, parse_issuer
from webpurse.settlement.transactions import Kind, Status, move


def release(ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card, reason: str) -> None:
    """The card proved no debit or credit happened for ``row``: close it (its funds back)."""
    assert row.card_id is not None
    strategy.close(ctx, row, Status.CANCELED)
    released(ctx, strategy, row, card, reason)


def released(ctx: Ctx, strategy: Strategy[Row], row: Row, card: Card, reason: str) -> None:
    """``row`` was released (its funds are back): free the card, note it, tell the merchant."""
    free_card(ctx, strategy, row, card)
    event = "purchase_released" if strategy.kind is Kind.PAYMENT else "load_released"
    registry.record_event(
        ctx.session, card, event, ctx.now, {strategy.name: row.id, "reason": reason}
    )
    emit(ctx, strategy, row, Status.CANCELED)


def cancel(
    ctx: Ctx,
    strategy: Strategy[Row],
    object_id: str,
    body: Cancel | None,
    *,
    refused: str,
    guard: Callable[[Row], None] = lambda _row: None,
) -> Row:
    """Cancel before any debit or credit could have been sent (canceling twice is a no-op).

    The kind's ``close`` gives back what the row holds; ``guard`` may refuse first;
    ``refused`` says why a row past ``requires_card`` cannot be canceled. The card's refusal
    a cancel carries is only observed (:func:`note_refusal`).
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
    strategy.close(ctx, row, Status.CANCELED)
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


def expire(ctx: Ctx, strategy: Strategy[Row], row: Row) -> None:
    """An order nobody brought a card for (or, a load, paid for): give back what it holds."""
    if row.status == Status.REQUIRES_FUNDING:  # an unpaid load order: nothing is held
        move(strategy.kind, row, Status.EXPIRED)
        row.updated_at = ctx.now
    else:
        strategy.close(ctx, row, Status.EXPIRED)
    emit(ctx, strategy, row, Status.EXPIRED)
