"""Fault matrix, real processes: the settlement server is killed with SIGKILL between its
steps and restarted, on a SQLite file and on PostgreSQL.

The settlement server runs as ``webpurse serve settlement`` (uvicorn) in a subprocess on a
free port; the merchant's real cashier talks to it over HTTP; the card is the emulator in
a sim reader. At each gate of the flow (after the payment/load was created, after the card
ran the DEBIT/CREDIT but before capture/complete is sent, after the capture/complete was
answered, and for a torn transaction before ``uncertain`` or ``resolve``) the process gets
SIGKILL: no shutdown, no flush beyond what the database already committed. It is started
again on the same database and port; the shopper reloads the payment page and presents the
card when asked. Then every invariant holds, checked through the restarted server's
database and a real ``webpurse ledger check`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.proof.conftest import Proof
from tests.proof.harness import (
    DEADLINE,
    Gate,
    GatedSettlement,
    Shop,
    ShopperReader,
    shop_until_final,
)
from tests.proof.invariants import check_invariants
from tests.proof.processes import Live, live_settlement
from webpurse.merchant.orders import PURCHASE, TOPUP
from webpurse.merchant.settlement import SettlementClient
from webpurse.protocol.commands import INS_CREDIT_FOR_LOAD, INS_DEBIT_FOR_PURCHASE
from webpurse.reader.sim import Fault

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SUITE = "faults"
FUNDS = 10_000
PRICE = 1_250
TOPUP_AMOUNT = 5_000
GATES = [
    ("create", False, "after the payment/load was created"),
    ("finish", True, "after the card ran the {step}, before {finish} is sent"),
    ("finish", False, "after {finish} was answered"),
    ("uncertain", True, "after a torn {step}, before uncertain is sent"),
    ("resolve", True, "at the recovery contact, before resolve is sent"),
]
CASES = [
    pytest.param(
        backend, kind, call, before, text, id=f"{backend}-{kind}-{call}-{before}", marks=marks
    )
    for backend, marks, gates in [
        ("sqlite", (), GATES),
        ("postgresql", (pytest.mark.postgres,), GATES[1:2]),
    ]
    for kind in ("purchase", "load")
    for call, before, text in gates
]
IN_FLIGHT = [
    pytest.param(
        "sqlite",
        kind,
        "finish",
        True,
        f"{ms} ms after {{finish}} was sent (in flight)",
        ms,
        id=f"sqlite-{kind}-finish-in-flight-{ms}ms",
    )
    for kind in ("purchase", "load")
    for ms in (0, 25)
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Live]]:
    """One settlement server per backend for the module; every scenario kills it once."""
    with contextlib.ExitStack() as stack:

        class Lazy(dict[str, Live]):
            def __missing__(self, backend: str) -> Live:
                directory = tmp_path_factory.mktemp(f"settlement-{backend}")
                # Kept in this dict, so every later scenario on the backend reuses it.
                self[backend] = stack.enter_context(live_settlement(backend, directory))
                return self[backend]

        yield Lazy()


@pytest.fixture
def live(request: pytest.FixtureRequest, servers: dict[str, Live]) -> Live:
    return servers[str(request.param)]


@pytest.mark.parametrize(
    ("live", "kind", "call", "before", "text", "delay_ms"),
    [pytest.param(*case.values, None, id=case.id, marks=case.marks) for case in CASES] + IN_FLIGHT,
    indirect=["live"],
)
async def test_settlement_is_killed_between_its_steps_and_restarted(
    tmp_path: Path,
    proof: Proof,
    live: Live,
    kind: str,
    call: str,
    before: bool,
    text: str,
    delay_ms: int | None,
) -> None:
    """``delay_ms``: kill that long after the request left, while settlement may be
    verifying, posting or committing it (either outcome must come out right)."""
    step = "DEBIT" if kind == "purchase" else "CREDIT"
    finish = "capture" if kind == "purchase" else "complete"
    done = "paid" if kind == "purchase" else "loaded"
    where = text.format(step=step, finish=finish)
    backend = live.server.url.split(":", 1)[0].split("+", 1)[0]
    kills = live.server.kills
    with proof.row(
        SUITE,
        f"{kind} ({backend}): settlement SIGKILLed {where}, then restarted",
        expected=f"{done} exactly once after the restart; invariants hold",
    ) as row:
        card = live.funded_card(FUNDS) if kind == "purchase" else live.issue()
        reader = ShopperReader(card)
        if call in ("uncertain", "resolve"):
            reader.inject(
                Fault.after(INS_DEBIT_FOR_PURCHASE if kind == "purchase" else INS_CREDIT_FOR_LOAD)
            )

        async def kill() -> None:
            if delay_ms is None:
                live.server.kill()
            else:  # the request goes out now; the kill lands while it is being handled
                asyncio.get_running_loop().call_later(delay_ms / 1000, live.server.kill)

        gate = Gate(call, before, action=kill)
        async with httpx.AsyncClient(base_url=live.server.base_url, timeout=15) as http:
            client = SettlementClient(http, live.merchant_key)
            shop = Shop(tmp_path, GatedSettlement(client, gate), reader)
            amount = PRICE if kind == "purchase" else TOPUP_AMOUNT
            order = shop.orders.create(
                session_id="s" * 20,
                kind=PURCHASE if kind == "purchase" else TOPUP,
                amount=amount,
                funding=None if kind == "purchase" else "merchant_float",  # a till top-up
            )
            if call == "create":
                # The checkout's create is answered, then the server dies.
                order = await shop.cashier.open_settlement(order, "proof")
                live.server.kill()
                gate.reached.set()
            shop.cashier.start(order.id)
            # The flow runs (the shopper presenting the card when asked) until the gate
            # kills the server; then it stops, failed or finished.
            await run_until_gate(shop, reader, order.id, gate)
            answered = shop.orders.get(order.id)
            answered_before_kill = answered is not None and answered.is_final
            await wait_until_dead(live)
            live.server.start()  # the operator (or systemd) starts it again
            shop.cashier.start(order.id)  # the shopper reloads the payment page
            final, reloads = await shop_until_final(shop, reader, order.id)
            pairs = shop.order_pairs()
            await shop.stop()
        report = check_invariants(live.factory, live.server.url, [card], orders=pairs)
        assert live.server.kills == kills + 1
        assert final.status == done
        assert card.state.balance == (FUNDS - PRICE if kind == "purchase" else TOPUP_AMOUNT)
        answer = ""
        if delay_ms is not None:
            answer = "answered before the kill, " if answered_before_kill else "no answer, "
        row.observed = (
            f"{final.status} after SIGKILL and restart ({answer}{reloads} reload(s)); "
            f"{report.summary()}"
        )


async def wait_until_dead(live: Live) -> None:
    """Bounded wait for a scheduled SIGKILL to have landed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while live.server.process is not None and live.server.process.poll() is None:
        assert loop.time() < deadline, "the server was never killed"
        await asyncio.sleep(0.01)


