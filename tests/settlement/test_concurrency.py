"""Concurrent merchants (PostgreSQL, and SQLite): no lost update, one authorisation per card.

Through a real uvicorn process, with threads as concurrent merchant requests (the template
is cosmicpython's "two threads update one aggregate and exactly one must fail").
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.settlement.support import LiveServer, Terminal, database_url, live_server
from webpurse.settlement import ledger
from webpurse.settlement.models import Card, Merchant

CARDS = 5
PURCHASES = 20


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveServer]:
    """PostgreSQL is the point (row locks); SQLite shows the embedded default serialises."""
    with database_url(request.param, tmp_path) as url, live_server(url, tmp_path) as live:
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
