"""The merchant's settlement client and flows against the real settlement app (in process).

SQLite always, PostgreSQL too when it answers (``-m postgres``); the card is issued by
settlement's security module and sits in a SimReader, so every MAC and TAC is real.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.settlement.support import (
    BACKENDS,
    World,
    apdu,
    database_url,
    deterministic_random,
    make_world,
    ok,
    read_issuer,
)
from webpurse.card import CardApplet, ImageFile
from webpurse.merchant.flows import recover, run_transaction
from webpurse.merchant.settlement import (
    BatchingSettlementClient,
    Kind,
    RecoveryHint,
    SettlementClient,
    SettlementError,
)
from webpurse.protocol.apdu import StatusWord
from webpurse.protocol.commands import (
    INS_CREDIT_FOR_LOAD,
    INS_DEBIT_FOR_PURCHASE,
    DebitForPurchase,
    InitializeForLoad,
    InitializeForPurchase,
)
from webpurse.protocol.records import TransactionType
from webpurse.reader.sim import Fault, SimReader


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


@pytest.fixture(params=["single", "batched"])
async def client(world: World, request: pytest.FixtureRequest) -> AsyncIterator[SettlementClient]:
    """Every flow runs with each call on its own and again through ``POST /v1/batch``:
    the batching client must be indistinguishable to the flows."""
    transport = httpx.ASGITransport(app=world.client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        if request.param == "batched":
            yield BatchingSettlementClient(http, world.merchant_key)
        else:
            yield SettlementClient(http, world.merchant_key)


async def test_purchase_against_settlement_is_two_round_trips(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.funded_card(10_000)) as reader:
        payment = await client.create(Kind.PAYMENT, 1250, description="tea", reference="ord_1")
        assert payment.status == "requires_card" and len(payment.terminal_id) == 6
        outcome = await run_transaction(reader, client, payment)
        assert (outcome.status, outcome.round_trips) == ("succeeded", 2)
        assert reader.card is not None and reader.card.state.balance == 8_750
        fetched = await client.get(Kind.PAYMENT, payment.id)
        assert fetched.status == "succeeded" and fetched.tac == outcome.tac


async def test_load_against_settlement_is_two_round_trips(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.issue()) as reader:
        load = await client.create(
            Kind.LOAD, 5000, description="top-up", reference="ord_2", funding="merchant_float"
        )
        outcome = await run_transaction(reader, client, load)
        assert (outcome.status, outcome.round_trips) == ("succeeded", 2)
        assert reader.card is not None and reader.card.state.balance == 5000


async def test_settlement_declines_insufficient_funds_at_the_card(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.funded_card(100)) as reader:
        payment = await client.create(Kind.PAYMENT, 1250, description="tea", reference="ord_3")
        outcome = await run_transaction(reader, client, payment)
        assert (outcome.status, outcome.decline_code) == ("declined", "insufficient_funds")
        assert (await client.get(Kind.PAYMENT, payment.id)).status == "canceled"


async def test_a_card_that_locked_itself_is_observed_at_settlement_not_flagged(
    world: World, client: SettlementClient
) -> None:
    card = world.funded_card(5_000)
    read_issuer(card)
    terminal_id = bytes.fromhex(world.terminal_id)
    for guess in range(10):  # a relay guessing MAC1: the card locks itself (spec §5)
        ok(card, InitializeForPurchase(1, 100, terminal_id).to_apdu())
        debit = DebitForPurchase(guess + 1, dt.date(2026, 11, 27), dt.time(12), bytes(4))
        assert apdu(card, debit.to_apdu())[1] == StatusWord.MAC_INVALID
    assert card.state.locked
    async with SimReader(card) as reader:
        payment = await client.create(Kind.PAYMENT, 100, description="tea", reference="ord_9")
        outcome = await run_transaction(reader, client, payment)
    assert (outcome.status, outcome.decline_code) == ("declined", "card_blocked")
    assert (await client.get(Kind.PAYMENT, payment.id)).status == "canceled"
    number = card.state.issuer.card_number
    operator = world.auth(world.operator_key)
    got = world.client.get(f"/v1/cards/{number}", headers=operator).json()
    # 9303 is the relay's word, not the card's MAC: an observation for the operator only.
    assert not got["flagged"] and got["status"] == "active"
    seen = world.client.get(f"/v1/card_observations?card_number={number}", headers=operator).json()[
        "data"
    ]
    assert [(o["kind"], o["reference"]) for o in seen] == [("card_locked_claim", payment.id)]


async def test_torn_debit_is_resolved_paid_on_the_next_contact(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.funded_card(10_000)) as reader:
        payment = await client.create(Kind.PAYMENT, 1250, description="tea", reference="ord_4")
        reader.inject(Fault.after(INS_DEBIT_FOR_PURCHASE))
        outcome = await run_transaction(reader, client, payment)
        assert outcome.status == "uncertain" and outcome.counter is not None
        reader.insert()
        hint = RecoveryHint(Kind.PAYMENT, payment.id, TransactionType.EP_PURCHASE, outcome.counter)
        recovered = await recover(
            reader, client, hint, key_index=1, terminal_id=payment.terminal_id
        )
        assert (recovered.status, recovered.round_trips) == ("succeeded", 1)
        assert reader.card is not None and reader.card.state.balance == 8_750


async def test_lost_debit_is_released_on_the_next_contact(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.funded_card(10_000)) as reader:
        payment = await client.create(Kind.PAYMENT, 1250, description="tea", reference="ord_5")
        reader.inject(Fault.before(INS_DEBIT_FOR_PURCHASE))
        outcome = await run_transaction(reader, client, payment)
        assert outcome.status == "uncertain" and outcome.counter is not None
        reader.insert()
        hint = RecoveryHint(Kind.PAYMENT, payment.id, TransactionType.EP_PURCHASE, outcome.counter)
        recovered = await recover(
            reader, client, hint, key_index=1, terminal_id=payment.terminal_id
        )
        assert recovered.status == "canceled"
        assert reader.card is not None and reader.card.state.balance == 10_000


async def test_a_load_lost_before_the_card_stays_held_until_the_next_load_settles_it(
    world: World, client: SettlementClient
) -> None:
    """The card shows the counter unchanged: no proof for a load, so recovery answers
    ``canceled`` for the order (load again) while settlement keeps the load uncertain,
    its funds held; the next load's verified TAC at that counter releases it."""
    async with SimReader(world.issue()) as reader:
        lost = await client.create(
            Kind.LOAD, 2_000, description="top-up", reference="ord_8", funding="merchant_float"
        )
        reader.inject(Fault.before(INS_CREDIT_FOR_LOAD))
        outcome = await run_transaction(reader, client, lost)
        assert outcome.status == "uncertain" and outcome.counter is not None
        reader.insert()
        hint = RecoveryHint(Kind.LOAD, lost.id, TransactionType.EP_LOAD, outcome.counter)
        recovered = await recover(reader, client, hint, key_index=1, terminal_id=lost.terminal_id)
        assert recovered.status == "canceled" and recovered.object is not None
        assert recovered.object.status == "uncertain"
        assert (await client.get(Kind.LOAD, lost.id)).status == "uncertain"
        again = await client.create(
            Kind.LOAD, 2_000, description="top-up", reference="ord_8", funding="merchant_float"
        )
        assert (await run_transaction(reader, client, again)).status == "succeeded"
        assert (await client.get(Kind.LOAD, lost.id)).status == "canceled"
        assert reader.card is not None and reader.card.state.balance == 2_000


