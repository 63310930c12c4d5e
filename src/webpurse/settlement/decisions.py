"""The settlement decisions as pure functions over values: authorise? decline why? settle?

No database, no keys, no clock: visible pass the card record, the card's parsed answers,
whether the MACs verified, and ``now``. Spec references: pboc-epurse.md §6 (interrupted
transactions) and §7 (what the host must check).
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass
from enum import StrEnum

from webpurse.protocol.commands import InitializeForLoadResponse, InitializeForPurchaseResponse
from webpurse.protocol.records import ApplicationType, IssuerData, TransactionType
from webpurse.settlement.transactions import CardStatus, Status


class DeclineCode(StrEnum):
    UNKNOWN_CARD = "unknown_card"
    CARD_BLOCKED = "card_blocked"
    CARD_LOST = "card_lost"
    CARD_EXPIRED = "card_expired"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    COUNTER_MISMATCH = "counter_mismatch"
    BALANCE_MISMATCH = "balance_mismatch"
    INVALID_STATE = "invalid_state"
    AMOUNT_MISMATCH = "amount_mismatch"
    TERMINAL_MISMATCH = "terminal_mismatch"
    RECOVERY_REQUIRED = "recovery_required"
    # loads only
    BALANCE_LIMIT_EXCEEDED = "balance_limit_exceeded"
    MAC_INVALID = "mac_invalid"


class Flag(StrEnum):
    """What authenticated, fresh evidence says about a card (a card check, spec §7).

    Only :func:`judge_card_check` produces one: ``CLONE`` blocks (blacklists) the card.
    """

    CLONE = "suspected_clone"


class Observation(StrEnum):
    """An unauthenticated mismatch: it declines the transaction at hand and nothing else.

    Recorded for the operator (``card_observations``), never on the card: INITIALIZE FOR
    PURCHASE carries no MAC, an INITIALIZE FOR LOAD's MAC1 can be replayed, and a status
    word or a MAC that does not verify can be sent by anyone naming any card number
    (docs/settlement-api.md, "Evidence").
    """

    COUNTER_BEHIND = "counter_behind"
    COUNTER_AHEAD = "counter_ahead"
    BALANCE_ABOVE = "balance_above"
    BALANCE_BELOW = "balance_below"
    MAC1_INVALID = "mac1_invalid"
    CARD_LOCKED_CLAIM = "card_locked_claim"  # a merchant relays 9303 (spec §5)
    CHECK_UNVERIFIED = "check_unverified"  # a card check's MAC1 did not verify


@dataclass(frozen=True, slots=True)
class OpenTransaction:
    """The card's one open transaction (MAC1 or MAC2 issued, not settled)."""

    id: str
    kind: str  # "payment" | "load"
    status: str  # Status.AUTHORISED | Status.UNCERTAIN
    counter: int  # the counter INITIALIZE returned for it (before the debit/credit)
    amount: int
    balance_before: int
    random: bytes
    same_merchant: bool
    # The caller's own open transaction of this card at the same counter when this one
    # is another merchant's: one that this one supersedes (see ``Decision.supersedes``).
    own_id: str | None = None

    @property
    def transaction_type(self) -> TransactionType:
        return TransactionType.EP_PURCHASE if self.kind == "payment" else TransactionType.EP_LOAD


@dataclass(frozen=True, slots=True)
class CardRecord:
    """What settlement knows about a card, as values (spec §7: the shadow of the purse)."""

    card_number: str
    status: str
    issuer_id: bytes
    key_version: int
    start_date: dt.date
    expiry_date: dt.date
    max_balance: int
    shadow_balance: int
    online_counter: int
    offline_counter: int
    open_transaction: OpenTransaction | None = None
    # The stored value not held by open transactions (the ``card:`` ledger account); None
    # when nothing is open (then it is the shadow balance).
    available: int | None = None


