"""Purchase and load flows: which APDUs go to the card, in which batches, and what then.

The planning half is sans-I/O (``first_batch``, ``read_first_contact``, ``recovery_steps``,
``read_recovery``): values in, :class:`~webpurse.reader.base.Step` lists or parsed values
out. The running half (:func:`run_transaction`, :func:`recover`) is a thin async loop over
an injected :class:`~webpurse.reader.base.Reader` and
:class:`~webpurse.merchant.settlement.Settlement`.

A purchase is exactly two merchant↔reader round trips (ARCHITECTURE.md, "Purchase: two
round trips"):

1. SELECT EP by AID, READ BINARY 0x15, INITIALIZE FOR PURCHASE → settlement ``authorise``
   (raw card responses; settlement parses them) → MAC1 and the DEBIT APDU;
2. DEBIT FOR PURCHASE → settlement ``capture`` with TAC ‖ MAC2.

A load is the same with INITIALIZE FOR LOAD / CREDIT FOR LOAD. When the outcome of batch 2
is unknown (the card left, the link broke), settlement is told ``uncertain`` and nothing
is guessed (spec §6); the next contact runs :func:`recover`. When settlement answers
``recovery_required`` for another open transaction of the card, one extra round trip
recovers it and re-initialises the current one.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from webpurse.merchant.settlement import (
    CardCheck,
    Declined,
    Kind,
    RecoveryHint,
    Settlement,
    SettlementError,
    SettlementObject,
    TxStatus,
    funding_reference,
)
from webpurse.protocol import status
from webpurse.protocol.apdu import ResponseApdu, StatusWord
from webpurse.protocol.commands import (
    EP_AID,
    SFI_ISSUER,
    GetTransactionProve,
    InitializeForLoad,
    InitializeForLoadResponse,
    InitializeForPurchase,
    InitializeForPurchaseResponse,
    ReadBinary,
    Select,
)
from webpurse.protocol.commands import (
    prove_counter as _counter_after,
)
from webpurse.protocol.errors import ProtocolError
from webpurse.protocol.records import IssuerData, TransactionType
from webpurse.reader.base import BatchRefused, Reader, ReaderError, Step

log = logging.getLogger(__name__)

PROVE_OK: frozenset[int] = status.GET_TRANSACTION_PROVE.answers()  # 9000 and 9406


class Phase(StrEnum):
    """What the shopper sees on the payment page (and the agent's display)."""

    WAITING_READER = "waiting_reader"
    PRESENT_CARD = "present_card"
    READING = "reading"
    AUTHORISING = "authorising"
    RECOVERING = "recovering"
    CONFIRM = "confirm"
    CAPTURING = "capturing"
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Progress:
    phase: Phase
    detail: str = ""


ProgressSink = Callable[[Progress], Awaitable[None]]


async def _ignore(_: Progress) -> None:
    return None


class CardRefused(Exception):
    """The card answered a batch-1 command with an error: nothing is pending on it.

    ``issuer_data`` is the card's EF 0x15 when it answered READ BINARY before refusing
    INITIALIZE (so settlement can note, e.g., a card that locked itself: 9303).
    """

    def __init__(self, sw: int, reason: str, issuer_data: bytes | None = None) -> None:
        super().__init__(f"card answered {sw:04X}: {reason}")
        self.sw = sw
        self.reason = reason
        self.issuer_data = issuer_data


def _initialize_statuses(kind: Kind) -> status.CommandStatuses:
    return status.INITIALIZE_FOR_PURCHASE if kind is Kind.PAYMENT else status.INITIALIZE_FOR_LOAD


def _completion_statuses(kind: Kind) -> status.CommandStatuses:
    return status.DEBIT_FOR_PURCHASE if kind is Kind.PAYMENT else status.CREDIT_FOR_LOAD


@dataclass(frozen=True, slots=True)
class FirstContact:
    """The raw card answers settlement needs (it parses them itself), and what we show."""

    issuer_data: bytes
    initialize: bytes
    card_number: str
    balance: int
    counter: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a contact ended. ``status`` is settlement's word, never the merchant's guess.

    One reading of it: after :func:`recover`, ``canceled`` for a load means "this load is
    no longer the order's way to the card, load again" — also when settlement keeps it
    ``uncertain`` (``object.status``) because the card showed its counter unchanged, which
    is no proof for a load (see :func:`_load_needs_a_new_load`).
    """

    status: str
    object: SettlementObject | None
    round_trips: int
    decline_code: str | None = None
    card_number: str | None = None
    balance_before: int | None = None
    balance_after: int | None = None
    counter: int | None = None
    tac: str | None = None


def _initialize(kind: Kind, key_index: int, amount: int, terminal_id: bytes) -> bytes:
    command: InitializeForPurchase | InitializeForLoad
    if kind is Kind.PAYMENT:
        command = InitializeForPurchase(key_index, amount, terminal_id)
    else:
        command = InitializeForLoad(key_index, amount, terminal_id)
    return command.to_apdu().to_bytes()


def first_batch(kind: Kind, *, key_index: int, amount: int, terminal_id: bytes) -> list[Step]:
    """Batch 1: SELECT EP by AID, READ BINARY 0x15, INITIALIZE (purchase or load)."""
    return [
        Step(Select(name=EP_AID).to_apdu().to_bytes()),
        Step(ReadBinary(SFI_ISSUER, 0, 0).to_apdu().to_bytes()),
        Step(_initialize(kind, key_index, amount, terminal_id)),
    ]


def _parse_initialize(kind: Kind, data: bytes) -> tuple[int, int]:
    if kind is Kind.PAYMENT:
        purchase = InitializeForPurchaseResponse.from_data(data)
        return purchase.balance, purchase.offline_counter
    load = InitializeForLoadResponse.from_data(data)
    return load.balance, load.online_counter


def _refusal(
    statuses: status.CommandStatuses, response: ResponseApdu, issuer_data: bytes | None = None
) -> CardRefused:
    """The card refused the command ``statuses`` is the table of: its reason (spec §5)."""
    return CardRefused(response.sw, statuses.reason(response.sw, "card_error"), issuer_data)


def _last_refusal(
    commands: Sequence[status.CommandStatuses],
    responses: Sequence[ResponseApdu],
    issuer_data: bytes | None = None,
) -> CardRefused:
    """A batch stopped at its last answer: the refusal of the command that gave it."""
    if not responses:
        return CardRefused(StatusWord.NO_PRECISE_DIAGNOSIS, "card_error")
    return _refusal(commands[len(responses) - 1], responses[-1], issuer_data)


def read_first_contact(kind: Kind, responses: Sequence[ResponseApdu]) -> FirstContact:
    """Check batch 1's three answers; raise :class:`CardRefused` if the card said no."""
    if not responses:
        raise CardRefused(0x6F00, "card_error")
    commands = (status.SELECT, status.READ_BINARY, _initialize_statuses(kind))
    if len(responses) < 3:
        raise _last_refusal(commands, responses)
    for index, response in enumerate(responses):
        if not response.ok:
            raise _refusal(commands[index], response, responses[1].data if index == 2 else None)
    try:
        issuer = IssuerData.from_bytes(responses[1].data)
        balance, counter = _parse_initialize(kind, responses[2].data)
    except ProtocolError as exc:
        log.warning("card answered batch 1 with malformed data: %s", exc)
        raise CardRefused(0x6F00, "card_error") from exc
    return FirstContact(
        issuer_data=responses[1].data,
        initialize=responses[2].data,
        card_number=issuer.card_number,
        balance=balance,
        counter=counter,
    )


def prove_counter(hint: RecoveryHint) -> int:
    """GET TRANSACTION PROVE names the card's current counter: the lost one's + 1 (spec §3)."""
    return _counter_after(hint.counter)


def _hint_kind(hint: RecoveryHint) -> Kind:
    """The kind of the lost transaction, by its card transaction type."""
    return Kind.PAYMENT if hint.transaction_type == TransactionType.EP_PURCHASE else Kind.LOAD


def recovery_steps(hint: RecoveryHint, *, key_index: int, terminal_id: bytes) -> list[Step]:
    """INITIALIZE (amount 0) of the lost transaction's kind, then GET TRANSACTION PROVE.

    PROVE answers 9406 when the counter did not move (nothing was debited or credited):
    that is an answer, not a failure, so the batch goes on.
    """
    kind = _hint_kind(hint)
    prove = GetTransactionProve(hint.transaction_type, prove_counter(hint))
    return [
        Step(_initialize(kind, key_index, 0, terminal_id)),
        Step(prove.to_apdu().to_bytes(), PROVE_OK),
    ]


def read_recovery(
    responses: Sequence[ResponseApdu], kind: Kind = Kind.PAYMENT
) -> tuple[bytes, bytes | None]:
    """(INITIALIZE data, PROVE data or None when the card has no proof for that counter).

    ``kind`` is the lost transaction's, whose INITIALIZE opened the batch."""
    commands = (_initialize_statuses(kind), status.GET_TRANSACTION_PROVE)
    if len(responses) < 2 or not responses[0].ok:
        raise _last_refusal(commands, responses[:2])
    prove = responses[1]
    if prove.sw == StatusWord.SUCCESS:
        return responses[0].data, prove.data
    if prove.sw == StatusWord.PROOF_NOT_AVAILABLE:
        return responses[0].data, None
    raise _refusal(status.GET_TRANSACTION_PROVE, prove)


class RoundTrips:
    """Counts merchant↔reader round trips (one per ``transmit``), so tests can assert them."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.count = 0

    async def __call__(self, batch: Sequence[Step]) -> list[ResponseApdu]:
        self.count += 1
        return await self.reader.transmit(batch)


async def _resolve(
    settlement: Settlement, hint: RecoveryHint, initialize: bytes, prove: bytes | None
) -> SettlementObject:
    resolved = await settlement.resolve(
        hint.kind, hint.object_id, initialize=initialize, prove=prove
    )
    log.info("recovered %s %s → %s", hint.kind.value, hint.object_id, resolved.status)
    return resolved


def _load_needs_a_new_load(hint: RecoveryHint, exc: SettlementError) -> bool:
    """Settlement kept the lost load open: 409 ``proof_required`` (docs/settlement-api.md).

    A load is never released on the card's word that its counter did not move (an
    INITIALIZE FOR LOAD answer can be replayed): it stays ``uncertain``, its funds held,
    until a verified TAC settles it — its own proof, or the TAC of a new load of the card
    at that counter, which settlement links to it (``supersedes``) and which releases it.
    So the way on is a new load; the lost one must be ``uncertain`` for the new one to be
    linked to it rather than wait for it (an ``authorised`` one's CREDIT may be in flight).
    """
    return hint.kind is Kind.LOAD and exc.status == 409 and exc.code == "proof_required"


async def _keep_uncertain(settlement: Settlement, hint: RecoveryHint) -> SettlementObject:
    kept = await settlement.uncertain(hint.kind, hint.object_id)
    log.info("load %s stays %s until a load at its counter settles it", kept.id, kept.status)
    return kept


async def recover(
    reader: Reader,
    settlement: Settlement,
    hint: RecoveryHint,
    *,
    key_index: int,
    terminal_id: bytes,
    card_timeout: float = 120.0,
    progress: ProgressSink = _ignore,
) -> Outcome:
    """Settle an ``uncertain`` transaction on the card's next contact (one round trip).

    ``succeeded`` or ``canceled``: a payment the card shows unchanged is released; a load
    is not (it stays ``uncertain``), but the answer is ``canceled`` all the same, for what
    the order does next is the same: load again with a new load, whose verified TAC at
    that counter then releases this one (see :class:`Outcome`).
    """
    trips = RoundTrips(reader)
    await progress(Progress(Phase.PRESENT_CARD))
    await reader.wait_for_card(card_timeout)
    await progress(Progress(Phase.RECOVERING))
    batch = [Step(Select(name=EP_AID).to_apdu().to_bytes())]
    batch += recovery_steps(hint, key_index=key_index, terminal_id=terminal_id)
    responses = await trips(batch)
    if not responses or not responses[0].ok:
        raise _last_refusal((status.SELECT,), responses[:1])
    initialize, prove = read_recovery(responses[1:], _hint_kind(hint))
    try:
        resolved = await _resolve(settlement, hint, initialize, prove)
    except SettlementError as exc:
        if not _load_needs_a_new_load(hint, exc):
            raise
        kept = await _keep_uncertain(settlement, hint)
        return Outcome(status=TxStatus.CANCELED, object=kept, round_trips=trips.count)
    return Outcome(
        status=resolved.status, object=resolved, round_trips=trips.count, tac=resolved.tac
    )


async def run_transaction(
    reader: Reader,
    settlement: Settlement,
    obj: SettlementObject,
    *,
    card_timeout: float = 120.0,
    progress: ProgressSink = _ignore,
) -> Outcome:
    """Run one purchase (``obj.kind`` PAYMENT) or load (LOAD) through ``reader``.

    Returns settlement's verdict; raises :class:`ReaderError` only when batch 1 could not
    run (nothing is pending on the card then) and :class:`SettlementError` when settlement
    fails outside a decline.
    """
    run = _Transaction(RoundTrips(reader), settlement, obj, progress)
    await progress(Progress(Phase.PRESENT_CARD))
    await reader.wait_for_card(card_timeout)
    contact = await run.first_round_trip()
    if isinstance(contact, Outcome):
        return contact
    authorised = await run.authorise_contact(contact)
    if isinstance(authorised, Outcome):
        return authorised
    contact, obj_authorised = authorised
    return await run.second_round_trip(contact, obj_authorised)


@dataclass(frozen=True, slots=True)
class _Transaction:
    """One run of :func:`run_transaction`: its round trips, settlement, the payment or load
    it runs (as created; every step names it by id) and where its progress goes."""

    trips: RoundTrips
    settlement: Settlement
    obj: SettlementObject
    progress: ProgressSink

    async def first_round_trip(self) -> FirstContact | Outcome:
        """Batch 1 (SELECT, READ BINARY, INITIALIZE): the card's first contact, or a decline."""
        kind = self.obj.kind
        await self.progress(Progress(Phase.READING))
        batch1 = first_batch(
            kind,
            key_index=self.obj.key_index,
            amount=self.obj.amount,
            terminal_id=self.obj.terminal_id,
        )
        try:
            return read_first_contact(kind, await self.trips(batch1))
        except BatchRefused as refused:
            # The agent refused before INITIALIZE could start anything on the card.
            log.info("%s %s: reader refused batch 1: %s", kind.value, self.obj.id, refused.code)
            await _cancel_quietly(self.settlement, self.obj)
            await self.progress(Progress(Phase.DECLINED, refused.code))
            return Outcome(TxStatus.DECLINED, self.obj, self.trips.count, decline_code=refused.code)
        except CardRefused as refused:
            log.info("%s %s: card refused batch 1: %s", kind.value, self.obj.id, refused)
            await _cancel_quietly(self.settlement, self.obj, refused)
            await self.progress(Progress(Phase.DECLINED, refused.reason))
            return Outcome(
                TxStatus.DECLINED, self.obj, self.trips.count, decline_code=refused.reason
            )

    def declined_outcome(
        self, contact: FirstContact, code: str | None, obj: SettlementObject | None = None
    ) -> Outcome:
        """Declined after the first contact (``obj``: settlement's last word, if newer)."""
        return Outcome(
            TxStatus.DECLINED,
            self.obj if obj is None else obj,
            self.trips.count,
            decline_code=code,
            card_number=contact.card_number,
            balance_before=contact.balance,
        )

    async def authorise_contact(
        self, contact: FirstContact
    ) -> tuple[FirstContact, SettlementObject] | Outcome:
        """Settlement's authorisation of the first contact (after recovering another open
        transaction of the card when it asks for that), or its decline."""
        await self.progress(Progress(Phase.AUTHORISING))
        try:
            return contact, await self.authorise(contact)
        except Declined as declined:
            if declined.decline_code != "recovery_required" or declined.recover is None:
                if declined.card_check is not None:
                    await self.run_card_check(declined.card_check)
                await self.progress(
                    Progress(Phase.DECLINED, declined.decline_code or declined.code or "")
                )
                return self.declined_outcome(contact, declined.decline_code or declined.code)
            contact = await self.recover_then_reinitialise(contact, declined.recover)
        await self.progress(Progress(Phase.AUTHORISING))
        try:
            return contact, await self.authorise(contact)
        except Declined as again:
            await self.progress(Progress(Phase.DECLINED, again.decline_code or again.code or ""))
            return self.declined_outcome(contact, again.decline_code or again.code)

    async def second_round_trip(
        self, contact: FirstContact, authorised: SettlementObject
    ) -> Outcome:
        """Batch 2 (DEBIT/CREDIT) and settlement's capture of the card's answer."""
        kind = self.obj.kind
        if authorised.authorisation is None:
            raise SettlementError(f"settlement authorised {self.obj.id} without an APDU")
        await self.progress(Progress(Phase.CONFIRM))
        try:
            responses = await self.trips([Step(authorised.authorisation.apdu)])
        except BatchRefused as refused:
            # Refused before the DEBIT/CREDIT reached the card (e.g. the shopper said no on
            # the agent): nothing happened on the card, so the authorisation is released.
            log.info("%s %s: reader refused batch 2: %s", kind.value, self.obj.id, refused.code)
            return await self.release(contact, refused.code)
        except ReaderError as exc:
            # The DEBIT/CREDIT may or may not have reached the card: never guess (spec §6).
            log.warning(
                "%s %s: outcome unknown after %s", kind.value, self.obj.id, type(exc).__name__
            )
            return await self.outcome_unknown(contact)
        final = responses[-1] if responses else ResponseApdu(b"", 0x6F00)
        if not final.ok:
            # The card refused: its update is atomic, so nothing changed on it.
            log.info("%s %s: card refused batch 2 with %04X", kind.value, self.obj.id, final.sw)
            reason = _completion_statuses(kind).reason(final.sw, "card_refused")
            return await self.release(contact, reason)

        await self.progress(Progress(Phase.CAPTURING))
        try:
            finished = await self.settlement.finish(kind, self.obj.id, final.data)
        except Declined as declined:
            # The card answered 9000, so it changed; settlement could not verify what came
            # back (a corrupted or tampered answer). Not a decline: the outcome is unknown and
            # the card's own proof (GET TRANSACTION PROVE) settles it at its next contact.
            log.warning(
                "%s %s: settlement refused the card's answer (%s): outcome unknown",
                kind.value,
                self.obj.id,
                declined.code,
            )
            return await self.outcome_unknown(contact)
        delta = self.obj.amount if kind is Kind.LOAD else -self.obj.amount
        succeeded = finished.status == TxStatus.SUCCEEDED
        await self.progress(
            Progress(Phase.SUCCEEDED if succeeded else Phase.FAILED, finished.status)
        )
        return Outcome(
            finished.status,
            finished,
            self.trips.count,
            card_number=contact.card_number,
            balance_before=contact.balance,
            balance_after=contact.balance + delta if succeeded else None,
            counter=contact.counter,
            tac=finished.tac,
        )

    async def authorise(self, contact: FirstContact) -> SettlementObject:
        return await self.settlement.authorise(
            self.obj.kind,
            self.obj.id,
            issuer_data=contact.issuer_data,
            initialize=contact.initialize,
            terminal_id=self.obj.terminal_id,
        )

    async def recover_then_reinitialise(
        self, contact: FirstContact, hint: RecoveryHint
    ) -> FirstContact:
        """One extra round trip: recover the card's open transaction, INITIALIZE this one again."""
        steps = recovery_steps(hint, key_index=self.obj.key_index, terminal_id=self.obj.terminal_id)
        steps.append(
            Step(
                _initialize(
                    self.obj.kind, self.obj.key_index, self.obj.amount, self.obj.terminal_id
                )
            )
        )
        responses = await self.trips(steps)
        initialize, prove = read_recovery(responses[:2], _hint_kind(hint))
        if hint.heal:
            # The card is one transaction ahead of settlement: its proof settles that one.
            if prove is None:
                raise SettlementError("the card has no proof for the counter settlement is missing")
            await self.settlement.heal(
                issuer_data=contact.issuer_data, transaction_type=hint.transaction_type, prove=prove
            )
        else:
            try:
                await _resolve(self.settlement, hint, initialize, prove)
            except SettlementError as exc:
                if not _load_needs_a_new_load(hint, exc):
                    raise
                # Still open: a new load goes ahead linked to it; anything else is told to recover.
                await _keep_uncertain(self.settlement, hint)
        if len(responses) < 3 or not responses[2].ok:
            commands = (
                _initialize_statuses(_hint_kind(hint)),
                status.GET_TRANSACTION_PROVE,
                _initialize_statuses(self.obj.kind),
            )
            raise _last_refusal(commands, responses[:3])
        balance, counter = _parse_initialize(self.obj.kind, responses[2].data)
        return FirstContact(
            contact.issuer_data, responses[2].data, contact.card_number, balance, counter
        )

    async def outcome_unknown(self, contact: FirstContact) -> Outcome:
        """The DEBIT/CREDIT may have changed the card: tell settlement the outcome is unknown
        (``uncertain``); the card's proof at its next contact settles it (spec §6)."""
        marked = await self.settlement.uncertain(self.obj.kind, self.obj.id)
        return await self.interrupted(marked, contact)

    async def interrupted(self, marked: SettlementObject, contact: FirstContact) -> Outcome:
        """Report the transaction interrupted: ``marked`` waits for the card's next contact."""
        await self.progress(Progress(Phase.INTERRUPTED))
        return Outcome(
            marked.status,
            marked,
            self.trips.count,
            card_number=contact.card_number,
            balance_before=contact.balance,
            counter=contact.counter,
        )

    async def release(self, contact: FirstContact, reason: str) -> Outcome:
        """The DEBIT/CREDIT was refused, so the card did not change; settlement still wants the
        card's word before it lets go of an authorisation. One more round trip reads the counter
        (INITIALIZE amount 0; PROVE answers 9406) and ``resolve`` releases the payment. If that
        fails the payment is marked ``uncertain`` and the card's next contact settles it. A load
        always ends so: settlement never releases one on the counter alone (409
        ``proof_required``); the next load of the card at that counter releases it.
        """
        ttype = (
            TransactionType.EP_PURCHASE
            if self.obj.kind is Kind.PAYMENT
            else TransactionType.EP_LOAD
        )
        hint = RecoveryHint(self.obj.kind, self.obj.id, ttype, contact.counter)
        try:
            responses = await self.trips(
                recovery_steps(hint, key_index=self.obj.key_index, terminal_id=self.obj.terminal_id)
            )
            initialize, prove = read_recovery(responses, self.obj.kind)
            released = await _resolve(self.settlement, hint, initialize, prove)
        except (ReaderError, CardRefused, SettlementError) as exc:
            log.warning(
                "%s %s: could not release (%s); marking uncertain",
                self.obj.kind.value,
                self.obj.id,
                exc,
            )
            try:
                marked = await self.settlement.uncertain(self.obj.kind, self.obj.id)
            except SettlementError:
                marked = self.obj
            return await self.interrupted(marked, contact)
        if released.status == "succeeded":  # the card's proof says it ran after all
            await self.progress(Progress(Phase.SUCCEEDED))
            return Outcome(
                TxStatus.SUCCEEDED,
                released,
                self.trips.count,
                card_number=contact.card_number,
                tac=released.tac,
            )
        await self.progress(Progress(Phase.DECLINED, reason))
        return self.declined_outcome(contact, reason, released)

    async def run_card_check(self, check: CardCheck) -> None:
        """The card check a decline offered, while the card is still here (one round trip).

        Best effort: the transaction is declined either way; the check only lets settlement
        tell a real clone (its MAC1 verifies over the check's fresh terminal id) from an answer
        anyone could make up (docs/settlement-api.md, "Evidence").
        """
        try:
            responses = await self.trips([Step(check.apdu)])
            answer = responses[-1] if responses else ResponseApdu(b"", 0x6F00)
            if not answer.ok:
                log.info(
                    "%s %s: card check refused by the card: %04X",
                    self.obj.kind.value,
                    self.obj.id,
                    answer.sw,
                )
                return
            verdict = await self.settlement.answer_card_check(check.id, answer.data)
        except (ReaderError, SettlementError) as exc:
            log.info(
                "%s %s: card check not run: %s",
                self.obj.kind.value,
                self.obj.id,
                type(exc).__name__,
            )
            return
        log.info("%s %s: card check %s: %s", self.obj.kind.value, self.obj.id, check.id, verdict)


async def _cancel_quietly(
    settlement: Settlement, obj: SettlementObject, refused: CardRefused | None = None
) -> None:
    """Cancel ``obj``; a card that locked itself (9303) is reported so settlement flags it.

    Never a load the cardholder paid by bank transfer: its money belongs to that load (a
    canceled one is listed to go back to the payer), so a refusal before INITIALIZE leaves
    it ``requires_card`` for the next try with the right card.
    """
    if funding_reference(obj) is not None:
        log.info("%s %s: kept for its next contact (paid by bank transfer)", obj.kind.value, obj.id)
        return
    try:
        if refused is not None and refused.sw == StatusWord.APPLICATION_LOCKED:
            await settlement.cancel(
                obj.kind, obj.id, issuer_data=refused.issuer_data, status_word=refused.sw
            )
        else:
            await settlement.cancel(obj.kind, obj.id)
    except SettlementError as exc:
        log.warning("could not cancel %s %s: %s", obj.kind.value, obj.id, exc)