async def test_an_open_load_the_card_shows_unused_is_passed_by_the_next_load(
    world: World, client: SettlementClient
) -> None:
    """recovery_required for an ``authorised`` load whose CREDIT never left: resolve keeps
    it (409), the flow marks it uncertain and the new load goes ahead linked to it."""
    async with SimReader(world.issue()) as reader:
        stale = await client.create(
            Kind.LOAD, 2_000, description="top-up", reference="ord_9", funding="merchant_float"
        )
        card = reader.card
        assert card is not None
        issuer = read_issuer(card)
        init = ok(card, InitializeForLoad(1, 2_000, stale.terminal_id).to_apdu())
        await client.authorise(
            Kind.LOAD, stale.id, issuer_data=issuer, initialize=init, terminal_id=stale.terminal_id
        )  # the merchant died before the CREDIT
        fresh = await client.create(
            Kind.LOAD, 500, description="top-up", reference="ord_10", funding="merchant_float"
        )
        outcome = await run_transaction(reader, client, fresh)
        assert (outcome.status, outcome.round_trips) == ("succeeded", 3)
        assert (await client.get(Kind.LOAD, stale.id)).status == "canceled"
        assert card.state.balance == 500


async def test_recovery_required_settles_the_torn_load_then_pays(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.funded_card(1000)) as reader:
        load = await client.create(
            Kind.LOAD, 2000, description="top-up", reference="ord_6", funding="merchant_float"
        )
        reader.inject(Fault.after(INS_CREDIT_FOR_LOAD))
        assert (await run_transaction(reader, client, load)).status == "uncertain"
        reader.insert()
        payment = await client.create(Kind.PAYMENT, 1250, description="tea", reference="ord_7")
        outcome = await run_transaction(reader, client, payment)
        assert (outcome.status, outcome.round_trips) == ("succeeded", 3)
        assert (await client.get(Kind.LOAD, load.id)).status == "succeeded"
        assert reader.card is not None and reader.card.state.balance == 1000 + 2000 - 1250


