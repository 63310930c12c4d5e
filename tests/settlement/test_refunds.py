"""Refund refusals: what the ledger refuses is named precisely, changes nothing, is replayed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from tests.settlement.support import World
from webpurse.settlement import ledger
from webpurse.settlement.models import Account, Payment, Refund


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