@dataclass(frozen=True, slots=True)
class Recover:
    """What the terminal must do first: recover the open transaction of this type.

    ``counter`` is the counter the interrupted transaction used (INITIALIZE returned it);
    GET TRANSACTION PROVE names the card's current counter, i.e. ``counter + 1`` (spec §3).
    """

    transaction_type: TransactionType
    counter: int
    payment_id: str | None = None
    load_id: str | None = None
    # The card's counter is one ahead of the shadow and settlement issued a MAC for that
    # missing counter: whoever holds the card may send PROVE's answer to /v1/heal.
    heal: bool = False

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "transaction_type": f"{self.transaction_type:02X}",
            "counter": self.counter,
        }
        if self.payment_id:
            body["payment_id"] = self.payment_id
        if self.load_id:
            body["load_id"] = self.load_id
        if self.heal:
            body["heal"] = True
        return body


@dataclass(frozen=True, slots=True)
class Decision:
    approved: bool
    decline_code: DeclineCode | None = None
    detail: str = ""
    # What an unauthenticated mismatch says, for the operator; never a flag on the card.
    observation: Observation | None = None
    recover: Recover | None = None
    # An uncertain transaction at the same counter that this one proceeds past. It is NOT
    # released on this INITIALIZE (INITIALIZE FOR PURCHASE carries no MAC, so a relay can
    # fabricate "the counter did not move"): it stays uncertain, linked, and is released
    # only when this transaction's own MAC2/TAC (TAC for loads) verifies at that counter —
    # the session key binds the counter, so that proves the old one never used it.
    supersedes: OpenTransaction | None = None

    @classmethod
    def approve(cls, supersedes: OpenTransaction | None = None) -> Decision:
        if supersedes is None and cls is Decision:
            return _APPROVED  # immutable: one plain approval serves every caller
        return cls(True, supersedes=supersedes)

    @classmethod
    def decline(
        cls,
        code: DeclineCode,
        detail: str,
        observation: Observation | None = None,
        recover: Recover | None = None,
    ) -> Decision:
        return cls(False, code, detail, observation, recover)


_APPROVED = Decision(True)


@dataclass(frozen=True, slots=True)
class PurchaseInputs:
    """The card's raw answers, parsed by settlement, and what the merchant claims."""

    issuer: IssuerData
    initialize: InitializeForPurchaseResponse
    terminal_id: bytes
    merchant_terminal_id: bytes
    amount: int
    initialize_amount: int | None = None  # what the merchant says it put in INITIALIZE


@dataclass(frozen=True, slots=True)
class LoadInputs:
    issuer: IssuerData
    initialize: InitializeForLoadResponse
    terminal_id: bytes
    merchant_terminal_id: bytes
    amount: int
    mac1_valid: bool
    bound_card_number: str | None = None


def _card_checks(
    card: CardRecord | None,
    issuer: IssuerData,
    terminal_id: bytes,
    expected: bytes,
    now: dt.datetime,
) -> Decision | None:
    if card is None or card.issuer_id != issuer.issuer_id:
        return Decision.decline(DeclineCode.UNKNOWN_CARD, "the card is not registered here")
    if card.status == CardStatus.BLOCKED:
        return Decision.decline(DeclineCode.CARD_BLOCKED, "the card is blocked")
    if card.status == CardStatus.LOST:
        return Decision.decline(DeclineCode.CARD_LOST, "the card was reported lost")
    today = _utc_day(now)
    if card.status == CardStatus.EXPIRED or today > card.expiry_date or today > issuer.expiry_date:
        return Decision.decline(DeclineCode.CARD_EXPIRED, "the card has expired")
    if card.status != CardStatus.ACTIVE:
        return Decision.decline(DeclineCode.INVALID_STATE, f"the card is {card.status}")
    if today < card.start_date:
        return Decision.decline(DeclineCode.INVALID_STATE, "the card is not valid yet")
    if issuer.application_type not in (ApplicationType.EP, ApplicationType.ED_AND_EP):
        return Decision.decline(DeclineCode.INVALID_STATE, "the card has no e-purse application")
    if terminal_id != expected:
        return Decision.decline(
            DeclineCode.TERMINAL_MISMATCH,
            "the terminal id is not this merchant's registered terminal",
        )
    return None


