"""Card checks in the database: offered on an unauthenticated mismatch, answered once.

A purchase or load declined because the card's answer does not match the shadow
(``counter_mismatch``, ``balance_mismatch``) records an observation and offers the merchant
a card check: one INITIALIZE FOR LOAD for amount 0 at a terminal id settlement picked at
random (:mod:`.evidence`). The merchant relays it in the same contact and posts the
card's answer; a verified MAC1 that puts the card where no genuine card can be blocks it
as a clone. Anything else changes nothing on the card.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import replace
from typing import Any

import structlog

from webpurse.protocol.commands import InitializeForLoadResponse
from webpurse.settlement import registry
from webpurse.settlement.decisions import Decision, Observation
from webpurse.settlement.errors import conflict
from webpurse.settlement.evidence import NONCE_BYTES, Verdict, check_apdu, judge_card_check
from webpurse.settlement.models import Card, CardCheck
from webpurse.settlement.service import Ctx, get_owned, new_id, parse
from webpurse.settlement.transactions import CardStatus

log = structlog.get_logger(__name__)

CHECK_TTL = dt.timedelta(minutes=5)


def check_json(check: CardCheck) -> dict[str, Any]:
    return {
        "id": check.id,
        "object": "card_check",
        "initialize_apdu": check_apdu(bytes.fromhex(check.nonce)).hex().upper(),
        "expires_at": check.expires_at.isoformat(),
        "verdict": check.verdict,
    }


def on_decline(
    ctx: Ctx,
    card: Card | None,
    card_number: str,
    decision: Decision,
    *,
    reference: str,
    merchant_id: str | None,
    claimed: dict[str, Any],
) -> dict[str, Any] | None:
    """A declined transaction's observation: record it; offer a check on a shadow mismatch.

    Returns the check to put in the decline (``card_check``), or None. The card row is
    not touched: whatever the answer claimed, it declines this transaction only.
    """
    if decision.observation is None:
        return None
    registry.observe(
        ctx.session,
        card_number,
        decision.observation,
        ctx.now,
        merchant_id=merchant_id,
        reference=reference,
        detail={"decline_code": str(decision.decline_code), **claimed},
    )
    if (
        card is None
        or card.status != CardStatus.ACTIVE
        or decision.observation is Observation.MAC1_INVALID
    ):
        return None
    check = CardCheck(
        id=new_id("chk"),
        card_id=card.id,
        merchant_id=merchant_id,
        nonce=secrets.token_bytes(NONCE_BYTES).hex().upper(),
        shadow_balance=card.shadow_balance,
        online_counter=card.online_counter,
        reference=reference,
        created_at=ctx.now,
        expires_at=ctx.now + CHECK_TTL,
    )
    ctx.session.add(check)
    return check_json(check)


def answer(ctx: Ctx, check_id: str, initialize_response: str) -> CardCheck:
    """The card's answer to check ``check_id``: verify MAC1, judge, block a real clone."""
    check = get_owned(ctx, CardCheck, check_id, "card_check")
    init = parse(initialize_response, "initialize_response", InitializeForLoadResponse.from_data)
    card = registry.lock_card_id(ctx.session, check.card_id)
    assert card is not None
    if check.used_at is not None:
        raise conflict("card_check_used", "this card check was answered already")
    if ctx.now >= check.expires_at:
        raise conflict("card_check_expired", "this card check has expired")
    check.used_at = ctx.now
    nonce = bytes.fromhex(check.nonce)
    mac1_valid = init.key_version == card.key_version and ctx.security.verify_load_mac1(
        bytes.fromhex(card.card_number),
        card.key_version,
        random=init.random,
        online_counter=init.online_counter,
        balance=init.balance,
        amount=0,
        terminal_id=nonce,
        mac1=init.mac1,
    )
    # Judged against the shadow when the check was issued: a genuine card answers at or
    # after that, and from then on its balance at that online counter can only go down.
    issued = replace(
        registry.record_of(card),
        shadow_balance=check.shadow_balance,
        online_counter=check.online_counter,
    )
    result = judge_card_check(
        issued,
        balance=init.balance,
        online_counter=init.online_counter,
        mac1_valid=mac1_valid,
    )
    check.verdict = result.verdict.value
    evidence = {
        "check": check.id,
        "merchant": check.merchant_id,
        "declined": check.reference,
        "balance": init.balance,
        "online_counter": init.online_counter,
        "shadow_balance": check.shadow_balance,
        "shadow_online_counter": check.online_counter,
    }
    if result.flag is not None:
        registry.block_clone(ctx.session, card, ctx.now, {**evidence, "why": result.detail})
    elif result.verdict is Verdict.UNVERIFIED:
        registry.observe(
            ctx.session,
            card.card_number,
            Observation.CHECK_UNVERIFIED,
            ctx.now,
            merchant_id=check.merchant_id,
            reference=check.id,
            detail={"declined": check.reference},
        )
    log.info("card_check.answered", check=check.id, verdict=result.verdict.value)
    return check
