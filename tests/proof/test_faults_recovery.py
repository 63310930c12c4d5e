"""Fault matrix, recovery paths: webhooks to a merchant that is down, the card's next
contact through another order, and the expiry sweep.

In process: the real settlement app (SQLite file, its clock injected), the real merchant
shop app (its webhook endpoint verifies signatures and re-reads settlement), deliveries by
``deliver_due`` with the injected clock through a transport that refuses connections while
the shop is "down". Scenarios:

- the answer to capture/complete is lost and the shopper never returns: only the webhook
  can tell the shop; the shop is down for three attempts, then the retry gets through;
- a DEBIT/CREDIT is torn and the shopper walks away; the same card pays another order
  later: settlement's ``recovery_required`` makes that contact settle the first one, and
  the webhook (after the shop's downtime) tells its order;
- an authorisation is left hanging (the shopper walks away before the DEBIT): the expiry
  sweep makes it ``uncertain``; the card's next contact proves nothing was debited;
- payments and loads opened but never presented: the sweep expires them (a load's funds go
  back to their source).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.proof.conftest import Proof
from tests.proof.harness import (
    DEADLINE,
    Gate,
    GatedSettlement,
    Loss,
    ShopperReader,
    settlement_client,
)
from tests.proof.invariants import check_invariants
from tests.settlement.support import FakeClock, World, database_url, make_world
from webpurse.card import CardApplet
from webpurse.merchant.app import create_app
from webpurse.merchant.cashier import Cashier
from webpurse.merchant.orders import PURCHASE, TOPUP, Order, OrderBook
from webpurse.merchant.readers import LocalBroker
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import RETRY_PAUSES, Settlement
from webpurse.protocol.commands import INS_CREDIT_FOR_LOAD, INS_DEBIT_FOR_PURCHASE
from webpurse.reader.sim import Fault
from webpurse.settlement.expiry import expire_stale
from webpurse.settlement.routes_webhooks import secret_box_for
from webpurse.settlement.webhooks import MessageStatus, WebhookMessage, deliver_due

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SUITE = "faults"
FUNDS = 10_000
PRICE = 1_250
TOPUP_AMOUNT = 5_000
DOWN_ATTEMPTS = 3


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    # The shop checks webhook timestamps against the wall clock: start settlement's at now.
    clock = FakeClock(dt.datetime.now(dt.UTC).replace(microsecond=0))
    with database_url("sqlite", tmp_path, migrated=True) as url, make_world(url, clock=clock) as w:
        yield w


class Downtime(httpx.AsyncBaseTransport):
    """The shop's network: refuses connections until ``up``."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.up = False
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            self.refused += 1
            raise httpx.ConnectError("connection refused (the shop is down)", request=request)
        return await self.inner.handle_async_request(request)


@dataclass
class Site:
    app: Any
    orders: OrderBook
    cashier: Cashier
    reader: ShopperReader
    network: Downtime
    hooks: httpx.AsyncClient

    async def order(self, kind: str, amount: int) -> Order:
        order = self.orders.create(
            session_id="s" * 20,
            kind=kind,
            amount=amount,
            funding="merchant_float" if kind == TOPUP else None,  # a till top-up
        )
        order = await self.cashier.open_settlement(order, f"proof {kind}")
        self.cashier.start(order.id)
        return order

    async def walk_away(self, order_id: str, *, parked: bool = False) -> None:
        """The shopper leaves: the flow's wait for the card ends (as its timeout would).

        The flow is stopped only while it waits for the card (or is ``parked`` at a gate),
        never in the middle of a request to settlement.
        """
        if not parked:
            await asyncio.wait_for(self.reader.card_wanted.wait(), DEADLINE)
        task = self.cashier.task(order_id)
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def pairs(self) -> list[tuple[str, str | None]]:
        with self.orders._sessions() as session:
            return [(o.status, o.settlement_id) for o in session.scalars(select(Order))]

    def status(self, order_id: str) -> str:
        order = self.orders.get(order_id)
        assert order is not None
        return order.status