def _utc_day(now: dt.datetime) -> dt.date:
    """``now``'s UTC date, kept for a UTC ``now`` (a batch decides every item at one
    ``now``). Only there: Python calls two times of one zone equal, and hashes them alike,
    whatever their ``fold``, so the two instants of a fall-back hour (Europe/Chisinau's
    02:30 is 23:30 or 00:30 UTC) would share one kept day, the other instant's."""
    return _utc_date(now) if now.tzinfo is dt.UTC else now.astimezone(dt.UTC).date()


@functools.lru_cache(maxsize=16)
def _utc_date(now: dt.datetime) -> dt.date:
    return now.date()


def _key_check(card: CardRecord, key_version: int, algorithm_id: int) -> Decision | None:
    """The card's INITIALIZE must name the key version it was issued under, and DES."""
    if key_version != card.key_version or algorithm_id != 0x00:
        return Decision.decline(
            DeclineCode.INVALID_STATE, "the card reports an unknown key version or algorithm"
        )
    return None


def _counter_checks(
    card: CardRecord, kind: str, counter: int, shadow_counter: int, random: bytes, balance: int
) -> Decision | None:
    """At the counter of ``kind`` the card answered with: no other transaction in flight
    (spec §6), then the card's counter and balance against settlement's shadow (spec §7)."""
    early = _open_transaction_check(card, kind, counter, random)
    if early is not None:
        return early
    return _shadow_checks(card, counter, shadow_counter, balance)


def _open_transaction_check(
    card: CardRecord, kind: str, counter: int, random: bytes
) -> Decision | None:
    """Spec §6: one transaction in flight per card; settle the last one before the next."""
    open_txn = card.open_transaction
    if open_txn is None:
        return None
    if (
        open_txn.kind == kind
        and open_txn.status == Status.UNCERTAIN
        and counter == open_txn.counter
        and random != open_txn.random
    ):
        # The card claims its counter did not move: the new transaction may proceed at the
        # same counter, linked to the uncertain one, which stays uncertain until this one's
        # verified MAC2/TAC proves the counter was used by it (``Decision.supersedes``).
        return None
    return _recovery_required(open_txn)


def _recovery_required(open_txn: OpenTransaction) -> Decision:
    own = open_txn.id if open_txn.same_merchant else open_txn.own_id
    recover = Recover(
        open_txn.transaction_type,
        open_txn.counter,
        payment_id=own if open_txn.kind == "payment" else None,
        load_id=own if open_txn.kind == "load" else None,
    )
    return Decision.decline(
        DeclineCode.RECOVERY_REQUIRED,
        f"the card has an open {open_txn.kind} ({open_txn.status}); settle it first",
        recover=recover,
    )


def _shadow_checks(
    card: CardRecord, counter: int, shadow_counter: int, balance: int
) -> Decision | None:
    """Spec §7: counters never go backwards; the balance is never above the shadow.

    The values are the card's unauthenticated answer (or a replayable one): a mismatch
    declines this transaction and is observed, and says nothing about the card. The detail
    names what failed, never settlement's numbers, nor in which direction (no oracle).
    """
    if counter != shadow_counter:
        behind = counter < shadow_counter
        return Decision.decline(
            DeclineCode.COUNTER_MISMATCH,
            "the card's counter does not match settlement's record of this card",
            Observation.COUNTER_BEHIND if behind else Observation.COUNTER_AHEAD,
        )
    if balance != card.shadow_balance:
        above = balance > card.shadow_balance
        return Decision.decline(
            DeclineCode.BALANCE_MISMATCH,
            "the card's balance does not match settlement's record of this card",
            Observation.BALANCE_ABOVE if above else Observation.BALANCE_BELOW,
        )
    return None


