"""The merchant's real settlement client and flows against the real settlement app.

Holds settlement to docs/team/contracts.md as the merchant server reads it: purchase, load,
a torn DEBIT recovered from the card's proof, and recovery_required costing one more trip.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.settlement.support import World
from webpurse.merchant.flows import recover, run_transaction
from webpurse.merchant.settlement import Kind, RecoveryHint, SettlementClient
from webpurse.protocol.commands import INS_CREDIT_FOR_LOAD, INS_DEBIT_FOR_PURCHASE
from webpurse.protocol.records import TransactionType
from webpurse.reader.sim import Fault, SimReader


@pytest.fixture
async def client(world: World) -> AsyncIterator[SettlementClient]:
    transport = httpx.ASGITransport(app=world.client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
        yield SettlementClient(http, world.merchant_key)


async def test_purchase_and_load_with_the_merchants_flows(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.issue()) as reader:
        load = await client.create(
            Kind.LOAD, 5_000, description="top-up", reference="till", funding="merchant_float"
        )
        assert (await run_transaction(reader, client, load)).status == "succeeded"
        payment = await client.create(Kind.PAYMENT, 1_250, description="tea", reference="o-1")
        outcome = await run_transaction(reader, client, payment)
        assert (outcome.status, outcome.round_trips) == ("succeeded", 2)
        assert reader.card is not None and reader.card.state.balance == 3_750


async def test_a_torn_debit_is_recovered_from_the_cards_proof(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.funded_card(10_000)) as reader:
        payment = await client.create(Kind.PAYMENT, 1_250, description="tea", reference="o-2")
        reader.inject(Fault.after(INS_DEBIT_FOR_PURCHASE))
        outcome = await run_transaction(reader, client, payment)
        assert outcome.status == "uncertain" and outcome.counter is not None
        reader.insert()
        hint = RecoveryHint(Kind.PAYMENT, payment.id, TransactionType.EP_PURCHASE, outcome.counter)
        recovered = await recover(
            reader, client, hint, key_index=1, terminal_id=payment.terminal_id
        )
        assert recovered.status == "succeeded"
        assert (await client.get(Kind.PAYMENT, payment.id)).status == "succeeded"


async def test_recovery_required_costs_one_more_round_trip(
    world: World, client: SettlementClient
) -> None:
    async with SimReader(world.funded_card(10_000)) as reader:
        first = await client.create(
            Kind.LOAD, 2_000, description="top-up", reference="till", funding="merchant_float"
        )
        reader.inject(Fault.after(INS_CREDIT_FOR_LOAD))
        assert (await run_transaction(reader, client, first)).status == "uncertain"
        reader.insert()
        second = await client.create(Kind.PAYMENT, 1_250, description="tea", reference="o-3")
        outcome = await run_transaction(reader, client, second)
        assert (outcome.status, outcome.round_trips) == ("succeeded", 3)
        assert (await client.get(Kind.LOAD, first.id)).status == "succeeded"
        assert reader.card is not None and reader.card.state.balance == 10_000 + 2_000 - 1_250