@asynccontextmanager
async def site(
    world: World, tmp_path: Path, card: CardApplet, settlement: Settlement
) -> AsyncIterator[Site]:
    answer = world.client.post(
        "/v1/webhook_endpoints",
        json={"url": "http://shop.test/webhooks/settlement", "events": ["*"]},
        headers=world.auth(world.merchant_key),
    )
    assert answer.status_code == 201, answer.text
    settings = MerchantSettings(
        data_dir=tmp_path, cookie_secret=b"c" * 32, webhook_secret=answer.json()["secret"]
    )
    reader = ShopperReader(card)
    app = create_app(settings, settlement=settlement, broker=LocalBroker(reader))
    network = Downtime(httpx.ASGITransport(app=app))
    async with httpx.AsyncClient(transport=network) as hooks:
        yield Site(app, app.state.orders, app.state.cashier, reader, network, hooks)
        await app.state.cashier.close()


async def deliver(world: World, shop: Site, down_attempts: int = DOWN_ATTEMPTS) -> int:
    """Run the outbox with the injected clock until every message is delivered."""
    box = secret_box_for(world.settings)
    rng = random.Random(7)
    for _ in range(20):
        shop.network.up = shop.network.refused >= down_attempts
        await deliver_due(
            world.factory,
            shop.hooks,
            world.clock(),
            secret_box=box,
            rng=rng,
            allow_private=world.settings.webhook_allow_private,  # shop.test: an in-process app
        )
        with world.factory() as session:
            pending = session.scalars(
                select(WebhookMessage).where(WebhookMessage.status != MessageStatus.SUCCEEDED)
            ).all()
        if not pending:
            return shop.network.refused
        world.clock.advance(dt.timedelta(seconds=45))  # past the backoff (5 s, 10 s, 20 s ...)
    raise AssertionError("webhooks still undelivered after 20 passes")


def sweep(world: World, after: dt.timedelta) -> dict[str, int]:
    world.clock.advance(after)
    with world.factory() as session, session.begin():
        report = expire_stale(
            session,
            world.clock(),
            requires_card_ttl=dt.timedelta(seconds=30),
            authorised_ttl=dt.timedelta(seconds=30),
        )
    return report.to_json()


def _card(world: World, kind: str) -> CardApplet:
    return world.funded_card(FUNDS) if kind == "purchase" else world.issue()


def _order_kind(kind: str) -> tuple[str, int]:
    return (PURCHASE, PRICE) if kind == "purchase" else (TOPUP, TOPUP_AMOUNT)


@pytest.mark.parametrize("kind", ["purchase", "load"])
async def test_lost_answer_and_no_shopper_the_webhook_tells_the_shop_after_its_downtime(
    world: World, tmp_path: Path, proof: Proof, kind: str
) -> None:
    finish = "capture" if kind == "purchase" else "complete"
    done = "paid" if kind == "purchase" else "loaded"
    with proof.row(
        SUITE,
        f"{kind}: {finish}'s answer lost (every retry too), shopper gone; "
        f"the shop's webhook endpoint is down for {DOWN_ATTEMPTS} attempts",
        expected=f"retry with backoff delivers; order {done} from the webhook; invariants hold",
    ) as row:
        card = _card(world, kind)
        # Every attempt's answer is lost (the client's retries with the same key included).
        loss = Loss("POST", f"/{finish}", after=True, times=len(RETRY_PAUSES) + 1)
        async with (
            settlement_client(world.client.app, world.merchant_key, loss) as client,
            site(world, tmp_path, card, client) as shop,
        ):
            kind_name, amount = _order_kind(kind)
            order = await shop.order(kind_name, amount)
            task = shop.cashier.task(order.id)
            assert task is not None
            await asyncio.wait_for(asyncio.shield(task), DEADLINE)  # the flow gave up
            assert loss.fired and shop.status(order.id) == "pending"
            refused = await deliver(world, shop)
            assert shop.status(order.id) == done
            pairs = shop.pairs()
        report = check_invariants(world.factory, world.url, [card], orders=pairs)
        row.observed = f"{done} after {refused} refused deliveries; {report.summary()}"