def _superseded(card: CardRecord, kind: str) -> OpenTransaction | None:
    open_txn = card.open_transaction
    return open_txn if open_txn is not None and open_txn.kind == kind else None


def decide_purchase(card: CardRecord | None, inputs: PurchaseInputs, now: dt.datetime) -> Decision:
    """May settlement issue MAC1 for this debit? (spec §4, §6, §7)"""
    early = _card_checks(card, inputs.issuer, inputs.terminal_id, inputs.merchant_terminal_id, now)
    if early is not None:
        return early
    assert card is not None
    init = inputs.initialize
    if inputs.initialize_amount is not None and inputs.initialize_amount != inputs.amount:
        return Decision.decline(
            DeclineCode.AMOUNT_MISMATCH, "INITIALIZE was sent for a different amount"
        )
    early = _key_check(card, init.key_version, init.algorithm_id)
    if early is not None:
        return early
    early = _counter_checks(
        card, "payment", init.offline_counter, card.offline_counter, init.random, init.balance
    )
    if early is not None:
        return early
    if init.balance < inputs.amount:
        return Decision.decline(DeclineCode.INSUFFICIENT_FUNDS, "the card's balance is too low")
    superseded = _superseded(card, "payment")
    if superseded is not None and card.available is not None and card.available < inputs.amount:
        # The uncertain debit still holds part of the value: settle it before this one.
        return _recovery_required(superseded)
    return Decision.approve(supersedes=superseded)


def decide_load(card: CardRecord | None, inputs: LoadInputs, now: dt.datetime) -> Decision:
    """May settlement issue MAC2 for this credit? The card's MAC1 must verify first."""
    early = _card_checks(card, inputs.issuer, inputs.terminal_id, inputs.merchant_terminal_id, now)
    if early is not None:
        return early
    assert card is not None
    init = inputs.initialize
    if inputs.bound_card_number is not None and inputs.bound_card_number != card.card_number:
        return Decision.decline(DeclineCode.INVALID_STATE, "this load is for another card")
    early = _key_check(card, init.key_version, init.algorithm_id)
    if early is not None:
        return early
    if not inputs.mac1_valid:
        return Decision.decline(
            DeclineCode.MAC_INVALID,
            "the card's MAC1 does not verify (wrong amount, terminal or card)",
            Observation.MAC1_INVALID,
        )
    early = _counter_checks(
        card, "load", init.online_counter, card.online_counter, init.random, init.balance
    )
    if early is not None:
        return early
    if init.balance + inputs.amount > card.max_balance:
        return Decision.decline(
            DeclineCode.BALANCE_LIMIT_EXCEEDED, "the load would exceed the card's maximum balance"
        )
    return Decision.approve(supersedes=_superseded(card, "load"))


# --- resolving an interrupted transaction (spec §6) --------------------------------


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"  # the card moved its counter and its proof verifies
    CANCELED = "canceled"  # the counter did not move: nothing happened on the card
    PROOF_REQUIRED = "proof_required"  # the counter moved; send GET TRANSACTION PROVE
    # A load's counter did not move, but nothing authenticates that answer as fresh: it
    # stays uncertain until a verified TAC (its own, or a load's at that counter) settles it.
    UNPROVEN = "unproven"
    PROOF_INVALID = "proof_invalid"
    MISMATCH = "mismatch"  # the card is not where this transaction left it


@dataclass(frozen=True, slots=True)
class Resolution:
    outcome: Outcome
    detail: str