async def test_a_wrong_key_is_a_settlement_error_and_never_logged(world: World) -> None:
    transport = httpx.ASGITransport(app=world.client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        client = SettlementClient(http, "sk_mer_wrong")
        assert "sk_mer_wrong" not in repr(client)
        with pytest.raises(SettlementError) as caught:
            await client.create(Kind.PAYMENT, 100, description="x", reference="y")
        assert caught.value.status == 401 and "sk_mer_wrong" not in str(caught.value)


async def test_a_real_clone_is_checked_and_blocked_by_the_flow(
    world: World, client: SettlementClient, tmp_path: Path
) -> None:
    """The decline offers a card check; the flow relays it in the same contact. A copied
    image (real keys) answers with a MAC1 that verifies: settlement blocks the card."""
    original = world.funded_card(5_000)
    ImageFile(tmp_path / "a.json").create(original.state)
    shutil.copy(tmp_path / "a.json", tmp_path / "b.json")
    copy_a = CardApplet(
        ImageFile(tmp_path / "a.json").load(),
        ImageFile(tmp_path / "a.json"),
        deterministic_random(31),
    )
    copy_b = CardApplet(
        ImageFile(tmp_path / "b.json").load(),
        ImageFile(tmp_path / "b.json"),
        deterministic_random(32),
    )
    async with SimReader(copy_a) as reader:
        paid = await client.create(Kind.PAYMENT, 700, description="tea", reference="ord_a")
        assert (await run_transaction(reader, client, paid)).status == "succeeded"
    async with SimReader(copy_b) as reader:
        cloned = await client.create(Kind.PAYMENT, 700, description="tea", reference="ord_b")
        outcome = await run_transaction(reader, client, cloned)
    assert (outcome.status, outcome.decline_code) == ("declined", "counter_mismatch")
    assert outcome.round_trips == 2  # batch 1, then the card check: no DEBIT
    number = original.state.issuer.card_number
    got = world.client.get(f"/v1/cards/{number}", headers=world.auth(world.operator_key)).json()
    assert got["status"] == "blocked" and got["flagged"]


async def test_a_card_another_shop_left_ahead_of_settlement_heals_then_pays(
    world: World, client: SettlementClient
) -> None:
    """Shop B debits 1 fen for real, then releases it on a forged "counter unchanged": the
    card is one purchase ahead of settlement. Our flow gets ``recover.heal``, sends the
    card's PROVE to /v1/heal (B's debit is settled for B) and pays, one round trip more."""
    card = world.issue()
    world.other_terminal.load(card, 500)
    b = world.other_terminal
    stale = b.create_payment(1)
    issuer, init = b.purchase_batch1(card, 1)
    held = b.authorise_payment(stale["id"], issuer, init)
    ok(card, bytes.fromhex(held.json()["authorisation"]["debit_apdu"]))  # the real debit
    assert b.post(f"/v1/payments/{stale['id']}/uncertain").status_code == 200
    _, fresh = b.purchase_batch1(card, 0)
    forged = bytearray(fresh)
    forged[0:4] = (500).to_bytes(4, "big")  # the balance and counter before the debit
    forged[4:6] = (0).to_bytes(2, "big")
    released = b.post(
        f"/v1/payments/{stale['id']}/resolve", {"initialize_response": bytes(forged).hex()}
    )
    assert released.json()["status"] == "canceled"
    async with SimReader(card) as reader:
        payment = await client.create(Kind.PAYMENT, 100, description="tea", reference="ord_h")
        outcome = await run_transaction(reader, client, payment)
    assert (outcome.status, outcome.round_trips) == ("succeeded", 3)
    settled = b.http.get(f"/v1/payments/{stale['id']}", headers=b.headers()).json()
    assert settled["status"] == "succeeded"
    assert card.state.balance == 500 - 1 - 100
