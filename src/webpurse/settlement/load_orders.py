"""Load orders (top-ups): created funded or waiting for a bank transfer; their funds' return.

Funds are held from the moment the load order is funded (its source → ``held:loads``), so
money is never taken without reaching the card (held → ``card:<id>``) or being returned
(held → its source) — the lesson of the 2007 Octopus top-up incident. Every load is funded
by money settlement received (issue 12, :mod:`webpurse.settlement.funding`): a merchant's
cash top-up draws its prepaid float (``float:<merchant id>``, 409 ``insufficient_float``
beyond it), an online top-up is a ``bank_transfer`` order that waits ``requires_funding``
for the cardholder's money to show on an imported bank statement, and refunds are loads
funded from ``refunds:pending``. A compromised merchant server can move at most its own
float onto cards.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import structlog
from sqlalchemy import select

from webpurse.settlement import (
    funding,
    ledger,
    quotas,
    references,
    refund_outcomes,
    registry,
    statements,
)
from webpurse.settlement.errors import conflict, forbidden, not_found
from webpurse.settlement.ledger import TransferSpec
from webpurse.settlement.merchants import OPERATOR_TERMINAL_ID
from webpurse.settlement.models import Load, Merchant, Transfer
from webpurse.settlement.schemas import LoadCreate
from webpurse.settlement.service import Ctx, new_id
from webpurse.settlement.transactions import CardStatus, Kind, Status, move

log = structlog.get_logger(__name__)

LOAD = Kind.LOAD


def _source_of(ctx: Ctx, load: Load) -> str:
    """The account the load's hold was taken from (funds go back exactly there)."""
    hold = ctx.session.get(Transfer, f"{load.id}:hold")
    if hold is None:
        raise conflict("invalid_load_state", "the load holds no funds")
    return hold.debit_account


def payer_funded(load: Load) -> bool:
    """A bank-transfer order that is funded: the money is the cardholder's, for that card."""
    return load.funding_method == "bank_transfer" and load.status != Status.REQUIRES_FUNDING


def _new_load(
    ctx: Ctx,
    *,
    status: Status,
    amount: int,
    currency: str,
    funding_method: str,
    funding_reference: str,
    merchant_id: str | None,
    card_number: str | None,
    refund_id: str | None = None,
    expires_at: dt.datetime | None = None,
) -> Load:
    """A new load order (no ledger entry: its creator posts the hold, if any)."""
    terminal_id = OPERATOR_TERMINAL_ID
    if merchant_id is not None:
        merchant = ctx.session.get(Merchant, merchant_id)
        if merchant is None:
            raise not_found("merchant")
        terminal_id = merchant.terminal_id
        if refund_id is None:
            quotas.ensure_room(ctx.session, merchant_id, "load", ctx.max_open_orders)
    load = Load(
        id=new_id("load"),
        merchant_id=merchant_id,
        status=status,
        amount=amount,
        currency=currency,
        funding_method=funding_method,
        funding_reference=funding_reference,
        refund_id=refund_id,
        terminal_id=terminal_id,
        key_index=1,
        requested_card_number=card_number.upper() if card_number else None,
        expires_at=expires_at,
        created_at=ctx.now,
        updated_at=ctx.now,
    )
    ctx.session.add(load)
    ctx.session.flush()
    return load


def create_order(
    ctx: Ctx,
    *,
    amount: int,
    currency: str,
    funding_method: str,
    funding_reference: str,
    merchant_id: str | None,
    card_number: str | None,
    refund_id: str | None = None,
    float_low_threshold: int = 0,
    before_hold: Sequence[TransferSpec] = (),
) -> Load:
    """A load funded now: a refund (from ``refunds:pending``) or a merchant's float.

    ``before_hold``: transfers posted with a refund load's hold, first (the refund's
    reserve: every account locked at once, in sorted order).
    """
    if funding_method == "merchant_float" and merchant_id is None:
        raise forbidden("an operator key has no float: merchant_float needs a merchant key")
    if funding_method not in ("refund", "merchant_float"):
        raise conflict("invalid_funding", f"a {funding_method} load is not funded on creation")
    load = _new_load(
        ctx,
        status=Status.REQUIRES_CARD,
        amount=amount,
        currency=currency,
        funding_method=funding_method,
        funding_reference=funding_reference,
        merchant_id=merchant_id,
        card_number=card_number,
        refund_id=refund_id,
    )
    if funding_method == "refund":
        hold = TransferSpec(
            f"{load.id}:hold",
            ledger.REFUNDS_PENDING,
            ledger.HELD_LOADS,
            amount,
            "load_hold",
            load.id,
        )
        ledger.post_transfers(ctx.session, [*before_hold, hold], now=ctx.now)
    else:
        funding.draw_float(ctx.session, load, ctx.now, float_low_threshold)
    log.info("load.created", load=load.id, amount=amount, funding=funding_method)
    return load


