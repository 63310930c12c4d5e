"""Authorise's shared steps: the row waiting for its card, the decline, the binding to the
card's INITIALIZE (each kind adds its MAC step: :mod:`..payments`, :mod:`..loads`)."""

from __future__ import annotations

import datetime as dt
from typing import Any, NoReturn

import structlog

from webpurse.settlement import card_checks, changes, ledger
from webpurse.settlement.decisions import Decision, DeclineCode, OpenTransaction
from webpurse.settlement.errors import conflict, declined
from webpurse.settlement.lifecycle.rows import get, need_status
from webpurse.settlement.lifecycle.strategy import Initialize, Row, Strategy, emit
from webpurse.settlement.models import Card, Payment
from webpurse.settlement.service import Ctx, card_time
from webpurse.settlement.transactions import Status

log = structlog.get_logger(__name__)


def waiting_for_card(ctx: Ctx, strategy: Strategy[Row], object_id: str) -> Row:
    """The row, locked, funded (a load) and waiting for its card (409 otherwise)."""
    row = get(ctx, strategy, object_id, lock=True)
    if row.status == Status.REQUIRES_FUNDING:
        raise conflict(
            f"{strategy.name}_not_funded",
            f"the bank transfer for this {strategy.name} has not arrived yet"
            " (status requires_funding)",
        )
    need_status(strategy, row, Status.REQUIRES_CARD)
    return row


def decline(
    ctx: Ctx,
    strategy: Strategy[Row],
    row: Row,
    card: Card | None,
    card_number: str,
    decision: Decision,
    claimed: dict[str, Any],
) -> NoReturn:
    """Refuse the authorisation: 402 ``card_declined`` (kept: the decline is recorded).

    The card's INITIALIZE carries no MAC (and a load's MAC1 may be a recording): a mismatch
    declines this transaction, is observed for the operator and offers a card check; the
    card stays as it is. ``recovery_required`` leaves the row waiting for its card (pay it
    once the open transaction is settled); any other decline ends the row ``declined``,
    giving back what it holds, unless the kind keeps it (:func:`fail`).
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
        fail(ctx, strategy, row, decision)
    extra[strategy.name] = strategy.to_json(row)
    log.info(
        f"{strategy.name}.declined",
        **{strategy.name: row.id},
        decline_code=decision.decline_code.value,
    )
    raise declined(decision.decline_code.value, decision.detail, extra=extra)


def fail(ctx: Ctx, strategy: Strategy[Row], row: Row, decision: Decision) -> None:
    """The decline ends ``row``: ``declined``, its funds back, the merchant told."""
    assert decision.decline_code is not None
    if strategy.keeps_on_decline(row):
        log.info(
            f"{strategy.name}.declined_kept",
            **{strategy.name: row.id},
            decline_code=decision.decline_code.value,
        )
        return
    row.decline_code = decision.decline_code.value
    strategy.close(ctx, row, Status.DECLINED)
    emit(ctx, strategy, row, Status.DECLINED)


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
