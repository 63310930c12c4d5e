"""SimReader: the in-process reader, its card presence events and its fault hooks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.card.support import make_card, make_state
from tests.reader.support import GET_BALANCE, SELECT_EP, HostTerminal, step
from webpurse.card import CardBusy, ImageFile
from webpurse.card.vpcd import CARD_ATR
from webpurse.protocol import commands as cmd
from webpurse.reader import (
    ApduEvent,
    CardRemoved,
    Fault,
    NoCard,
    Phase,
    Reader,
    ReaderTimeout,
    SimReader,
)

INS_DEBIT = cmd.INS_DEBIT_FOR_PURCHASE
INS_INITIALIZE = cmd.INS_INITIALIZE


def test_sim_reader_is_a_reader() -> None:
    assert isinstance(SimReader(make_card()), Reader)


async def test_load_then_purchase_through_the_sim_reader() -> None:
    card = make_card()
    terminal = HostTerminal(SimReader(card))
    loaded = await terminal.load(5_000)
    assert loaded.balance_before == 0
    bought = await terminal.purchase(1_234)
    assert bought.balance_before == 5_000
    assert await terminal.balance() == 3_766
    assert (card.state.online_counter, card.state.offline_counter) == (1, 1)


async def test_presence_events() -> None:
    reader = SimReader(name="desk")
    assert not reader.present
    with pytest.raises(ReaderTimeout):
        await reader.wait_for_card(timeout=0.01)
    waiting = asyncio.create_task(reader.wait_for_card(timeout=10))
    reader.insert(make_card())
    info = await waiting
    assert (info.reader, info.atr) == ("desk", CARD_ATR)

    with pytest.raises(ReaderTimeout):
        await reader.wait_for_removal(timeout=0.01)
    leaving = asyncio.create_task(reader.wait_for_removal(timeout=10))
    reader.remove()
    await leaving


async def test_a_removal_already_seen_is_not_lost_to_a_card_put_back_at_once() -> None:
    """The cashier waits for an interrupted card to leave right after storing the order as
    interrupted; a shopper (a test) may put the card back the moment the page says so. A
    card gone when the wait begins is gone: the wait ends before anything else runs."""
    reader = SimReader(make_card())
    reader.remove()
    leaving = asyncio.ensure_future(reader.wait_for_removal(timeout=0.5))
    await asyncio.sleep(0)  # one turn: the wait begins (it used to suspend inside it)
    reader.insert()
    await leaving  # it used to raise ReaderTimeout: the put-back hid the removal
    assert reader.present


async def test_an_empty_field_is_no_card_and_nothing_is_sent() -> None:
    reader = SimReader()
    with pytest.raises(NoCard):
        await reader.transmit([step(SELECT_EP)])
    assert reader.apdu_count == 0


async def test_leaving_before_the_debit_reaches_the_card_changes_nothing() -> None:
    card = make_card()
    reader = SimReader(card)
    terminal = HostTerminal(reader)
    await terminal.load(5_000)
    first = await terminal.purchase_init(1_000)
    reader.inject(Fault.before(INS_DEBIT))
    with pytest.raises(CardRemoved) as caught:
        await reader.transmit([step(terminal.debit_apdu(1_000, first[2]))])
    assert caught.value.responses == []
    assert not reader.present
    assert (card.state.balance, card.state.offline_counter) == (5_000, 0)

    # Recovery (spec §6): the counter did not move, so there is no proof to fetch.
    reader.insert()
    recovered = await reader.transmit(
        [
            step(SELECT_EP),
            step(cmd.InitializeForPurchase(1, 0, terminal.terminal_id).to_apdu()),
            step(cmd.GetTransactionProve(0x06, 0).to_apdu()),
        ]
    )
    assert cmd.InitializeForPurchaseResponse.from_data(recovered[1].data).offline_counter == 0
    assert recovered[2].sw == 0x9406


async def test_leaving_after_the_card_committed_the_debit_loses_only_the_answer() -> None:
    card = make_card()
    reader = SimReader(card)
    terminal = HostTerminal(reader)
    await terminal.load(5_000)
    first = await terminal.purchase_init(1_000)
    reader.inject(Fault.after(INS_DEBIT))
    with pytest.raises(CardRemoved) as caught:
        await reader.transmit([step(terminal.debit_apdu(1_000, first[2]))])
    assert caught.value.responses == []
    assert (card.state.balance, card.state.offline_counter) == (4_000, 1)

    # Recovery (spec §6): the counter moved; GET TRANSACTION PROVE gives the lost MAC2/TAC.
    reader.insert()
    recovered = await reader.transmit(
        [
            step(SELECT_EP),
            step(cmd.InitializeForPurchase(1, 0, terminal.terminal_id).to_apdu()),
            step(cmd.GetTransactionProve(0x06, 1).to_apdu()),
        ]
    )
    assert cmd.InitializeForPurchaseResponse.from_data(recovered[1].data).offline_counter == 1
    proof = cmd.TransactionProof.from_data(recovered[2].data)
    terminal.check_debit(1_000, first[2], mac2=proof.mac2, tac=proof.tac)


async def test_a_fault_mid_batch_returns_the_responses_before_it() -> None:
    reader = SimReader(make_card())
    reader.inject(Fault.before(INS_INITIALIZE))
    with pytest.raises(CardRemoved) as caught:
        await HostTerminal(reader).purchase_init(100)
    assert [r.sw for r in caught.value.responses] == [0x9000, 0x9000]


async def test_faults_are_one_shot_and_count_occurrences() -> None:
    reader = SimReader(make_card())
    reader.inject(Fault.after(occurrence=3))
    with pytest.raises(CardRemoved) as caught:
        await reader.transmit([step(SELECT_EP)] + [step(GET_BALANCE)] * 4)
    assert len(caught.value.responses) == 2
    reader.insert()
    responses = await reader.transmit([step(SELECT_EP)] + [step(GET_BALANCE)] * 4)
    assert [r.sw for r in responses] == [0x9000] * 5


async def test_leaving_the_field_cancels_a_pending_initialize() -> None:
    reader = SimReader(make_card())
    terminal = HostTerminal(reader)
    await terminal.load(5_000)
    first = await terminal.purchase_init(1_000)
    reader.remove()
    reader.insert()
    [debit] = await reader.transmit([step(terminal.debit_apdu(1_000, first[2]))])
    assert debit.sw == 0x6985


async def test_hooks_see_every_apdu_before_and_after_and_may_pull_the_card() -> None:
    reader = SimReader(make_card())
    events: list[ApduEvent] = []

    def hook(event: ApduEvent) -> None:
        events.append(event)
        if event.phase is Phase.AFTER and event.apdu == GET_BALANCE:
            reader.remove()

    reader.add_hook(hook)
    with pytest.raises(CardRemoved) as caught:
        await reader.transmit([step(SELECT_EP), step(GET_BALANCE), step(GET_BALANCE)])
    assert [r.sw for r in caught.value.responses] == [0x9000]
    assert [(e.phase, e.index) for e in events] == [
        (Phase.BEFORE, 1),
        (Phase.AFTER, 1),
        (Phase.BEFORE, 2),
        (Phase.AFTER, 2),
    ]
    assert events[3].response == bytes.fromhex("000000009000")
    reader.remove_hook(hook)


async def test_an_image_backed_card_keeps_every_commit_and_is_locked(tmp_path: Path) -> None:
    image = tmp_path / "card.json"
    ImageFile(image).create(make_state())
    async with SimReader.from_image(image) as reader:
        with pytest.raises(CardBusy):
            SimReader.from_image(image)
        reader.inject(Fault.after(INS_DEBIT))
        terminal = HostTerminal(reader)
        await terminal.load(2_000)
        first = await terminal.purchase_init(500)
        with pytest.raises(CardRemoved):
            await reader.transmit([step(terminal.debit_apdu(500, first[2]))])
    state = ImageFile(image).load()
    assert (state.balance, state.online_counter, state.offline_counter) == (1_500, 1, 1)
    async with SimReader.from_image(image) as again:
        assert await HostTerminal(again).balance() == 1_500
