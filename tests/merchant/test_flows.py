"""The purchase and load flows over a SimReader: two round trips, declines, interruptions."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tests.merchant.conftest import make_card
from tests.merchant.fakes import TERMINAL, FakeSettlement
from webpurse.merchant.flows import (
    Phase,
    Progress,
    first_batch,
    recover,
    run_transaction,
)
from webpurse.merchant.settlement import Kind, RecoveryHint, SettlementObject
from webpurse.protocol.commands import INS_CREDIT_FOR_LOAD, INS_DEBIT_FOR_PURCHASE
from webpurse.protocol.records import TransactionType
from webpurse.reader.sim import Fault, SimReader


async def test_first_batch_is_select_read_binary_initialize() -> None:
    steps = first_batch(Kind.PAYMENT, key_index=1, amount=1250, terminal_id=TERMINAL)
    assert [s.apdu.hex().upper() for s in steps] == [
        "00A4040009A0000000038698070100",
        "00B0950000",
        "805001020B01000004E20000000000010F",
    ]


async def test_purchase_takes_two_round_trips_and_debits_the_card(
    reader: SimReader, settlement: FakeSettlement
) -> None:
    payment = await settlement.create(Kind.PAYMENT, 1250, description="d", reference="r")
    seen: list[Phase] = []

    async def progress(p: Progress) -> None:
        seen.append(p.phase)

    outcome = await run_transaction(reader, settlement, payment, progress=progress)
    assert outcome.status == "succeeded"
    assert outcome.round_trips == 2
    assert (outcome.balance_before, outcome.balance_after) == (10_000, 8_750)
    assert reader.card is not None and reader.card.state.balance == 8_750
    assert outcome.tac is not None and len(outcome.tac) == 8
    assert seen[0] is Phase.PRESENT_CARD and seen[-1] is Phase.SUCCEEDED
    assert Phase.CONFIRM in seen


async def test_load_takes_two_round_trips_and_credits_the_card(
    reader: SimReader, settlement: FakeSettlement
) -> None:
    load = await settlement.create(
        Kind.LOAD, 5000, description="d", reference="r", funding="merchant_float"
    )
    outcome = await run_transaction(reader, settlement, load)
    assert (outcome.status, outcome.round_trips) == ("succeeded", 2)
    assert reader.card is not None and reader.card.state.balance == 15_000
    assert outcome.balance_after == 15_000


async def test_insufficient_funds_is_declined_and_nothing_changes(
    settlement: FakeSettlement,
) -> None:
    async with SimReader(make_card(balance=100)) as sim:
        payment = await settlement.create(Kind.PAYMENT, 1250, description="d", reference="r")
        outcome = await run_transaction(sim, settlement, payment)
        assert (outcome.status, outcome.decline_code) == ("declined", "insufficient_funds")
        assert outcome.round_trips == 1
        assert sim.card is not None and sim.card.state.balance == 100
        assert settlement.records[payment.id].status == "canceled"


async def test_torn_debit_is_uncertain_then_recovered_as_paid(
    reader: SimReader, settlement: FakeSettlement
) -> None:
    payment = await settlement.create(Kind.PAYMENT, 1250, description="d", reference="r")
    reader.inject(Fault.after(INS_DEBIT_FOR_PURCHASE))
    outcome = await run_transaction(reader, settlement, payment)
    assert outcome.status == "uncertain"
    assert reader.card is None or not reader.present
    reader.insert()
    assert outcome.counter is not None
    hint = RecoveryHint(Kind.PAYMENT, payment.id, TransactionType.EP_PURCHASE, outcome.counter)
    recovered = await recover(reader, settlement, hint, key_index=1, terminal_id=TERMINAL)
    assert (recovered.status, recovered.round_trips) == ("succeeded", 1)
    assert reader.card is not None and reader.card.state.balance == 8_750


async def test_debit_lost_before_the_card_is_recovered_as_canceled(
    reader: SimReader, settlement: FakeSettlement
) -> None:
    payment = await settlement.create(Kind.PAYMENT, 1250, description="d", reference="r")
    reader.inject(Fault.before(INS_DEBIT_FOR_PURCHASE))
    outcome = await run_transaction(reader, settlement, payment)
    assert outcome.status == "uncertain"
    reader.insert()
    assert outcome.counter is not None
    hint = RecoveryHint(Kind.PAYMENT, payment.id, TransactionType.EP_PURCHASE, outcome.counter)
    recovered = await recover(reader, settlement, hint, key_index=1, terminal_id=TERMINAL)
    assert recovered.status == "canceled"
    assert reader.card is not None and reader.card.state.balance == 10_000


async def test_recovery_required_costs_one_more_round_trip(
    reader: SimReader, settlement: FakeSettlement
) -> None:
    first = await settlement.create(
        Kind.LOAD, 2000, description="d", reference="r", funding="merchant_float"
    )
    reader.inject(Fault.after(INS_CREDIT_FOR_LOAD))
    assert (await run_transaction(reader, settlement, first)).status == "uncertain"
    reader.insert()
    second = await settlement.create(Kind.PAYMENT, 1250, description="d", reference="r")
    outcome = await run_transaction(reader, settlement, second)
    assert (outcome.status, outcome.round_trips) == ("succeeded", 3)
    assert settlement.records[first.id].status == "succeeded"
    assert reader.card is not None and reader.card.state.balance == 10_000 + 2000 - 1250


class TamperingSettlement(FakeSettlement):
    """A relay that corrupts MAC1 on the way: the card must refuse the DEBIT (9302)."""

    async def authorise(self, kind: Kind, object_id: str, **kwargs: Any) -> SettlementObject:
        obj = await super().authorise(kind, object_id, **kwargs)
        assert obj.authorisation is not None
        apdu = bytearray(obj.authorisation.apdu)
        apdu[-2] ^= 0xFF  # last byte of MAC1 (before Le)
        auth = replace(obj.authorisation, apdu=bytes(apdu))
        return replace(obj, authorisation=auth)


async def test_a_refused_debit_is_released_with_the_cards_word(reader: SimReader) -> None:
    settlement = TamperingSettlement()
    payment = await settlement.create(Kind.PAYMENT, 1250, description="d", reference="r")
    outcome = await run_transaction(reader, settlement, payment)
    assert (outcome.status, outcome.decline_code) == ("declined", "card_refused")
    assert outcome.round_trips == 3  # batch 1, the refused DEBIT, the counter read
    assert settlement.records[payment.id].status == "canceled"
    assert "cancel " + payment.id not in settlement.calls  # resolved, not merely canceled
    assert reader.card is not None and reader.card.state.balance == 10_000


async def test_an_unverifiable_debit_answer_is_uncertain_then_settled_by_the_cards_proof(
    reader: SimReader, settlement: FakeSettlement
) -> None:
    """The card said 9000 but its TAC/MAC2 reached settlement mangled: never 'declined'."""
    payment = await settlement.create(Kind.PAYMENT, 1250, description="d", reference="r")
    real_finish = settlement.finish

    async def mangled(kind: Kind, object_id: str, card_response: bytes) -> SettlementObject:
        return await real_finish(kind, object_id, bytes(len(card_response)))

    settlement.finish = mangled  # type: ignore[method-assign]
    outcome = await run_transaction(reader, settlement, payment)
    assert outcome.status == "uncertain"
    assert reader.card is not None and reader.card.state.balance == 8_750  # it did debit
    assert outcome.counter is not None
    hint = RecoveryHint(Kind.PAYMENT, payment.id, TransactionType.EP_PURCHASE, outcome.counter)
    recovered = await recover(reader, settlement, hint, key_index=1, terminal_id=TERMINAL)
    assert recovered.status == "succeeded"
    assert settlement.records[payment.id].status == "succeeded"
