"""Loads and refunds through the HTTP API against the real card emulator."""

from __future__ import annotations

from typing import Any

from tests.settlement.support import SEED_FLOAT, World, ok, prove, read_issuer
from webpurse.card import CardApplet
from webpurse.protocol.commands import InitializeForLoad
from webpurse.settlement import ledger
from webpurse.settlement.models import Card


def _balances(world: World, card: CardApplet) -> dict[str, int]:
    with world.factory() as session:
        row = session.query(Card).filter_by(card_number=card.state.issuer.card_number).one()
        assert ledger.check(session).ok
        return {
            "card": ledger.balance(session, ledger.card_account(row.id)),
            "shadow": row.shadow_balance,
            # what the merchant's loads hold or loaded of its prepaid float
            "drawn": SEED_FLOAT - ledger.balance(session, ledger.float_account(world.merchant_id)),
            "held": ledger.balance(session, ledger.HELD_LOADS),
            "merchant": ledger.balance(session, ledger.merchant_account(world.merchant_id)),
        }


def test_full_load_puts_the_value_on_the_card_and_in_its_account(world: World) -> None:
    card = world.issue()
    load = world.terminal.create_load(2_000, card.state.issuer.card_number)
    assert load["status"] == "requires_card" and load["terminal_id"] == world.terminal_id
    assert _balances(world, card)["held"] == 2_000  # funds held while in flight
    done = world.terminal.run_load(card, load)
    assert done["status"] == "succeeded" and len(done["tac"]) == 8
    assert card.state.balance == 2_000
    assert _balances(world, card) == {
        "card": 2_000,
        "shadow": 2_000,
        "drawn": 2_000,
        "held": 0,
        "merchant": 0,
    }


def _authorise(world: World, card: CardApplet, load: dict[str, Any], amount: int) -> Any:
    issuer, init = world.terminal.load_batch1(card, amount, load["terminal_id"])
    return world.terminal.post(
        f"/v1/loads/{load['id']}/authorise",
        {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": load["terminal_id"],
        },
    )


def test_a_card_mac1_for_another_amount_is_declined_and_funds_return(world: World) -> None:
    card = world.issue()
    load = world.terminal.create_load(2_000)
    answer = _authorise(world, card, load, 9_000)
    assert answer.status_code == 402 and answer.json()["decline_code"] == "mac_invalid"
    assert answer.json()["load"]["status"] == "declined"
    assert _balances(world, card)["held"] == 0
    assert _balances(world, card)["drawn"] == 0


def test_a_load_bound_to_another_card_is_declined(world: World) -> None:
    card, other = world.issue(), world.issue()
    load = world.terminal.create_load(500, other.state.issuer.card_number)
    answer = _authorise(world, card, load, 500)
    assert answer.status_code == 402 and answer.json()["decline_code"] == "invalid_state"


