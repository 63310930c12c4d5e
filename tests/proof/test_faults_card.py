"""Fault matrix, card side: the card leaves the field before or after each APDU reaches it.

For a purchase and for a load, through the merchant's real cashier and flows, against the
real settlement app (in process, SQLite file), with a personalised card in a sim reader:
the card is removed before each command of both batches reaches it, and after the card
processed (and committed) it but before its answer came back; then again during the
recovery contact itself. The shopper presents the card once more whenever the flow asks,
and afterwards every invariant holds (``tests/proof/invariants.py``): the order is paid (or
loaded) exactly once, the card's balance equals its shadow, value is conserved.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proof.conftest import Proof
from tests.proof.harness import Shop, ShopperReader, settlement_client
from tests.proof.invariants import check_invariants
from tests.settlement.support import World, database_url, make_world
from webpurse.protocol.commands import (
    INS_CREDIT_FOR_LOAD,
    INS_DEBIT_FOR_PURCHASE,
    INS_GET_TRANSACTION_PROVE,
    INS_INITIALIZE,
    INS_READ_BINARY,
    INS_SELECT,
)
from webpurse.reader.sim import Fault, Phase

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

SUITE = "faults"
FUNDS = 10_000
PRICE = 1_250
TOPUP = 5_000


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with database_url("sqlite", tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def _steps(kind: str) -> list[tuple[str, int]]:
    last = (
        ("DEBIT", INS_DEBIT_FOR_PURCHASE) if kind == "purchase" else ("CREDIT", INS_CREDIT_FOR_LOAD)
    )
    return [
        ("SELECT", INS_SELECT),
        ("READ BINARY", INS_READ_BINARY),
        ("INITIALIZE", INS_INITIALIZE),
        last,
    ]


CASES = [
    (kind, name, ins, phase)
    for kind in ("purchase", "load")
    for name, ins in _steps(kind)
    for phase in (Phase.BEFORE, Phase.AFTER)
]


def _describe(kind: str, name: str, phase: Phase) -> str:
    if phase is Phase.BEFORE:
        return f"{kind}: card leaves before {name} reaches it"
    return f"{kind}: card leaves after {name} ran (committed), before its answer came back"


async def _run(
    world: World,
    tmp_path: Path,
    kind: str,
    first: Fault,
    second: Fault | None = None,
) -> tuple[str, int, str]:
    card = world.funded_card(FUNDS) if kind == "purchase" else world.issue()
    reader = ShopperReader(card)
    reader.inject(first)
    contacts = 1
    async with settlement_client(world.client.app, world.merchant_key) as client:
        shop = Shop(tmp_path, client, reader)
        order = await (shop.purchase(PRICE) if kind == "purchase" else shop.topup(TOPUP))
        await reader.present_again()
        contacts += 1
        if second is not None:
            reader.inject(second)
            await reader.present_again()
            contacts += 1
        final = await shop.finished(order.id)
        pairs = shop.order_pairs()
        await shop.stop()
    report = check_invariants(world.factory, world.url, [card], orders=pairs)
    want = FUNDS - PRICE if kind == "purchase" else TOPUP
    assert final.status == ("paid" if kind == "purchase" else "loaded"), final.status
    assert card.state.balance == want
    objects = dict(report.payments if kind == "purchase" else report.loads)
    assert objects.get("succeeded", 0) == 1  # exactly once
    return final.status, contacts, report.summary()


@pytest.mark.parametrize(
    ("kind", "name", "ins", "phase"),
    CASES,
    ids=[f"{k}-{n.replace(' ', '_')}-{p.value}" for k, n, _, p in CASES],
)
async def test_card_leaves_at_every_step(
    world: World, tmp_path: Path, proof: Proof, kind: str, name: str, ins: int, phase: Phase
) -> None:
    done = "paid" if kind == "purchase" else "loaded"
    with proof.row(
        SUITE,
        _describe(kind, name, phase),
        expected=f"{done} exactly once at the next contact; invariants hold",
    ) as row:
        fault = Fault(phase, ins)
        status, contacts, summary = await _run(world, tmp_path, kind, fault)
        row.observed = f"{status} after {contacts} contacts; {summary}"


RECOVERY_STEPS = [
    ("INITIALIZE (amount 0)", INS_INITIALIZE),
    ("GET TRANSACTION PROVE", INS_GET_TRANSACTION_PROVE),
]
RECOVERY_CASES = [
    (kind, name, ins, phase)
    for kind in ("purchase", "load")
    for name, ins in RECOVERY_STEPS
    for phase in (Phase.BEFORE, Phase.AFTER)
]


@pytest.mark.parametrize(
    ("kind", "name", "ins", "phase"),
    RECOVERY_CASES,
    ids=[f"{k}-{n.split()[0]}-{p.value}" for k, n, _, p in RECOVERY_CASES],
)
async def test_torn_transaction_then_the_recovery_contact_is_interrupted(
    world: World, tmp_path: Path, proof: Proof, kind: str, name: str, ins: int, phase: Phase
) -> None:
    step = "DEBIT" if kind == "purchase" else "CREDIT"
    done = "paid" if kind == "purchase" else "loaded"
    torn = Fault.after(INS_DEBIT_FOR_PURCHASE if kind == "purchase" else INS_CREDIT_FOR_LOAD)
    with proof.row(
        SUITE,
        f"{kind}: {step} torn, then the recovery contact loses the card {phase.value} {name}",
        expected=f"{done} exactly once at the third contact; invariants hold",
    ) as row:
        status, contacts, summary = await _run(world, tmp_path, kind, torn, Fault(phase, ins))
        row.observed = f"{status} after {contacts} contacts; {summary}"


PG_CASES = [(kind, phase) for kind in ("purchase", "load") for phase in (Phase.BEFORE, Phase.AFTER)]


@pytest.mark.postgres
@pytest.mark.parametrize(("kind", "phase"), PG_CASES, ids=[f"{k}-{p.value}" for k, p in PG_CASES])
async def test_the_last_command_lost_on_postgresql(
    tmp_path: Path, proof: Proof, kind: str, phase: Phase
) -> None:
    name, ins = _steps(kind)[-1]
    done = "paid" if kind == "purchase" else "loaded"
    with (
        database_url("postgresql", tmp_path, migrated=True) as url,
        make_world(url) as pg_world,
        proof.row(
            SUITE,
            f"{_describe(kind, name, phase)} (PostgreSQL)",
            expected=f"{done} exactly once at the next contact; invariants hold",
        ) as row,
    ):
        status, contacts, summary = await _run(pg_world, tmp_path, kind, Fault(phase, ins))
        row.observed = f"{status} after {contacts} contacts; {summary}"
