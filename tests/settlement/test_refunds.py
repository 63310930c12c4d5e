"""Refunds: what the ledger refuses is named precisely, changes nothing, is replayed; a
refund whose delivery fails ends ``failed``, its money back in the payable, never stuck."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from tests.settlement.support import World
from webpurse.card import CardApplet
from webpurse.settlement import ledger
from webpurse.settlement.models import Account, Load, Payment, Refund


def _paid(world: World, amount: int) -> dict[str, Any]:
    card = world.funded_card(1_000)
    return world.terminal.purchase(card, amount)


def _refund(world: World, payment_id: str, amount: int, key: str) -> tuple[int, dict[str, Any]]:
    answer = world.client.post(
        "/v1/refunds",
        json={"payment": payment_id, "amount": amount},
        headers={**world.auth(world.merchant_key), "idempotency-key": key},
    )
    body: dict[str, Any] = answer.json()
    if answer.headers.get("idempotent-replayed") == "true":
        body["replayed"] = True
    return answer.status_code, body


def _nothing_refunded(world: World, payment_id: str) -> None:
    with world.factory() as session:
        assert session.query(Refund).count() == 0
        payment = session.get(Payment, payment_id)
        assert payment is not None and payment.refunded_amount == 0
        assert ledger.balance(session, ledger.REFUNDS_PENDING) == 0
        assert ledger.check(session).ok


def test_a_refund_the_payable_cannot_cover_is_insufficient_merchant_balance(world: World) -> None:
    paid = _paid(world, 500)
    payable = ledger.merchant_account(world.merchant_id)
    with world.factory() as session, session.begin():  # paid out, as clearing would
        ledger.post_transfer(
            session,
            "payout_test",
            payable,
            ledger.payout_account(world.merchant_id),
            450,
            "payout",
            now=world.clock(),
        )
    status, problem = _refund(world, paid["id"], 100, "refund-1")
    assert status == 409
    assert problem["code"] == "insufficient_merchant_balance"
    assert "50 fen" in problem["detail"]
    _nothing_refunded(world, paid["id"])
    assert _refund(world, paid["id"], 100, "refund-1") == (409, {**problem, "replayed": True})
    status, refund = _refund(world, paid["id"], 50, "refund-2")
    assert status == 201 and refund["amount"] == 50


def test_another_ledger_refusal_is_not_called_an_insufficient_balance(world: World) -> None:
    paid = _paid(world, 500)
    payable = ledger.merchant_account(world.merchant_id)

    def set_currency(currency: str) -> None:
        with world.factory() as session, session.begin():
            session.execute(update(Account).where(Account.id == payable).values(currency=currency))

    set_currency("USD")  # a damaged row: the payable covers the amount, in another currency
    status, problem = _refund(world, paid["id"], 100, "refund-1")
    assert status == 409
    assert problem["code"] == "ledger_refused"
    assert "currency" in problem["detail"]
    set_currency("CNY")
    _nothing_refunded(world, paid["id"])
    # The refusal is stored under its key; a new key runs against the unchanged state.
    assert _refund(world, paid["id"], 100, "refund-1") == (409, {**problem, "replayed": True})
    status, refund = _refund(world, paid["id"], 500, "refund-2")
    assert status == 201 and refund["amount"] == 500


# --- a refund whose load ends without a credit fails (issue 19, finding 1) -------------


def _refunded(
    world: World, amount: int, refund: int
) -> tuple[CardApplet, dict[str, Any], dict[str, Any]]:
    """A card that paid ``amount`` (funded by the other shop) and a refund of ``refund``."""
    card = world.issue()
    world.other_terminal.load(card, 1_000)
    paid = world.terminal.purchase(card, amount)
    status, body = _refund(world, paid["id"], refund, f"r-{paid['id']}")
    assert status == 201, body
    return card, paid, body


def _state(world: World, paid: dict[str, Any], refund: dict[str, Any]) -> tuple[str, int, int, int]:
    with world.factory() as session:
        stored = session.get(Refund, refund["id"])
        payment = session.get(Payment, paid["id"])
        assert stored is not None and payment is not None
        assert ledger.check(session).ok, ledger.check(session).problems
        return (
            stored.status,
            payment.refunded_amount,
            ledger.balance(session, ledger.merchant_account(world.merchant_id)),
            ledger.balance(session, ledger.REFUNDS_PENDING),
        )


def _deliver_with_wrong_amount(world: World, card: CardApplet, load_id: str) -> Any:
    """One delivery attempt whose INITIALIZE FOR LOAD names another amount: MAC1 fails."""
    issuer, init = world.terminal.load_batch1(card, 1, world.terminal_id)
    return world.client.post(
        f"/v1/loads/{load_id}/authorise",
        json={
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": world.terminal_id,
        },
        headers=world.auth(world.merchant_key),
    )


def test_a_declined_refund_delivery_fails_the_refund_and_returns_the_money(world: World) -> None:
    card, paid, refund = _refunded(world, 300, 120)
    assert _state(world, paid, refund) == ("pending", 120, 180, 0)
    answer = _deliver_with_wrong_amount(world, card, refund["load"])
    assert answer.status_code == 402 and answer.json()["decline_code"] == "mac_invalid"
    assert _state(world, paid, refund) == ("failed", 0, 300, 0)
    shown = world.client.get(f"/v1/refunds/{refund['id']}", headers=world.auth(world.merchant_key))
    assert shown.json()["status"] == "failed"
    status, again = _refund(world, paid["id"], 300, "r-again")  # the whole amount is refundable
    assert status == 201 and again["status"] == "pending"
    world.terminal.run_load(
        card, {"id": again["load"], "amount": 300, "terminal_id": world.terminal_id}
    )
    assert _state(world, paid, again) == ("succeeded", 300, 0, 0)


def test_a_canceled_refund_load_fails_the_refund(world: World) -> None:
    _, paid, refund = _refunded(world, 300, 300)
    answer = world.client.post(
        f"/v1/loads/{refund['load']}/cancel", json={}, headers=world.auth(world.merchant_key)
    )
    assert answer.status_code == 200 and answer.json()["status"] == "canceled"
    assert _state(world, paid, refund) == ("failed", 0, 300, 0)


def test_the_ledger_check_finds_a_stuck_refund_and_the_sweep_fails_it(world: World) -> None:
    """A refund left pending with a canceled load (as versions before this fix did)."""
    card, paid, refund = _refunded(world, 300, 100)
    with world.factory() as session, session.begin():  # the old _return_funds, by hand
        ledger.post_transfer(
            session,
            f"{refund['load']}:return",
            ledger.HELD_LOADS,
            ledger.REFUNDS_PENDING,
            100,
            "load_return",
            now=world.clock(),
            reference=refund["load"],
        )
        session.execute(update(Load).where(Load.id == refund["load"]).values(status="canceled"))
    with world.factory() as session:
        problems = ledger.check(session).problems
    assert any("stuck" in p and refund["id"] in p for p in problems), problems
    with world.factory() as session, session.begin():  # refunds:pending ≠ the open refunds
        session.execute(update(Refund).where(Refund.id == refund["id"]).values(status="succeeded"))
        problems = ledger.check(session).problems
        assert any("refunds:pending holds 100 fen" in p for p in problems), problems
        session.rollback()
    swept = world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    assert swept.status_code == 200, swept.text
    assert _state(world, paid, refund) == ("failed", 0, 300, 0)
    del card
