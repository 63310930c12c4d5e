"""Concurrent merchants (PostgreSQL, and SQLite): no lost update, one authorisation per card.

Through a real uvicorn process, with threads as concurrent merchant requests (the template
is cosmicpython's "two threads update one aggregate and exactly one must fail"); the lock
order tests call the service functions in two threads, each on its own connection, with the
interleaving forced by events at the point each request locks the card or releases a row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.settlement.support import (
    LiveServer,
    Terminal,
    World,
    database_url,
    live_server,
    make_world,
    ok,
)
from webpurse.settlement import ledger, loads, payments, registry
from webpurse.settlement.auth import MERCHANT, Principal
from webpurse.settlement.errors import SettlementError as Refusal
from webpurse.settlement.lifecycle import proof as lifecycle_proof
from webpurse.settlement.models import Card, Load, Merchant, Payment
from webpurse.settlement.schemas import LoadComplete, PurchaseCapture, Resolve
from webpurse.settlement.service import Ctx

CARDS = 5
PURCHASES = 20


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveServer]:
    """PostgreSQL is the point (row locks); SQLite shows the embedded default serialises."""
    with (
        database_url(request.param, tmp_path, migrated=True) as url,
        live_server(url, tmp_path) as live,
    ):
        yield live


def _terminal(server: LiveServer, http: httpx.Client) -> Terminal:
    return Terminal(http, server.merchant_key, server.terminal_id)


def test_twenty_concurrent_captures_over_five_cards_lose_no_update(server: LiveServer) -> None:
    limits = httpx.Limits(max_connections=PURCHASES)
    with httpx.Client(base_url=server.base_url, timeout=60, limits=limits) as http:
        terminal = _terminal(server, http)
        cards = [server.issue() for _ in range(CARDS)]
        for card in cards:
            terminal.load(card, 10_000)
        locks = [threading.Lock() for _ in cards]  # a card is in one reader at a time
        amounts = [101 + i for i in range(PURCHASES)]
        start = threading.Barrier(PURCHASES)

        def purchase(i: int) -> dict[str, Any]:
            start.wait(timeout=30)
            with locks[i % CARDS]:
                return terminal.purchase(cards[i % CARDS], amounts[i])

        with ThreadPoolExecutor(PURCHASES) as pool:
            results = list(pool.map(purchase, range(PURCHASES)))
    assert all(r["status"] == "succeeded" for r in results)
    with server.factory() as session:
        merchant = session.query(Merchant).one()
        assert ledger.balance(session, ledger.merchant_account(merchant.id)) == sum(amounts)
        for i, card in enumerate(cards):
            row = session.query(Card).filter_by(card_number=card.state.issuer.card_number).one()
            spent = sum(amounts[j] for j in range(i, PURCHASES, CARDS))
            assert card.state.balance == row.shadow_balance == 10_000 - spent
            assert ledger.balance(session, ledger.card_account(row.id)) == card.state.balance
            assert row.offline_counter == PURCHASES // CARDS
        report = ledger.check(session)
        assert report.ok, report.problems


def test_two_concurrent_authorisations_for_one_card_cannot_both_succeed(
    server: LiveServer,
) -> None:
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        terminal = _terminal(server, http)
        card = server.issue()
        terminal.load(card, 5_000)
        for _round in range(5):
            first, second = terminal.create_payment(100), terminal.create_payment(100)
            issuer, init = terminal.purchase_batch1(card, 100)
            gate = threading.Barrier(2)

            def authorise(payment: dict[str, Any]) -> httpx.Response:
                gate.wait(timeout=30)
                return terminal.authorise_payment(payment["id"], issuer, init)

            with ThreadPoolExecutor(2) as pool:
                answers = list(pool.map(authorise, [first, second]))
            codes = sorted(a.status_code for a in answers)
            assert codes == [200, 402], [a.text for a in answers]
            loser = next(a for a in answers if a.status_code == 402).json()
            assert loser["decline_code"] == "recovery_required"
            winner = next(a for a in answers if a.status_code == 200).json()
            # settle the winner (its DEBIT never went out) so the next round starts clean
            terminal.post(f"/v1/payments/{winner['id']}/uncertain")
            _, fresh = terminal.purchase_batch1(card, 0)
            resolved = terminal.post(
                f"/v1/payments/{winner['id']}/resolve", {"initialize_response": fresh.hex()}
            )
            assert resolved.json()["status"] == "canceled"
    with server.factory() as session:
        assert ledger.check(session).ok


# --- lock order: a card row before its payments (PostgreSQL row locks) -----------------


@pytest.fixture
def pg_world(tmp_path: Path) -> Iterator[World]:
    with database_url("postgresql", tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def _principal(world: World, terminal_id: str) -> Principal:
    with world.factory() as session:
        merchant = session.query(Merchant).filter_by(terminal_id=terminal_id).one()
        return Principal(role=MERCHANT, key_id="test", merchant_id=merchant.id)


Call = Callable[[Ctx], str]


def _race(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    resolve: tuple[str, Call],
    capture: tuple[str, Call],
) -> dict[str, Any]:
    """Shop A resolves its uncertain transaction while shop B captures (completes) the one
    that superseded it at the same counter, whose verified answer releases A's. Forced
    interleaving, no sleeps: A's request goes as far as it goes before it locks the card,
    then waits until B's, holding the card, is about to release A's transaction. Were A
    then holding its own row (row before card) and B the card (card before A's row),
    PostgreSQL would find the cycle and abort one; with the card locked first they queue.
    Returns each side's outcome: the status it ended with, or the exception it raised.
    """
    a_before_card = threading.Event()
    b_releasing = threading.Event()
    real_lock_card_id = registry.lock_card_id
    real_release = lifecycle_proof.release  # the step that releases a disproved row

    def lock_card_id(session: Any, card_id: str) -> Any:
        if threading.current_thread().name == "shop-a":
            a_before_card.set()
            assert b_releasing.wait(timeout=30), "shop B never reached the release"
        return real_lock_card_id(session, card_id)

    def release(ctx: Any, strategy: Any, row: Any, card_row: Any, reason: str) -> None:
        if threading.current_thread().name == "shop-b":
            b_releasing.set()
        real_release(ctx, strategy, row, card_row, reason)

    monkeypatch.setattr(registry, "lock_card_id", lock_card_id)
    monkeypatch.setattr(lifecycle_proof, "release", release)
    outcomes: dict[str, Any] = {}

    def run(side: str, terminal_id: str, call: Call, after: threading.Event | None) -> None:
        if after is not None:
            assert after.wait(timeout=30), "shop A never got to its card lock"
        try:
            with world.factory() as session, session.begin():
                principal = _principal(world, terminal_id)
                outcomes[side] = call(Ctx(session, world.security, world.clock(), principal))
        except Exception as exc:  # the outcome is what the test is about
            outcomes[side] = exc

    threads = [
        threading.Thread(target=run, args=("a", *resolve, None), name="shop-a"),
        threading.Thread(target=run, args=("b", *capture, a_before_card), name="shop-b"),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    deadlocks = [o for o in outcomes.values() if "deadlock detected" in str(o)]
    assert not deadlocks, deadlocks
    return outcomes


@pytest.mark.postgres
def test_resolving_an_uncertain_payment_while_its_successor_is_captured_does_not_deadlock(
    pg_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pg_world
    card = world.funded_card(1_000)
    shop_a, shop_b = world.terminal, world.other_terminal
    stale = shop_a.create_payment(300)
    issuer, init = shop_a.purchase_batch1(card, 300)
    assert shop_a.authorise_payment(stale["id"], issuer, init).status_code == 200
    assert shop_a.post(f"/v1/payments/{stale['id']}/uncertain").status_code == 200  # no DEBIT
    _, unchanged = shop_a.purchase_batch1(card, 0)  # what shop A will resolve with
    theirs = shop_b.create_payment(200)
    issuer, init = shop_b.purchase_batch1(card, 200)
    authorised = shop_b.authorise_payment(theirs["id"], issuer, init)
    assert authorised.status_code == 200, authorised.text  # linked: it supersedes A's
    debit = ok(card, bytes.fromhex(authorised.json()["authorisation"]["debit_apdu"]))
    resolve_body = Resolve(initialize_response=unchanged.hex())
    capture_body = PurchaseCapture(debit_response=debit.hex())

    outcomes = _race(
        world,
        monkeypatch,
        (world.terminal_id, lambda ctx: payments.resolve(ctx, stale["id"], resolve_body).status),
        (
            world.other_terminal_id,
            lambda ctx: payments.capture(ctx, theirs["id"], capture_body).status,
        ),
    )
    assert outcomes["b"] == "succeeded", outcomes
    # A's resolve queued behind B's capture, which had released its payment already.
    assert isinstance(outcomes["a"], Refusal) and outcomes["a"].code == "invalid_payment_state"
    with world.factory() as session:
        assert session.get(Payment, stale["id"]).status == "canceled"  # type: ignore[union-attr]
        assert ledger.balance(session, ledger.HELD_PURCHASES) == 0
        assert ledger.check(session).ok
    assert card.state.balance == 800


@pytest.mark.postgres
def test_resolving_an_uncertain_load_while_its_successor_completes_does_not_deadlock(
    pg_world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pg_world
    card = world.issue()
    shop_a, shop_b = world.terminal, world.other_terminal
    stale = shop_a.create_load(1_500)
    issuer, init = shop_a.load_batch1(card, 1_500, stale["terminal_id"])
    authorise = {"issuer_data": issuer.hex(), "terminal_id": stale["terminal_id"]}
    answer = shop_a.post(
        f"/v1/loads/{stale['id']}/authorise", {**authorise, "initialize_response": init.hex()}
    )
    assert answer.status_code == 200, answer.text
    assert shop_a.post(f"/v1/loads/{stale['id']}/uncertain").status_code == 200  # no CREDIT
    _, unchanged = shop_a.load_batch1(card, 0, stale["terminal_id"])
    theirs = shop_b.create_load(500)
    issuer, init = shop_b.load_batch1(card, 500, theirs["terminal_id"])
    authorised = shop_b.post(
        f"/v1/loads/{theirs['id']}/authorise",
        {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": theirs["terminal_id"],
        },
    )
    assert authorised.status_code == 200, authorised.text  # linked: it supersedes A's
    credit = ok(card, bytes.fromhex(authorised.json()["authorisation"]["credit_apdu"]))
    resolve_body = Resolve(initialize_response=unchanged.hex())
    complete_body = LoadComplete(credit_response=credit.hex())

    outcomes = _race(
        world,
        monkeypatch,
        (world.terminal_id, lambda ctx: loads.resolve(ctx, stale["id"], resolve_body).status),
        (
            world.other_terminal_id,
            lambda ctx: loads.complete(ctx, theirs["id"], complete_body).status,
        ),
    )
    assert outcomes["b"] == "succeeded", outcomes
    assert isinstance(outcomes["a"], Refusal) and outcomes["a"].code == "invalid_load_state"
    with world.factory() as session:
        assert session.get(Load, stale["id"]).status == "canceled"  # type: ignore[union-attr]
        assert ledger.balance(session, ledger.HELD_LOADS) == 0
        assert ledger.check(session).ok
    assert card.state.balance == 500