def test_uncertain_credit_that_happened_completes_from_the_proof(world: World) -> None:
    card = world.issue()
    load = world.terminal.create_load(1_500)
    authorised = _authorise(world, card, load, 1_500).json()
    ok(card, bytes.fromhex(authorised["authorisation"]["credit_apdu"]))  # answer lost
    assert world.terminal.post(f"/v1/loads/{load['id']}/uncertain").json()["status"] == "uncertain"
    read_issuer(card)
    init = ok(card, InitializeForLoad(1, 0, bytes.fromhex(load["terminal_id"])).to_apdu())
    proof, sw = prove(card, 0x02, 1)
    assert sw == 0x9000
    resolved = world.terminal.post(
        f"/v1/loads/{load['id']}/resolve",
        {"initialize_response": init.hex(), "prove_response": proof.hex()},
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["status"] == "succeeded"
    assert _balances(world, card)["card"] == card.state.balance == 1_500


def _initialize(world: World, card: CardApplet, amount: int = 0) -> bytes:
    read_issuer(card)
    return ok(card, InitializeForLoad(1, amount, bytes.fromhex(world.terminal_id)).to_apdu())


def test_uncertain_credit_that_never_happened_returns_the_funds(world: World) -> None:
    card = world.issue()
    load = world.terminal.create_load(1_500)
    assert _authorise(world, card, load, 1_500).status_code == 200
    world.terminal.post(f"/v1/loads/{load['id']}/uncertain")
    init = _initialize(world, card)
    # "The counter did not move" is not proof for a load (it may be a replayed answer):
    # the load stays uncertain, its funds held, and the answer says what would settle it.
    resolved = world.terminal.post(
        f"/v1/loads/{load['id']}/resolve", {"initialize_response": init.hex()}
    )
    assert resolved.status_code == 409, resolved.text
    assert resolved.json()["code"] == "proof_required"
    assert resolved.json()["recover"] == {
        "load_id": load["id"],
        "transaction_type": "02",
        "counter": 0,
    }
    assert _load(world, load["id"])["status"] == "uncertain"
    assert _balances(world, card)["held"] == 1_500
    # The next load of the card at that counter settles it: its verified TAC proves the
    # counter was never used by the uncertain one, whose funds then go back.
    again = world.terminal.create_load(1_500)
    assert world.terminal.run_load(card, again)["status"] == "succeeded"
    assert _load(world, load["id"])["status"] == "canceled"
    balances = _balances(world, card)
    assert balances["held"] == 0 and balances["drawn"] == 1_500
    assert balances["card"] == balances["shadow"] == card.state.balance == 1_500


def test_a_replayed_counter_unchanged_answer_cannot_cancel_a_load_that_ran(
    world: World,
) -> None:
    """The merchant reads INITIALIZE FOR LOAD (amount 0; MAC1 and all) before its CREDIT,
    hides the CREDIT's TAC and resolves with that older answer: "the counter did not move".
    Cancelling would return the funds to the merchant while the card keeps the value."""
    card = world.issue()
    load = world.terminal.create_load(1_500)
    recorded = _initialize(world, card)  # counter 0, balance 0, a random of its own
    authorised = _authorise(world, card, load, 1_500).json()
    ok(card, bytes.fromhex(authorised["authorisation"]["credit_apdu"]))  # TAC hidden
    world.terminal.post(f"/v1/loads/{load['id']}/uncertain")
    before = _balances(world, card)
    resolved = world.terminal.post(
        f"/v1/loads/{load['id']}/resolve", {"initialize_response": recorded.hex()}
    )
    assert resolved.status_code == 409 and resolved.json()["code"] == "proof_required"
    assert _load(world, load["id"])["status"] == "uncertain"
    assert _balances(world, card) == before  # funds still held, nothing returned
    assert before["held"] == 1_500 and before["drawn"] == 1_500
    # The card's own proof still settles it: the value it holds is accounted for.
    init = _initialize(world, card)
    proof, sw = prove(card, 0x02, 1)
    assert sw == 0x9000
    settled = world.terminal.post(
        f"/v1/loads/{load['id']}/resolve",
        {"initialize_response": init.hex(), "prove_response": proof.hex()},
    )
    assert settled.status_code == 200 and settled.json()["status"] == "succeeded"
    assert _balances(world, card)["card"] == card.state.balance == 1_500


def test_an_uncertain_load_stays_until_a_verified_credit_at_its_online_counter(
    world: World,
) -> None:
    card = world.issue()
    stale = world.terminal.create_load(1_500)
    assert _authorise(world, card, stale, 1_500).status_code == 200  # CREDIT never sent
    world.terminal.post(f"/v1/loads/{stale['id']}/uncertain")
    # Another merchant's load proceeds at the same online counter, linked: the stale one
    # stays uncertain (its funds held) until this one's TAC verifies at that counter.
    theirs = world.other_terminal.create_load(500)
    linked = _authorise_with(world.other_terminal, card, theirs, 500)
    assert linked.status_code == 200, linked.text
    assert _load(world, stale["id"])["status"] == "uncertain"
    assert _balances(world, card)["held"] == 2_000
    credit = ok(card, bytes.fromhex(linked.json()["authorisation"]["credit_apdu"]))
    done = world.other_terminal.post(
        f"/v1/loads/{theirs['id']}/complete", {"credit_response": credit.hex()}
    )
    assert done.json()["status"] == "succeeded"
    assert _load(world, stale["id"])["status"] == "canceled"
    balances = _balances(world, card)
    assert balances["held"] == 0 and balances["drawn"] == 0  # the stale one's funds back
    assert balances["card"] == balances["shadow"] == card.state.balance == 500


def _authorise_with(terminal: Any, card: CardApplet, load: dict[str, Any], amount: int) -> Any:
    issuer, init = terminal.load_batch1(card, amount, load["terminal_id"])
    return terminal.post(
        f"/v1/loads/{load['id']}/authorise",
        {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": load["terminal_id"],
        },
    )


def _load(world: World, load_id: str) -> dict[str, Any]:
    answer = world.client.get(f"/v1/loads/{load_id}", headers=world.auth(world.merchant_key))
    return dict(answer.json())


def test_refund_is_a_pending_credit_delivered_as_a_load(world: World) -> None:
    card = world.funded_card(1_000)
    paid = world.terminal.purchase(card, 600)
    refund = world.terminal.post("/v1/refunds", {"payment": paid["id"], "amount": 250})
    assert refund.status_code == 201, refund.text
    assert refund.json()["status"] == "pending"
    too_much = world.terminal.post("/v1/refunds", {"payment": paid["id"], "amount": 351})
    assert too_much.status_code == 422 and too_much.json()["code"] == "amount_too_large"
    pending = world.client.get(
        f"/v1/loads?card_number={card.state.issuer.card_number}&status=requires_card",
        headers=world.auth(world.merchant_key),
    ).json()["data"]
    assert [x["id"] for x in pending] == [refund.json()["load"]]
    world.terminal.run_load(card, pending[0])
    assert card.state.balance == 650
    got = world.client.get(
        f"/v1/refunds/{refund.json()['id']}", headers=world.auth(world.merchant_key)
    )
    assert got.json()["status"] == "succeeded"
    balances = _balances(world, card)
    assert balances["merchant"] == 350 and balances["card"] == balances["shadow"] == 650


def test_operator_can_run_a_paid_load_on_the_operator_terminal(world: World) -> None:
    from tests.settlement.support import Terminal, pay_by_statement

    operator = Terminal(world.client, world.operator_key, "000000000000")
    card = world.issue()
    float_load = operator.post(
        "/v1/loads", {"amount": 700, "funding": {"method": "merchant_float"}}
    )
    assert float_load.status_code == 403  # an operator has no float to draw
    load = operator.create_load(700, card.state.issuer.card_number, method="bank_transfer")
    assert load["terminal_id"] == "000000000000" and load["status"] == "requires_funding"
    pay_by_statement(world, [(load["funding"]["reference"], 700)])
    assert operator.run_load(card, load)["status"] == "succeeded"
    # The operator's load is funded by the cardholder's transfer, not charged to a merchant.
    with world.factory() as session:
        assert ledger.balance(session, ledger.RECEIVED_BANK_TRANSFERS) == -700
        assert ledger.balance(session, ledger.float_account(world.merchant_id)) == SEED_FLOAT
    # merchants do not see operator loads
    hidden = world.client.get(f"/v1/loads/{load['id']}", headers=world.auth(world.merchant_key))
    assert hidden.status_code == 404


def test_an_abandoned_load_order_expires_and_its_funds_return(world: World) -> None:
    import datetime as dt

    card = world.issue()
    load = world.terminal.create_load(900)
    assert _balances(world, card)["held"] == 900
    world.clock.advance(dt.timedelta(minutes=31))
    swept = world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    assert swept.json()["loads_expired"] == 1
    got = world.client.get(f"/v1/loads/{load['id']}", headers=world.auth(world.merchant_key))
    assert got.json()["status"] == "expired"
    assert _balances(world, card)["held"] == 0 and _balances(world, card)["drawn"] == 0


def test_a_paid_bank_transfer_load_released_unloaded_goes_back_to_its_payer(
    world: World,
) -> None:
    """A bank-transfer top-up whose CREDIT never ran, settled by another load at its counter:
    the cardholder's money is listed to be returned to them, never to the shop's float."""
    from tests.settlement.support import pay_by_statement

    card = world.issue()
    number = card.state.issuer.card_number
    stale = world.terminal.create_load(1_500, number, method="bank_transfer")
    pay_by_statement(world, [(stale["funding"]["reference"], 1_500)])
    assert _authorise(world, card, stale, 1_500).status_code == 200  # CREDIT never sent
    world.terminal.post(f"/v1/loads/{stale['id']}/uncertain")
    theirs = world.other_terminal.create_load(500)
    linked = _authorise_with(world.other_terminal, card, theirs, 500)
    credit = ok(card, bytes.fromhex(linked.json()["authorisation"]["credit_apdu"]))
    world.other_terminal.post(
        f"/v1/loads/{theirs['id']}/complete", {"credit_response": credit.hex()}
    )
    assert _load(world, stale["id"])["status"] == "canceled"
    with world.factory() as session:
        assert ledger.balance(session, ledger.RETURNS_AWAITING) == 1_500
        assert ledger.balance(session, ledger.float_account(world.merchant_id)) == SEED_FLOAT
    (listed,) = world.client.get(
        "/v1/operator/statement-exceptions", headers=world.auth(world.operator_key)
    ).json()["data"]
    assert (listed["kind"], listed["load"]) == ("load_canceled", stale["id"])
    assert _balances(world, card)["held"] == 0