@pytest.mark.parametrize("kind", ["purchase", "load"])
async def test_torn_then_the_cards_next_contact_for_another_order_settles_it(
    world: World, tmp_path: Path, proof: Proof, kind: str
) -> None:
    step = "DEBIT" if kind == "purchase" else "CREDIT"
    done = "paid" if kind == "purchase" else "loaded"
    with proof.row(
        SUITE,
        f"{kind}: {step} torn, shopper walks away; the card later "
        f"{'pays another order' if kind == 'purchase' else 'is topped up again'}; "
        "shop down for a while",
        expected=f"next contact recovers it (3 round trips); both orders {done} once; "
        "webhook tells the first",
    ) as row:
        card = _card(world, kind)
        async with (
            settlement_client(world.client.app, world.merchant_key) as client,
            site(world, tmp_path, card, client) as shop,
        ):
            shop.reader.inject(
                Fault.after(INS_DEBIT_FOR_PURCHASE if kind == "purchase" else INS_CREDIT_FOR_LOAD)
            )
            kind_name, amount = _order_kind(kind)
            first = await shop.order(kind_name, amount)
            await shop.walk_away(first.id)
            assert shop.status(first.id) == "interrupted"
            second = await shop.order(kind_name, amount)
            await shop.reader.present_again()
            task = shop.cashier.task(second.id)
            assert task is not None
            await asyncio.wait_for(asyncio.shield(task), DEADLINE)
            refused = await deliver(world, shop)
            statuses = (shop.status(first.id), shop.status(second.id))
            trips = (shop.orders.get(second.id) or second).round_trips
            pairs = shop.pairs()
        report = check_invariants(world.factory, world.url, [card], orders=pairs)
        assert statuses == (done, done)
        assert trips == 3
        row.observed = (
            f"orders {statuses[0]}/{statuses[1]}, second in {trips} round trips; "
            f"{refused} refused deliveries; {report.summary()}"
        )


@pytest.mark.parametrize("kind", ["purchase", "load"])
async def test_a_hanging_authorisation_is_swept_then_released_by_the_next_contact(
    world: World, tmp_path: Path, proof: Proof, kind: str
) -> None:
    step = "DEBIT" if kind == "purchase" else "CREDIT"
    done = "paid" if kind == "purchase" else "loaded"
    with proof.row(
        SUITE,
        f"{kind}: authorised, shopper walks away before the {step}; expiry sweep; "
        "the card's next contact",
        expected=f"sweep → uncertain; next contact proves no {step} → released; "
        f"second order {done}; first not",
    ) as row:
        card = _card(world, kind)
        gate = Gate("authorise", before=False)
        async with (
            settlement_client(world.client.app, world.merchant_key) as client,
            site(world, tmp_path, card, GatedSettlement(client, gate)) as shop,
        ):
            kind_name, amount = _order_kind(kind)
            first = await shop.order(kind_name, amount)
            await asyncio.wait_for(gate.reached.wait(), DEADLINE)
            await shop.walk_away(first.id, parked=True)
            swept = sweep(world, dt.timedelta(seconds=31))
            assert swept[f"{'payments' if kind == 'purchase' else 'loads'}_uncertain"] == 1
            second = await shop.order(kind_name, amount)
            task = shop.cashier.task(second.id)
            assert task is not None
            await asyncio.wait_for(asyncio.shield(task), DEADLINE)
            await deliver(world, shop, down_attempts=1)
            statuses = (shop.status(first.id), shop.status(second.id))
            pairs = shop.pairs()
        report = check_invariants(world.factory, world.url, [card], orders=pairs)
        assert statuses[1] == done and statuses[0] not in ("paid", "loaded")
        row.observed = f"swept {swept}; orders {statuses[0]}/{statuses[1]}; {report.summary()}"


async def test_never_presented_payments_and_loads_expire_and_loads_return_their_funds(
    world: World, tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "purchase and load opened, no card ever presented; expiry sweep",
        expected="both expired; the load's funds back at their source; invariants hold",
    ) as row:
        card = world.funded_card(FUNDS)
        async with (
            settlement_client(world.client.app, world.merchant_key) as client,
            site(world, tmp_path, card, client) as shop,
        ):
            shop.reader.remove()
            purchase = await shop.order(PURCHASE, PRICE)
            await shop.walk_away(purchase.id)
            topup = await shop.order(TOPUP, TOPUP_AMOUNT)
            await shop.walk_away(topup.id)
            swept = sweep(world, dt.timedelta(seconds=31))
            pairs = shop.pairs()
        report = check_invariants(world.factory, world.url, [card], orders=pairs)
        assert swept["payments_expired"] == 1 and swept["loads_expired"] == 1
        assert report.totals.get("held", 0) == 0
        row.observed = f"swept {swept}; {report.summary()}"
