"""Payments through the HTTP API against the real card emulator (SQLite and PostgreSQL)."""

from __future__ import annotations

from tests.settlement.support import World
from webpurse.settlement import ledger
from webpurse.settlement.models import Card


def test_full_purchase_debits_the_card_and_credits_the_merchant(world: World) -> None:
    card = world.funded_card(5_000)
    paid = world.terminal.purchase(card, 1_250)
    assert paid["status"] == "succeeded"
    assert paid["tac"] and len(paid["tac"]) == 8
    assert card.state.balance == 3_750
    with world.factory() as session:
        row = session.query(Card).filter_by(card_number=card.state.issuer.card_number).one()
        assert row.shadow_balance == 3_750
        assert row.offline_counter == 1 and row.open_transaction is None
        assert ledger.balance(session, ledger.card_account(row.id)) == 3_750
        assert ledger.balance(session, ledger.merchant_account(world.merchant_id)) == 1_250
        assert ledger.check(session).ok