def _new_reference(ctx: Ctx) -> str:
    """A payment reference no load has yet (16 random digits: a clash is a re-draw)."""
    while True:
        reference = references.new_reference()
        taken = ctx.session.scalar(
            select(Load.id).where(Load.funding_reference == reference).limit(1)
        )
        if taken is None:
            return reference


def create_transfer_order(
    ctx: Ctx, *, amount: int, currency: str, card_number: str, ttl: dt.timedelta
) -> Load:
    """An online top-up: bound to one card, unfunded (no hold, no entry) until paid.

    The card must be registered and usable now: the cardholder is about to send money for
    it, and a mistyped number would leave that money with nowhere to go but back.
    """
    card = registry.find_card(ctx.session, card_number)
    if card is None:
        raise not_found("card", "card_number")
    if card.status != CardStatus.ACTIVE:
        raise conflict("card_not_loadable", f"the card is {card.status}: it cannot be topped up")
    load = _new_load(
        ctx,
        status=Status.REQUIRES_FUNDING,
        amount=amount,
        currency=currency,
        funding_method="bank_transfer",
        funding_reference=_new_reference(ctx),
        merchant_id=ctx.principal.merchant_id,
        card_number=card_number,
        expires_at=ctx.now + ttl,
    )
    log.info("load.ordered", load=load.id, amount=amount, reference=load.funding_reference)
    return load


def create(ctx: Ctx, body: LoadCreate, policy: funding.FundingPolicy | None = None) -> Load:
    policy = policy or funding.FundingPolicy()
    if body.funding.method == "bank_transfer":
        assert body.card_number is not None  # the schema requires it
        return create_transfer_order(
            ctx,
            amount=body.amount,
            currency=body.currency,
            card_number=body.card_number,
            ttl=policy.bank_transfer_ttl,
        )
    return create_order(
        ctx,
        amount=body.amount,
        currency=body.currency,
        funding_method="merchant_float",
        funding_reference=body.funding.reference or "",
        merchant_id=ctx.principal.merchant_id,
        card_number=body.card_number,
        float_low_threshold=policy.float_low_threshold,
    )


def return_funds(ctx: Ctx, load: Load, status: Status) -> None:
    """No credit happened: the funds go back to their source, the load ends ``status``.

    A refund's load fails its refund in the same posting (:func:`refunds.fail`): the
    amount goes on to the merchant's payable, so no refund waits without a load. A funded
    bank-transfer order's money is the cardholder's: it goes to the exceptions list
    (``returns:awaiting``), for the operator to pay it back, never to anyone else.
    """
    move(LOAD, load, status)
    load.updated_at = ctx.now
    if load.refund_id is not None:
        returned = TransferSpec(
            f"{load.id}:return",
            ledger.HELD_LOADS,
            _source_of(ctx, load),
            load.amount,
            "load_return",
            load.id,
        )
        refund_outcomes.fail(ctx, load.refund_id, returned, f"its load {load.id} is {status}")
        return
    if payer_funded(load):
        funding.add_exception(
            ctx.session,
            kind=statements.Exceptional.LOAD_CANCELED,
            amount=load.amount,
            now=ctx.now,
            debit_account=ledger.HELD_LOADS,
            transfer_id=f"{load.id}:return",
            reference=load.funding_reference,
            load_id=load.id,
            detail=f"the funded order was {status} before reaching the card",
        )
        return
    ledger.post_transfer(
        ctx.session,
        f"{load.id}:return",
        ledger.HELD_LOADS,
        _source_of(ctx, load),
        load.amount,
        "load_return",
        now=ctx.now,
        reference=load.id,
    )
