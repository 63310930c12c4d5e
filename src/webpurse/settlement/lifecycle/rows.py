"""Finding and locking a payment or load, and its card."""

from __future__ import annotations

from sqlalchemy import select

from webpurse.settlement import registry
from webpurse.settlement.errors import conflict, not_found
from webpurse.settlement.lifecycle.strategy import Row, Strategy
from webpurse.settlement.models import Card
from webpurse.settlement.service import Ctx
from webpurse.settlement.transactions import OPEN


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
    (:func:`~.proof.release_disproved`), so they lock the card before any of them: were the
    row taken first, shop A resolving its uncertain payment (its row, then the card) and
    shop B capturing the one that superseded it (its row, the card, then A's row) would
    each hold what the other waits for, and PostgreSQL would abort one as a deadlock. The
    rows are then locked after the card (the others in id order). SQLite serialises writers.
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