async def run_until_gate(shop: Shop, reader: ShopperReader, order_id: str, gate: Gate) -> None:
    """Present the card whenever asked until the gate fired; then wait for the flow to stop."""
    task = shop.cashier.task(order_id)
    assert task is not None
    reached: asyncio.Future[object] = asyncio.ensure_future(gate.reached.wait())
    for _ in range(5):
        if gate.reached.is_set():
            break
        wanted: asyncio.Future[object] = asyncio.ensure_future(reader.card_wanted.wait())
        await asyncio.wait({reached, wanted}, timeout=DEADLINE, return_when="FIRST_COMPLETED")
        wanted.cancel()
        if reader.card_wanted.is_set() and not gate.reached.is_set():
            reader.insert()
    reached.cancel()
    assert gate.reached.is_set(), "the flow never reached the kill point"
    await asyncio.wait_for(asyncio.shield(task), DEADLINE)


@pytest.mark.parametrize(
    "live", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
def test_after_every_kill_the_ledger_check_process_passes(live: Live, proof: Proof) -> None:
    backend = live.server.url.split(":", 1)[0].split("+", 1)[0]
    with proof.row(
        SUITE,
        f"({backend}) after all SIGKILLs above: `webpurse ledger check` as its own process",
        expected="exit 0: every balance agrees with the entries, value conserved",
    ) as row:
        report = check_invariants(live.factory, live.server.url, cli_subprocess=True)
        row.observed = (
            f"exit 0 after {live.server.kills} kills / {live.server.starts} starts; "
            f"{report.summary()}"
        )
