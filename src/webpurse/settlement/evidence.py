"""Card checks: the one authenticated, fresh evidence that blocks a card (spec §4, §7).

Sans-I/O: the challenge's APDU and the verdict over values; :mod:`.card_checks` stores
them. Why a check and not the transaction's own answers (docs/settlement-api.md,
"Evidence"): INITIALIZE FOR PURCHASE carries no MAC, and no purchase cryptogram covers the
balance; INITIALIZE FOR LOAD's MAC1 covers balance, amount and terminal under a session
key from the card's random and online counter — authenticated, but the random is the
card's, so a MAC1 recorded at an earlier contact verifies again later. A check makes it
fresh: settlement picks a 6-byte terminal id at random for this one contact (the card puts
it under MAC1 and changes nothing for an amount-0 INITIALIZE, spec §3), so an answer
recorded before the check was issued cannot verify, and the check is used once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from webpurse.protocol.commands import InitializeForLoad
from webpurse.settlement.decisions import CardRecord, Flag

LOAD_KEY_INDEX = 1
NONCE_BYTES = 6  # the terminal id field of INITIALIZE FOR LOAD


def check_apdu(nonce: bytes) -> bytes:
    """INITIALIZE FOR LOAD for amount 0 at the challenge "terminal" ``nonce``."""
    return InitializeForLoad(LOAD_KEY_INDEX, 0, nonce).to_apdu().to_bytes()


class Verdict(StrEnum):
    """What a card check's answer shows."""

    CONSISTENT = "consistent"  # balance and online counter are the shadow's
    CLONE = "clone"  # a card with the real keys is where no genuine card can be
    # Explained by a transaction settlement has not settled (a load or debit whose outcome
    # is uncertain): no verdict on the card; recovery (spec §6) settles it.
    UNSETTLED = "unsettled"
    UNVERIFIED = "unverified"  # MAC1 does not verify: evidence of nothing about the card


@dataclass(frozen=True, slots=True)
class CheckResult:
    verdict: Verdict
    detail: str
    flag: Flag | None = None


def judge_card_check(
    card: CardRecord, *, balance: int, online_counter: int, mac1_valid: bool
) -> CheckResult:
    """The verdict of a fresh INITIALIZE FOR LOAD answer whose MAC1 was checked.

    Only a verified MAC1 says anything, and then only about the card that holds the keys:
    its online counter never goes backwards, and with the online counter where settlement
    left it no load happened since, so the balance cannot be above the shadow (the shadow
    moves only on verified MAC2/TAC). Below the shadow or a counter ahead is what an
    uncertain debit or credit leaves: no verdict.
    """
    if not mac1_valid:
        return CheckResult(Verdict.UNVERIFIED, "the card's MAC1 does not verify for this check")
    if online_counter < card.online_counter:
        return CheckResult(
            Verdict.CLONE, "a card with this card's keys has a counter behind", Flag.CLONE
        )
    if online_counter == card.online_counter and balance > card.shadow_balance:
        return CheckResult(
            Verdict.CLONE, "a card with this card's keys holds more than it can", Flag.CLONE
        )
    if online_counter == card.online_counter and balance == card.shadow_balance:
        return CheckResult(Verdict.CONSISTENT, "the card is where settlement left it")
    return CheckResult(Verdict.UNSETTLED, "the card shows a transaction not yet settled")
