"""Loads (top-ups) at the card: MAC1 verified → MAC2, TAC verified → value on the card.

A load order (:mod:`.load_orders`) holds its funds in ``held:loads`` until they reach the
card (held → ``card:<id>``, at completion) or go back to their source
(:func:`.load_orders.return_funds`, the load's ``close`` in its strategy).
"""

from __future__ import annotations

from typing import NoReturn

import structlog

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
    hold_guards,
    lifecycle,
    load_orders,
    registry,
)
from webpurse.settlement.decisions import Decision, LoadInputs, decide_load
from webpurse.settlement.errors import conflict
from webpurse.settlement.ledger import TransferSpec
from webpurse.settlement.models import Card, Load, Refund
from webpurse.settlement.schemas import Cancel, LoadAuthorise, LoadComplete, Resolve
from webpurse.settlement.service import Ctx, parse, parse_issuer
from webpurse.settlement.transactions import Kind, Status, move
from webpurse.settlement.views import load_json as load_json
from webpurse.settlement.views import refund_json

log = structlog.get_logger(__name__)

LOAD = Kind.LOAD


def get_load(ctx: Ctx, load_id: str, *, lock: bool = False) -> Load:
    return lifecycle.get(ctx, STRATEGY, load_id, lock=lock)


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
    if card is not None and not load_orders.payer_funded(load):
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
        if load_orders.payer_funded(load) and not ctx.principal.is_operator:
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
    close=load_orders.return_funds,
    transfer=_credit,
    keeps_on_decline=load_orders.payer_funded,
    releases_unlinked=True,
    unproven_needs_proof=True,
    after_success=_refund_succeeded,
)
