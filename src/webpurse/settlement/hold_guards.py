"""The card-hold checks an authorisation runs (spec §6): no re-hold at a released bound,
and "send the proof" instead of a decline when settlement can check one.

Queries and decisions only; :mod:`.payments` and :mod:`.loads` call them while authorising,
and :mod:`.holds` (which settles through payments and loads) re-exports them, so the
services and the hold sweep do not import each other. See :mod:`.holds` for the rules.
"""

from __future__ import annotations

import functools
from typing import Any

import structlog
from sqlalchemy import bindparam, select

from webpurse.settlement.db import among_bound, among_values, dialect_name, for_update
from webpurse.settlement.decisions import (
    Decision,
    DeclineCode,
    decide_gap,
    decide_unsettled_load,
)
from webpurse.settlement.errors import conflict
from webpurse.settlement.models import Card, Load, Payment
from webpurse.settlement.service import Ctx
from webpurse.settlement.transactions import OPEN as OPEN
from webpurse.settlement.transactions import Status

log = structlog.get_logger("webpurse.settlement.holds")

HOLD_EXPIRED = "hold_expired"  # decline_code of a payment the sweep released at the bound


def _locked_rows(ctx: Ctx, stmt: Any, *, skip_locked: bool = False) -> list[Any]:
    if for_update(ctx.session):
        stmt = stmt.with_for_update(skip_locked=skip_locked)
    return list(ctx.session.scalars(stmt.execution_options(populate_existing=True)))


def refuse_rehold(ctx: Ctx, card: Card | None, merchant_id: str, counter: int) -> None:
    """No second bound at the same counter: a merchant whose hold of this card at this
    offline counter was released at the bound may not hold it again there (it could forge
    the same INITIALIZE again and again). Its released payment settles by the card's proof
    (heal); once the card's counter moves (any purchase), the card is anyone's again."""
    if card is None or counter != card.offline_counter:
        return
    expired = ctx.session.scalar(
        select(Payment.id)
        .where(
            Payment.card_id == card.id,
            Payment.merchant_id == merchant_id,
            Payment.counter == counter,
            Payment.status == Status.CANCELED,
            Payment.decline_code == HOLD_EXPIRED,
        )
        .limit(1)
    )
    if expired is not None:
        log.warning("hold.rehold_refused", payment=expired, card=card.card_number)
        raise conflict(
            "card_hold_exhausted",
            f"your hold of this card at its counter {counter} ({expired}) was released at the"
            " bound: it cannot be held again at that counter; send the card's proof to"
            " /v1/heal if the debit happened",
        )


def exhausted(ctx: Ctx, merchant_id: str, card_ids: list[str]) -> set[tuple[str, int]]:
    """(card id, offline counter) pairs where :func:`refuse_rehold` refuses the merchant:
    one query for a whole batch (its fast path leaves these to the per-item path)."""
    if not card_ids:
        return set()
    dialect = dialect_name(ctx.session)
    params = {"cards": among_values(dialect, card_ids), "merchant": merchant_id}
    rows = ctx.session.execute(_exhausted_stmt(dialect), params).all()
    return {(str(card_id), int(counter)) for card_id, counter in rows if counter is not None}


@functools.cache
def _exhausted_stmt(dialect: str) -> Any:
    """:func:`exhausted`'s statement, built once (building one costs more than running it)."""
    return select(Payment.card_id, Payment.counter).where(
        among_bound(dialect, Payment.card_id, "cards"),
        Payment.merchant_id == bindparam("merchant"),
        Payment.status == Status.CANCELED,
        Payment.decline_code == HOLD_EXPIRED,
    )


# --- a card one transaction ahead: ask for its proof, settle on a verified one ---------


def _payments_at(ctx: Ctx, card: Card, *, lock: bool) -> list[Payment]:
    """The card's payments at its shadow offline counter that settlement issued MAC1 for
    and that may have run: open, or released (canceled after authorisation)."""
    stmt = (
        select(Payment)
        .where(
            Payment.card_id == card.id,
            Payment.counter == card.offline_counter,
            Payment.mac1.is_not(None),
            Payment.status.in_((*OPEN, Status.CANCELED)),
        )
        .order_by(Payment.id)
    )
    if lock:
        return _locked_rows(ctx, stmt)
    return list(ctx.session.scalars(stmt))


def _loads_at(ctx: Ctx, card: Card, *, lock: bool) -> list[Load]:
    """The card's open loads at its shadow online counter (MAC2 issued, not settled)."""
    stmt = (
        select(Load)
        .where(
            Load.card_id == card.id,
            Load.counter == card.online_counter,
            Load.mac2.is_not(None),
            Load.status.in_(OPEN),
        )
        .order_by(Load.id)
    )
    if lock:
        return _locked_rows(ctx, stmt)
    return list(ctx.session.scalars(stmt))


def heal_instead(
    ctx: Ctx,
    card: Card | None,
    decision: Decision,
    kind: str,
    counter: int,
    balance: int | None = None,
) -> Decision:
    """A counter-ahead decline becomes "send the proof" when settlement can check one; so
    does a purchase's balance-above-the-shadow by an open load's amount (its CREDIT ran)."""
    if card is None:
        return decision
    if (
        kind == "payment"
        and balance is not None
        and decision.decline_code is DeclineCode.BALANCE_MISMATCH
        and balance > card.shadow_balance
    ):
        amounts = [load.amount for load in _loads_at(ctx, card, lock=False)]
        asked = decide_unsettled_load(balance, card.shadow_balance, card.online_counter, amounts)
        return asked or decision
    if decision.decline_code is not DeclineCode.COUNTER_MISMATCH:
        return decision
    shadow = card.offline_counter if kind == "payment" else card.online_counter
    provable = bool(
        _payments_at(ctx, card, lock=False)
        if kind == "payment"
        else _loads_at(ctx, card, lock=False)
    )
    return decide_gap(counter, shadow, kind, provable) or decision