def decide_resolution(
    open_txn: OpenTransaction,
    *,
    counter: int,
    balance: int,
    random: bytes,
    proof_given: bool,
    proof_valid: bool,
) -> Resolution:
    """What a fresh INITIALIZE (and GET TRANSACTION PROVE) says about ``open_txn``.

    "The counter did not move" releases a payment: only its own merchant may resolve it, and
    releasing its hold can only forgo that merchant's money. It never releases a load: its
    funds would go back to the merchant (or operator) that resolves it, and an INITIALIZE
    FOR LOAD answer proves nothing about *now* — its random is the card's, so an answer
    read at that counter before the CREDIT (MAC1 and all) can be replayed after it (spec
    §4, §6). A load is settled only by a verified TAC: its own (GET TRANSACTION PROVE once
    the counter moved) or that of a load completed at its counter (``Decision.supersedes``).
    """
    sign = -1 if open_txn.kind == "payment" else 1
    if counter == open_txn.counter:
        if random == open_txn.random:
            return Resolution(Outcome.MISMATCH, "this INITIALIZE answer is the old one, not fresh")
        if balance != open_txn.balance_before:
            return Resolution(Outcome.MISMATCH, "the counter did not move but the balance did")
        if open_txn.kind == "load":
            return Resolution(
                Outcome.UNPROVEN,
                "the card says its online counter did not move, but an INITIALIZE FOR LOAD"
                " answer can be replayed: the load stays uncertain until a verified TAC"
                " settles it (its own proof once the counter moved, or a new load of this"
                " card completed at that counter)",
            )
        return Resolution(Outcome.CANCELED, "the card's counter did not move: nothing happened")
    if counter == open_txn.counter + 1:
        if balance != open_txn.balance_before + sign * open_txn.amount:
            return Resolution(
                Outcome.MISMATCH, "the counter moved but the balance is not the expected one"
            )
        if not proof_given:
            return Resolution(
                Outcome.PROOF_REQUIRED,
                "the counter moved: send GET TRANSACTION PROVE's answer",
            )
        if not proof_valid:
            return Resolution(Outcome.PROOF_INVALID, "the card's proof does not verify")
        return Resolution(Outcome.SUCCEEDED, "the card proved the transaction")
    return Resolution(
        Outcome.MISMATCH,
        f"the card's counter {counter} is neither {open_txn.counter} nor {open_txn.counter + 1}",
    )


# --- a card one transaction ahead of the shadow (issue 19) ---------------------------


def decide_gap(counter: int, shadow_counter: int, kind: str, provable: bool) -> Decision | None:
    """The card's counter is ``shadow_counter + 1`` and settlement issued a MAC for
    ``shadow_counter`` (``provable``: a released or open transaction of this card at that
    counter): ask for the card's proof of it (GET TRANSACTION PROVE, ``heal``) instead of
    declining the card for good. The answer is unauthenticated, so this only asks: it
    changes nothing; only a proof that verifies does (:mod:`webpurse.settlement.holds`).
    """
    if not provable or counter != shadow_counter + 1:
        return None
    transaction_type = TransactionType.EP_PURCHASE if kind == "payment" else TransactionType.EP_LOAD
    return Decision.decline(
        DeclineCode.RECOVERY_REQUIRED,
        f"the card's counter {counter} is one ahead of the last seen {shadow_counter}:"
        " send GET TRANSACTION PROVE's answer for it to /v1/heal",
        recover=Recover(transaction_type, shadow_counter, heal=True),
    )


def decide_unsettled_load(
    balance: int, shadow_balance: int, online_counter: int, open_load_amounts: list[int]
) -> Decision | None:
    """A purchase sees the balance above the shadow by exactly the amount of an open load of
    the card at its shadow online counter (MAC2 issued, e.g. freed at the bound): that load's
    CREDIT probably ran. Ask for its proof (``heal``) rather than call the card a clone; the
    answer is unauthenticated, so this only asks."""
    if balance - shadow_balance not in open_load_amounts:
        return None
    return Decision.decline(
        DeclineCode.RECOVERY_REQUIRED,
        "the card's balance is above the last seen by an open load's amount: send GET"
        " TRANSACTION PROVE's answer for that load to /v1/heal",
        recover=Recover(TransactionType.EP_LOAD, online_counter, heal=True),
    )
