"""Fault matrix, merchant side: lost requests to settlement and a merchant server restart.

In process (real settlement app on a SQLite file, the merchant's real cashier and order
book on another, a sim card):

- a request from the merchant to settlement is lost before it arrives, or settlement
  handles it and its answer is lost (connection reset), at each call of the flow;
- the merchant server dies (every running flow cancelled where it stands) before or after
  each call to settlement, and a new merchant process starts over the same order book.

Recovery is what a shopper and the system do anyway: the shopper reloads the payment page
(the cashier starts again) and presents the card when asked; the order page re-reads
settlement; the expiry sweep runs with the clock moved past every deadline. Then every
invariant holds and the order is paid (loaded) exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proof.conftest import Proof
from tests.proof.harness import (
    DEADLINE,
    Gate,
    GatedSettlement,
    Loss,
    Shop,
    ShopperReader,
    settlement_client,
    shop_until_final,
)
from tests.proof.invariants import check_invariants
from tests.settlement.support import World, database_url, make_world
from webpurse.merchant import settlement as settlement_module
from webpurse.merchant.orders import Order
from webpurse.merchant.settlement import RETRY_PAUSES, SettlementError
from webpurse.protocol.commands import INS_CREDIT_FOR_LOAD, INS_DEBIT_FOR_PURCHASE
from webpurse.reader.sim import Fault
from webpurse.settlement.expiry import expire_stale

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SUITE = "faults"
FUNDS = 10_000
PRICE = 1_250
TOPUP = 5_000


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with database_url("sqlite", tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def _path(kind: str, call: str) -> tuple[str, str]:
    collection = "payments" if kind == "purchase" else "loads"
    if call == "create":
        return "POST", f"/v1/{collection}"
    if call == "finish":
        return "POST", "/capture" if kind == "purchase" else "/complete"
    return "POST", f"/{call}"


def _torn(kind: str) -> Fault:
    return Fault.after(INS_DEBIT_FOR_PURCHASE if kind == "purchase" else INS_CREDIT_FOR_LOAD)


async def _open(shop: Shop, kind: str) -> Order:
    amount = PRICE if kind == "purchase" else TOPUP
    order = shop.orders.create(
        session_id="s" * 20,
        kind=kind_name(kind),
        amount=amount,
        funding=None if kind == "purchase" else "merchant_float",  # a till top-up
    )
    with contextlib.suppress(SettlementError):  # the checkout page shows an error
        order = await shop.cashier.open_settlement(order, f"proof {kind}")
    shop.cashier.start(order.id)
    return order


def kind_name(kind: str) -> str:
    return "purchase" if kind == "purchase" else "topup"


def _sweep(world: World) -> None:
    world.clock.advance(dt.timedelta(hours=2))
    with world.factory() as session, session.begin():
        expire_stale(
            session,
            world.clock(),
            requires_card_ttl=world.settings.requires_card_ttl,
            authorised_ttl=world.settings.authorised_ttl,
        )


LOSS_CALLS = ["create", "authorise", "finish", "uncertain", "resolve"]
ALL_ATTEMPTS = len(RETRY_PAUSES) + 1  # the client's own retries with the same key, all lost
LOSS_CASES = [
    (kind, call, after, times)
    for kind in ("purchase", "load")
    for call in LOSS_CALLS
    for after in (False, True)
    # Lost for good only where it changes the path (the others end like a single loss).
    for times in ((1, ALL_ATTEMPTS) if call in ("authorise", "finish", "uncertain") else (1,))
]


def _call_name(kind: str, call: str) -> str:
    if call == "finish":
        return "capture" if kind == "purchase" else "complete"
    return call


@pytest.mark.parametrize(
    ("kind", "call", "after", "times"),
    LOSS_CASES,
    ids=[f"{k}-{c}-{'answer' if a else 'request'}-{t}x" for k, c, a, t in LOSS_CASES],
)
async def test_a_request_to_settlement_or_its_answer_is_lost(
    world: World,
    tmp_path: Path,
    proof: Proof,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    call: str,
    after: bool,
    times: int,
) -> None:
    # The client still makes every one of its attempts (each one lost for the 5x cases);
    # only its pauses between them (1.75 s of real time in all) are taken out.
    monkeypatch.setattr(settlement_module, "RETRY_PAUSES", tuple(0.0 for _ in RETRY_PAUSES))
    done = "paid" if kind == "purchase" else "loaded"
    what = "its answer is lost (settlement committed)" if after else "it never arrives"
    if times > 1:
        what += f", nor for any of the client's {times - 1} retries"
    torn = call in ("uncertain", "resolve")
    prefix = f"{'DEBIT' if kind == 'purchase' else 'CREDIT'} torn, then " if torn else ""
    with proof.row(
        SUITE,
        f"{kind}: {prefix}{_call_name(kind, call)} sent to settlement, {what}",
        expected=f"{done} exactly once (the client's retry, or a page reload and the card); "
        "invariants hold",
    ) as row:
        card = world.funded_card(FUNDS) if kind == "purchase" else world.issue()
        reader = ShopperReader(card)
        if torn:
            reader.inject(_torn(kind))
        method, suffix = _path(kind, call)
        loss = Loss(method, suffix, after=after, times=times)
        async with settlement_client(world.client.app, world.merchant_key, loss) as client:
            shop = Shop(tmp_path, client, reader)
            order = await _open(shop, kind)
            final, reloads = await shop_until_final(shop, reader, order.id)
            pairs = shop.order_pairs()
            await shop.stop()
        assert loss.fired, "the loss was never injected"
        _sweep(world)
        report = check_invariants(world.factory, world.url, [card], orders=pairs)
        assert final.status == done
        assert card.state.balance == (FUNDS - PRICE if kind == "purchase" else TOPUP)
        row.observed = f"{final.status} after {reloads} page reload(s); {report.summary()}"


GATE_CASES = [
    (kind, call, before)
    for kind in ("purchase", "load")
    for call, before in [
        ("authorise", True),
        ("authorise", False),
        ("finish", True),
        ("finish", False),
        ("uncertain", False),
        ("resolve", True),
        ("resolve", False),
    ]
]


@pytest.mark.parametrize(
    ("kind", "call", "before"),
    GATE_CASES,
    ids=[f"{k}-{c}-{'before' if b else 'after'}" for k, c, b in GATE_CASES],
)
async def test_the_merchant_server_restarts_between_steps(
    world: World, tmp_path: Path, proof: Proof, kind: str, call: str, before: bool
) -> None:
    done = "paid" if kind == "purchase" else "loaded"
    torn = call in ("uncertain", "resolve")
    prefix = f"{'DEBIT' if kind == 'purchase' else 'CREDIT'} torn, " if torn else ""
    when = "before sending" if before else "after the answer to"
    with proof.row(
        SUITE,
        f"{kind}: {prefix}merchant server dies {when} {_call_name(kind, call)}, then restarts",
        expected=f"{done} exactly once with the new process; invariants hold",
    ) as row:
        card = world.funded_card(FUNDS) if kind == "purchase" else world.issue()
        reader = ShopperReader(card)
        if torn:
            reader.inject(_torn(kind))
        gate = Gate(call, before)
        async with settlement_client(world.client.app, world.merchant_key) as client:
            shop = Shop(tmp_path, GatedSettlement(client, gate), reader)
            order = await _open(shop, kind)
            reached = asyncio.ensure_future(gate.reached.wait())
            while not gate.reached.is_set():
                wanted = asyncio.ensure_future(reader.card_wanted.wait())
                await asyncio.wait(
                    {reached, wanted}, timeout=DEADLINE, return_when="FIRST_COMPLETED"
                )
                wanted.cancel()
                if reader.card_wanted.is_set():
                    reader.insert()
                assert reached.done() or reader.present, "the flow never reached the gate"
            await shop.stop()  # the process dies here
            restarted = Shop(tmp_path, client, reader)  # same order book, a new process
            restarted.cashier.start(order.id)  # the shopper reloads the payment page
            final, reloads = await shop_until_final(restarted, reader, order.id)
            pairs = restarted.order_pairs()
            await restarted.stop()
        _sweep(world)
        report = check_invariants(world.factory, world.url, [card], orders=pairs)
        assert final.status == done
        assert card.state.balance == (FUNDS - PRICE if kind == "purchase" else TOPUP)
        row.observed = f"{final.status} after restart and {reloads} reload(s); {report.summary()}"
