"""Loads (top-ups): a funded order, MAC1 verified → MAC2, TAC verified → value on the card.

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
from typing import NoReturn

import structlog
from sqlalchemy import select

from webpurse.protocol.commands import (
    CreditForLoadResponse,
    InitializeForLoadResponse,
)
from webpurse.protocol.crypto import macs_equal
from webpurse.protocol.records import (
    IssuerData,
    TransactionType,
    decode_bcd_date,
    decode_bcd_time,
)
from webpurse.settlement import (
    changes,
    events,
    funding,
    hold_guards,
    ledger,
    lifecycle,
    quotas,
    references,
    refund_outcomes,
    registry,
    statements,
)
from webpurse.settlement.decisions import Decision, LoadInputs, decide_load
from webpurse.settlement.errors import (
    conflict,
    forbidden,
    not_found,
)
from webpurse.settlement.ledger import TransferSpec
from webpurse.settlement.merchants import OPERATOR_TERMINAL_ID
from webpurse.settlement.models import Card, Load, Merchant, Refund, Transfer
from webpurse.settlement.schemas import Cancel, LoadAuthorise, LoadComplete, LoadCreate, Resolve
from webpurse.settlement.service import Ctx, new_id, parse, parse_issuer
from webpurse.settlement.transactions import CardStatus, Kind, Status, move
from webpurse.settlement.views import load_json as load_json
from webpurse.settlement.views import refund_json

log = structlog.get_logger(__name__)

LOAD = Kind.LOAD


def _source_of(ctx: Ctx, load: Load) -> str:
    """The account the load's hold was taken from (funds go back exactly there)."""
    hold = ctx.session.get(Transfer, f"{load.id}:hold")
    if hold is None:
        raise conflict("invalid_load_state", "the load holds no funds")
    return hold.debit_account


def _payer_funded(load: Load) -> bool:
    """A bank-transfer order that is funded: the money is the cardholder's, for that card."""
    return load.funding_method == "bank_transfer" and load.status != Status.REQUIRES_FUNDING


def get_load(ctx: Ctx, load_id: str, *, lock: bool = False) -> Load:
    return lifecycle.get(ctx, STRATEGY, load_id, lock=lock)


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


def _return_funds(ctx: Ctx, load: Load, status: Status) -> None:
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
    if _payer_funded(load):
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


def _mac1_valid(
    ctx: Ctx,
    load: Load,
    card: Card | None,
    issuer: IssuerData,
    init: InitializeForLoadResponse,
    terminal_id: bytes,
) -> bool:
    """Whether the card's INITIALIZE FOR LOAD MAC1 verifies (False for an unknown card)."""
    if card is None or init.key_version != card.key_version:
        return False
    return ctx.security.verify_load_mac1(
        issuer.serial,
        card.key_version,
        random=init.random,
        online_counter=init.online_counter,
        balance=init.balance,
        amount=load.amount,
        terminal_id=terminal_id,
        mac1=init.mac1,
    )


def _decide(
    ctx: Ctx,
    load: Load,
    card: Card | None,
    issuer: IssuerData,
    init: InitializeForLoadResponse,
    terminal_id: bytes,
    mac1_valid: bool,
) -> Decision:
    """The load decision on the card's answers, healed if the card's open hold allows it."""
    record = registry.card_record(ctx.session, card, load.merchant_id) if card else None
    decision = decide_load(
        record,
        LoadInputs(
            issuer=issuer,
            initialize=init,
            terminal_id=terminal_id,
            merchant_terminal_id=bytes.fromhex(load.terminal_id),
            amount=load.amount,
            mac1_valid=mac1_valid,
            bound_card_number=load.requested_card_number,
        ),
        ctx.now,
    )
    return hold_guards.heal_instead(ctx, card, decision, "load", init.online_counter)


def _decline(
    ctx: Ctx,
    load: Load,
    card: Card | None,
    issuer: IssuerData,
    init: InitializeForLoadResponse,
    decision: Decision,
    mac1_valid: bool,
) -> NoReturn:
    """Refuse the load: its funds go back, unless a funded bank-transfer order keeps them."""
    # A funded bank-transfer order waits for its own card: a decline changes nothing of it.
    if card is not None and not _payer_funded(load):
        load.card_id = card.id
        load.card_number = card.card_number
    # A MAC1 that does not verify is anyone's; one that does may be a recording (its
    # random is the card's).
    claimed = {
        "balance": init.balance,
        "counter": init.online_counter,
        "mac1_verified": mac1_valid,
    }
    lifecycle.decline(ctx, STRATEGY, load, card, issuer.card_number, decision, claimed)


def _bind_and_sign(
    ctx: Ctx,
    load: Load,
    card: Card,
    issuer: IssuerData,
    init: InitializeForLoadResponse,
    terminal_id: bytes,
    decision: Decision,
) -> None:
    """Approved: bind the load to the card's INITIALIZE and compute the MAC2 it credits with."""
    date, time = lifecycle.bind(
        ctx,
        STRATEGY,
        load,
        card,
        lifecycle.Initialize(init.online_counter, init.balance, init.random),
        card_number=card.card_number,
        supersedes=decision.supersedes,
    )
    mac2 = ctx.security.load_mac2(
        issuer.serial,
        card.key_version,
        random=init.random,
        online_counter=init.online_counter,
        amount=load.amount,
        terminal_id=terminal_id,
        date=date,
        time=time,
    )
    load.mac2 = mac2.hex().upper()


def authorise(ctx: Ctx, load_id: str, body: LoadAuthorise) -> Load:
    load = lifecycle.waiting_for_card(ctx, STRATEGY, load_id)
    issuer = parse_issuer(body.issuer_data)
    init = parse(
        body.initialize_response, "initialize_response", InitializeForLoadResponse.from_data
    )
    terminal_id = bytes.fromhex(body.terminal_id)
    card = registry.find_card(ctx.session, issuer.card_number, lock=True)
    mac1_valid = _mac1_valid(ctx, load, card, issuer, init, terminal_id)
    decision = _decide(ctx, load, card, issuer, init, terminal_id, mac1_valid)
    load.updated_at = ctx.now
    if not decision.approved:
        _decline(ctx, load, card, issuer, init, decision, mac1_valid)
    assert card is not None
    _bind_and_sign(ctx, load, card, issuer, init, terminal_id, decision)
    log.info("load.authorised", load=load.id, card=card.card_number)
    return load


def _verify_tac(ctx: Ctx, load: Load, card: Card, tac: bytes) -> bool:
    assert load.balance_before is not None and load.counter is not None
    return ctx.security.verify_load_tac(
        bytes.fromhex(card.card_number),
        load.key_version or card.key_version,
        new_balance=load.balance_before + load.amount,
        online_counter=load.counter,
        amount=load.amount,
        terminal_id=bytes.fromhex(load.terminal_id),
        date=decode_bcd_date(bytes.fromhex(load.txn_date or "")),
        time=decode_bcd_time(bytes.fromhex(load.txn_time or "")),
        tac=tac,
    )


def _proves(ctx: Ctx, load: Load, card: Card, proof: lifecycle.CardProof) -> bool:
    """The TAC verifies, and a MAC2 the answer carries (GET TRANSACTION PROVE's) is the one
    settlement issued; CREDIT FOR LOAD's answer carries none."""
    if proof.mac2 is not None and not macs_equal(bytes.fromhex(load.mac2 or ""), proof.mac2):
        return False
    return _verify_tac(ctx, load, card, proof.tac)


def _credit(load: Load, card: Card) -> TransferSpec:
    """The load's one ledger transfer at completion: ``held:loads`` → the card."""
    return changes.load_credit(load.id, card.id, load.amount)


def _refund_succeeded(ctx: Ctx, load: Load) -> None:
    """A refund's load reached the card: the refund succeeded."""
    if load.refund_id is None:
        return
    refund = ctx.session.get(Refund, load.refund_id)
    if refund is not None and refund.status == Status.PENDING:
        move(Kind.REFUND, refund, Status.SUCCEEDED)
        refund.updated_at = ctx.now
        events.emit(
            ctx.session,
            refund.merchant_id,
            "refund.succeeded",
            refund_json(refund),
            now=ctx.now,
        )


def complete(ctx: Ctx, load_id: str, body: LoadComplete) -> Load:
    def answer() -> lifecycle.CardProof:
        credit = parse(body.credit_response, "credit_response", CreditForLoadResponse.from_data)
        return lifecycle.CardProof(tac=credit.tac)

    return lifecycle.prove(
        ctx, STRATEGY, load_id, answer, "the card's TAC does not verify for this load"
    )


def uncertain(ctx: Ctx, load_id: str) -> Load:
    return lifecycle.uncertain(ctx, STRATEGY, load_id)


def mark_uncertain(ctx: Ctx, load: Load) -> None:
    lifecycle.mark_uncertain(ctx, STRATEGY, load)


def resolve(ctx: Ctx, load_id: str, body: Resolve) -> Load:
    return lifecycle.resolve(ctx, STRATEGY, load_id, body)


def cancel(ctx: Ctx, load_id: str, body: Cancel | None = None) -> Load:
    def guard(load: Load) -> None:
        if _payer_funded(load) and not ctx.principal.is_operator:
            raise conflict(
                "payer_funded",
                "the cardholder paid for this load by bank transfer: it waits for their card",
            )

    return lifecycle.cancel(
        ctx,
        STRATEGY,
        load_id,
        body,
        refused="only a load before any credit can be canceled",
        guard=guard,
    )


def expire(ctx: Ctx, load: Load) -> None:
    """A load order nobody brought a card for (or paid for): return any funds."""
    lifecycle.expire(ctx, STRATEGY, load)


def _initialize(text: str) -> lifecycle.Initialize:
    init = parse(text, "initialize_response", InitializeForLoadResponse.from_data)
    return lifecycle.Initialize(init.online_counter, init.balance, init.random)


STRATEGY: lifecycle.Strategy[Load] = lifecycle.Strategy(
    kind=LOAD,
    model=Load,
    transaction_type=TransactionType.EP_LOAD,
    to_json=load_json,
    events={
        Status.DECLINED: "load.failed",
        Status.SUCCEEDED: "load.succeeded",
        Status.UNCERTAIN: "load.uncertain",
        Status.CANCELED: "load.failed",
        Status.EXPIRED: "load.failed",
    },
    initialize=_initialize,
    verify=_proves,
    close=_return_funds,
    transfer=_credit,
    keeps_on_decline=_payer_funded,
    releases_unlinked=True,
    unproven_needs_proof=True,
    after_success=_refund_succeeded,
)
