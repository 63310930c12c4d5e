"""Payments through the HTTP API against the real card emulator (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from tests.settlement.support import Terminal, World, deterministic_random, ok, prove, read_issuer
from webpurse.card import CardApplet, MemoryStore
from webpurse.protocol.commands import (
    InitializeForPurchase,
    InitializeForPurchaseResponse,
)
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


# --- declines: every reason, each with the state it leaves -------------------------


def _decline(world: World, card: CardApplet, price: int, **tweak: Any) -> dict[str, Any]:
    """Authorise a payment with the card's answers (optionally doctored); expect a 402."""
    terminal: Terminal = tweak.pop("terminal", world.terminal)
    init_amount = tweak.pop("init_amount", price)
    payment = terminal.create_payment(price)
    issuer, init = terminal.purchase_batch1(card, init_amount)
    fields = tweak.pop("init_fields", None)
    if fields:
        init = replace(InitializeForPurchaseResponse.from_data(init), **fields).to_data()
    answer = terminal.authorise_payment(payment["id"], issuer, init, **tweak)
    assert answer.status_code == 402, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    body = answer.json()
    assert body["code"] == "card_declined" and body["request_id"]
    return dict(body)


def _card_row(world: World, card: CardApplet) -> Card:
    with world.factory() as session:
        return session.query(Card).filter_by(card_number=card.state.issuer.card_number).one()


def _payment(world: World, payment_id: str) -> dict[str, Any]:
    answer = world.client.get(f"/v1/payments/{payment_id}", headers=world.auth(world.merchant_key))
    assert answer.status_code == 200
    return dict(answer.json())


def test_decline_unknown_card(world: World) -> None:
    state = world.security.personalise(bytes(9) + b"\x77", start=world.clock().date())
    stranger = CardApplet(state, MemoryStore(state), deterministic_random(99))
    body = _decline(world, stranger, 100, init_amount=0)
    assert body["decline_code"] == "unknown_card"
    assert body["payment"]["status"] == "declined"


@pytest.mark.parametrize(("status", "code"), [("blocked", "card_blocked"), ("lost", "card_lost")])
def test_decline_blocked_and_lost_cards(world: World, status: str, code: str) -> None:
    card = world.funded_card(1_000)
    number = card.state.issuer.card_number
    changed = world.client.post(
        f"/v1/cards/{number}/status",
        json={"status": status, "reason": "test"},
        headers=world.auth(world.operator_key),
    )
    assert changed.status_code == 200, changed.text
    body = _decline(world, card, 100)
    assert body["decline_code"] == code
    listed = world.client.get("/v1/blacklist", headers=world.auth(world.operator_key)).json()
    assert number in [c["card_number"] for c in listed["data"]]


def test_decline_expired_card(world: World) -> None:
    card = world.funded_card(1_000)
    world.clock.advance(dt.timedelta(days=366 * 6))
    assert _decline(world, card, 100)["decline_code"] == "card_expired"


def test_decline_insufficient_funds(world: World) -> None:
    card = world.funded_card(300)
    body = _decline(world, card, 500, init_amount=300)
    assert body["decline_code"] == "insufficient_funds"
    assert _payment(world, body["payment"]["id"])["status"] == "declined"


def _observations(world: World, card: CardApplet) -> list[str]:
    answer = world.client.get(
        f"/v1/card_observations?card_number={card.state.issuer.card_number}",
        headers=world.auth(world.operator_key),
    )
    assert answer.status_code == 200, answer.text
    return [o["kind"] for o in answer.json()["data"]]


def test_decline_counter_ahead_is_observed_and_the_card_untouched(world: World) -> None:
    card = world.funded_card(1_000)
    body = _decline(world, card, 100, init_fields={"offline_counter": 1})
    assert body["decline_code"] == "counter_mismatch"
    assert "1" not in body["detail"] and "0" not in body["detail"]  # no shadow counter
    row = _card_row(world, card)
    assert not row.flagged and row.status == "active"
    assert _observations(world, card) == ["counter_ahead"]
    # The genuine card's next purchase is not affected.
    assert world.terminal.purchase(card, 100)["status"] == "succeeded"


def test_an_unauthenticated_counter_going_back_declines_and_blocks_nothing(
    world: World,
) -> None:
    card = world.funded_card(1_000)
    world.terminal.purchase(card, 100)  # shadow offline counter is now 1
    body = _decline(world, card, 100, init_fields={"offline_counter": 0, "balance": 900})
    assert body["decline_code"] == "counter_mismatch"
    row = _card_row(world, card)
    assert not row.flagged and row.status == "active"
    assert _observations(world, card) == ["counter_behind"]
    # The check it offers, answered by the genuine card, finds nothing wrong.
    assert world.terminal.card_check(card, body)["verdict"] == "consistent"
    assert _card_row(world, card).status == "active"
    assert world.terminal.purchase(card, 100)["status"] == "succeeded"


def test_a_balance_above_the_shadow_in_initialize_blocks_nothing(world: World) -> None:
    card = world.funded_card(1_000)
    body = _decline(world, card, 100, init_fields={"balance": 50_000})
    assert body["decline_code"] == "balance_mismatch"
    assert "1000" not in body["detail"] and "above" not in body["detail"]
    assert _card_row(world, card).status == "active"
    events = world.client.get(
        f"/v1/cards/{card.state.issuer.card_number}/events",
        headers=world.auth(world.operator_key),
    ).json()["data"]
    assert "suspected_clone" not in [e["kind"] for e in events]
    assert _observations(world, card) == ["balance_above"]
    assert world.terminal.purchase(card, 100)["status"] == "succeeded"


def test_a_card_check_is_used_once_and_only_by_its_merchant(world: World) -> None:
    card = world.funded_card(1_000)
    body = _decline(world, card, 100, init_fields={"balance": 50_000})
    check = body["card_check"]
    answer = ok(card, bytes.fromhex(check["initialize_apdu"])).hex()
    path = f"/v1/card_checks/{check['id']}"
    other = world.other_terminal.post(path, {"initialize_response": answer})
    assert other.status_code == 404
    assert world.terminal.post(path, {"initialize_response": answer}).json()["verdict"] == (
        "consistent"
    )
    again = world.terminal.post(path, {"initialize_response": answer})
    assert again.status_code == 409 and again.json()["code"] == "card_check_used"


def test_an_expired_card_check_is_refused(world: World) -> None:
    card = world.funded_card(1_000)
    body = _decline(world, card, 100, init_fields={"balance": 50_000})
    check = body["card_check"]
    answer = ok(card, bytes.fromhex(check["initialize_apdu"])).hex()
    world.clock.advance(dt.timedelta(minutes=6))
    late = world.terminal.post(f"/v1/card_checks/{check['id']}", {"initialize_response": answer})
    assert late.status_code == 409 and late.json()["code"] == "card_check_expired"


def test_an_operator_reactivates_a_blocked_card_with_a_reason_audited(world: World) -> None:
    card = world.funded_card(1_000)
    number = card.state.issuer.card_number
    operator = world.auth(world.operator_key)
    blocked = world.client.post(
        f"/v1/cards/{number}/status", json={"status": "blocked"}, headers=operator
    )
    assert blocked.status_code == 200
    no_reason = world.client.post(
        f"/v1/cards/{number}/status", json={"status": "active"}, headers=operator
    )
    assert no_reason.status_code == 422 and no_reason.json()["code"] == "reason_required"
    back = world.client.post(
        f"/v1/cards/{number}/status",
        json={"status": "active", "reason": "owner verified; clone report was a mistake"},
        headers=operator,
    )
    assert back.status_code == 200 and back.json()["status"] == "active"
    assert not back.json()["flagged"]
    events = world.client.get(f"/v1/cards/{number}/events", headers=operator).json()["data"]
    last = events[-1]
    assert last["kind"] == "status" and last["detail"]["to"] == "active"
    assert last["detail"]["by"] and last["detail"]["reason"].startswith("owner verified")
    assert last["created_at"]
    assert world.terminal.purchase(card, 100)["status"] == "succeeded"


def test_decline_invalid_state_for_an_unknown_key_version(world: World) -> None:
    card = world.funded_card(1_000)
    body = _decline(world, card, 100, init_fields={"key_version": 9})
    assert body["decline_code"] == "invalid_state"


def test_decline_amount_mismatch(world: World) -> None:
    card = world.funded_card(1_000)
    body = _decline(world, card, 100, init_amount=90, amount=90)
    assert body["decline_code"] == "amount_mismatch"


def test_decline_terminal_mismatch(world: World) -> None:
    card = world.funded_card(1_000)
    other = Terminal(world.client, world.merchant_key, world.other_terminal_id)
    assert _decline(world, card, 100, terminal=other)["decline_code"] == "terminal_mismatch"


def test_recovery_required_while_another_payment_is_open(world: World) -> None:
    card = world.funded_card(1_000)
    first = world.terminal.create_payment(100)
    issuer, init = world.terminal.purchase_batch1(card, 100)
    assert world.terminal.authorise_payment(first["id"], issuer, init).status_code == 200
    body = _decline(world, card, 200)
    assert body["decline_code"] == "recovery_required"
    assert body["recover"] == {"payment_id": first["id"], "transaction_type": "06", "counter": 0}
    # the refused payment can still be paid once the first one is settled
    assert _payment(world, body["payment"]["id"])["status"] == "requires_card"
    # another merchant learns that recovery is needed, but not the other merchant's id
    foreign = _decline(world, card, 50, terminal=world.other_terminal)
    assert foreign["decline_code"] == "recovery_required"
    assert "payment_id" not in foreign["recover"]


# --- capture, uncertain, resolve, cancel, expiry ---------------------------------


def _authorised(world: World, card: CardApplet, amount: int) -> tuple[dict[str, Any], bytes]:
    payment = world.terminal.create_payment(amount)
    issuer, init = world.terminal.purchase_batch1(card, amount)
    answer = world.terminal.authorise_payment(payment["id"], issuer, init)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["status"] == "authorised"
    assert body["authorisation"]["debit_apdu"].startswith("805401000F")
    return dict(body), bytes.fromhex(body["authorisation"]["debit_apdu"])


def test_capture_with_a_bad_tac_is_refused_and_changes_nothing(world: World) -> None:
    card = world.funded_card(1_000)
    payment, debit = _authorised(world, card, 400)
    answer = ok(card, debit)
    forged = answer[:3] + bytes([answer[3] ^ 1]) + answer[4:]
    refused = world.terminal.post(
        f"/v1/payments/{payment['id']}/capture", {"debit_response": forged.hex()}
    )
    assert refused.status_code == 402 and refused.json()["code"] == "verification_failed"
    assert _payment(world, payment["id"])["status"] == "authorised"
    captured = world.terminal.post(
        f"/v1/payments/{payment['id']}/capture", {"debit_response": answer.hex()}
    )
    assert captured.json()["status"] == "succeeded"


def test_uncertain_debit_that_happened_is_captured_from_the_cards_proof(world: World) -> None:
    card = world.funded_card(1_000)
    payment, debit = _authorised(world, card, 300)
    ok(card, debit)  # the DEBIT reached the card; its answer was lost
    assert world.terminal.post(f"/v1/payments/{payment['id']}/uncertain").json()["status"] == (
        "uncertain"
    )
    read_issuer(card)
    init = ok(card, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())
    missing = world.terminal.post(
        f"/v1/payments/{payment['id']}/resolve", {"initialize_response": init.hex()}
    )
    assert missing.status_code == 409 and missing.json()["code"] == "proof_required"
    proof, sw = prove(card, 0x06, 1)
    assert sw == 0x9000
    resolved = world.terminal.post(
        f"/v1/payments/{payment['id']}/resolve",
        {"initialize_response": init.hex(), "prove_response": proof.hex()},
    )
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["status"] == "succeeded"
    assert _card_row(world, card).shadow_balance == card.state.balance == 700


def test_uncertain_debit_that_never_reached_the_card_is_released(world: World) -> None:
    card = world.funded_card(1_000)
    payment, _ = _authorised(world, card, 300)  # the DEBIT never left the merchant
    world.terminal.post(f"/v1/payments/{payment['id']}/uncertain")
    read_issuer(card)
    init = ok(card, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())
    resolved = world.terminal.post(
        f"/v1/payments/{payment['id']}/resolve", {"initialize_response": init.hex()}
    )
    assert resolved.json()["status"] == "canceled"
    with world.factory() as session:
        row = session.query(Card).filter_by(card_number=card.state.issuer.card_number).one()
        assert ledger.balance(session, ledger.card_account(row.id)) == 1_000
        assert ledger.balance(session, ledger.HELD_PURCHASES) == 0
    # the card is free again
    assert world.terminal.purchase(card, 100)["status"] == "succeeded"


def test_next_contact_releases_an_uncertain_payment_the_counter_disproves(world: World) -> None:
    card = world.funded_card(1_000)
    stale, _ = _authorised(world, card, 300)
    world.terminal.post(f"/v1/payments/{stale['id']}/uncertain")
    paid = world.terminal.purchase(card, 200)
    assert paid["status"] == "succeeded"
    assert _payment(world, stale["id"])["status"] == "canceled"
    assert card.state.balance == 800


def test_an_uncertain_payment_stays_until_a_verified_capture_at_its_counter(
    world: World,
) -> None:
    card = world.funded_card(1_000)
    stale, _ = _authorised(world, card, 300)  # the DEBIT never reached the card
    world.terminal.post(f"/v1/payments/{stale['id']}/uncertain")
    # Another merchant's payment proceeds at the same counter, linked; the stale one stays
    # uncertain (the card's INITIALIZE is no evidence), holding its 300.
    theirs = world.other_terminal.create_payment(200)
    issuer, init = world.other_terminal.purchase_batch1(card, 200)
    answer = world.other_terminal.authorise_payment(theirs["id"], issuer, init)
    assert answer.status_code == 200, answer.text
    assert _payment(world, stale["id"])["status"] == "uncertain"
    with world.factory() as session:
        assert ledger.balance(session, ledger.HELD_PURCHASES) == 500
    # Its DEBIT is refused by the shopper: resolved canceled, the stale one is the card's
    # open transaction again, still uncertain.
    fresh = ok(card, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())
    released = world.other_terminal.post(
        f"/v1/payments/{theirs['id']}/resolve", {"initialize_response": fresh.hex()}
    )
    assert released.json()["status"] == "canceled"
    assert _payment(world, stale["id"])["status"] == "uncertain"
    with world.factory() as session:
        row = session.query(Card).filter_by(card_number=card.state.issuer.card_number).one()
        assert row.open_transaction == stale["id"]
    # A purchase the card completes at that counter proves the stale one never ran.
    paid = world.other_terminal.purchase(card, 200)
    assert paid["status"] == "succeeded"
    assert _payment(world, stale["id"])["status"] == "canceled"
    assert card.state.balance == 800
    with world.factory() as session:
        row = session.query(Card).filter_by(card_number=card.state.issuer.card_number).one()
        assert (row.shadow_balance, row.open_transaction) == (800, None)
        assert ledger.balance(session, ledger.card_account(row.id)) == 800
        assert ledger.balance(session, ledger.HELD_PURCHASES) == 0
        assert ledger.check(session).ok


def test_a_purchase_the_uncertain_hold_leaves_no_room_for_must_recover_it_first(
    world: World,
) -> None:
    card = world.funded_card(1_000)
    stale, _ = _authorised(world, card, 300)
    world.terminal.post(f"/v1/payments/{stale['id']}/uncertain")
    big = world.terminal.create_payment(900)
    issuer, init = world.terminal.purchase_batch1(card, 900)
    answer = world.terminal.authorise_payment(big["id"], issuer, init)
    assert answer.status_code == 402 and answer.json()["decline_code"] == "recovery_required"
    assert answer.json()["recover"]["payment_id"] == stale["id"]
    assert _payment(world, big["id"])["status"] == "requires_card"


def test_a_cancel_relaying_the_cards_9303_is_observed_and_changes_nothing_on_the_card(
    world: World,
) -> None:
    card = world.funded_card(1_000)
    issuer = read_issuer(card)
    number = card.state.issuer.card_number
    refused = world.terminal.create_payment(100)
    bad = world.terminal.post(
        f"/v1/payments/{refused['id']}/cancel",
        {"issuer_data": "00" * 3, "card_status_word": "9303"},
    )
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_issuer_data"
    assert _payment(world, refused["id"])["status"] == "requires_card"
    other_sw = world.terminal.post(
        f"/v1/payments/{refused['id']}/cancel",
        {"issuer_data": issuer.hex(), "card_status_word": "9401"},
    )
    assert other_sw.json()["status"] == "canceled"
    operator = world.auth(world.operator_key)
    assert not world.client.get(f"/v1/cards/{number}", headers=operator).json()["flagged"]
    locked = world.terminal.create_payment(100)
    answer = world.terminal.post(
        f"/v1/payments/{locked['id']}/cancel",
        {"issuer_data": issuer.hex(), "card_status_word": "9303"},
    )
    assert answer.json()["status"] == "canceled"
    got = world.client.get(f"/v1/cards/{number}", headers=operator).json()
    assert not got["flagged"] and got["status"] == "active" and got["shadow_balance"] == 1_000
    kinds = [
        e["kind"]
        for e in world.client.get(f"/v1/cards/{number}/events", headers=operator).json()["data"]
    ]
    assert "card_locked" not in kinds
    assert _observations(world, card) == ["card_locked_claim"]
    assert world.terminal.purchase(card, 100)["status"] == "succeeded"


def test_cancel_only_before_a_debit_could_be_sent(world: World) -> None:
    card = world.funded_card(1_000)
    fresh = world.terminal.create_payment(100)
    canceled = world.terminal.post(f"/v1/payments/{fresh['id']}/cancel")
    assert canceled.json()["status"] == "canceled"
    payment, _ = _authorised(world, card, 100)
    refused = world.terminal.post(f"/v1/payments/{payment['id']}/cancel")
    assert refused.status_code == 409 and refused.json()["code"] == "invalid_payment_state"


def test_sweep_expires_waiting_payments_and_makes_stale_authorisations_uncertain(
    world: World,
) -> None:
    card = world.funded_card(1_000)
    waiting = world.terminal.create_payment(100)
    payment, _ = _authorised(world, card, 100)
    world.clock.advance(dt.timedelta(minutes=31))
    swept = world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    assert swept.json()["payments_expired"] >= 1 and swept.json()["payments_uncertain"] == 1
    assert _payment(world, waiting["id"])["status"] == "expired"
    assert _payment(world, payment["id"])["status"] == "uncertain"


def test_other_merchants_payments_are_not_found(world: World) -> None:
    payment = world.terminal.create_payment(100)
    answer = world.client.get(f"/v1/payments/{payment['id']}", headers=world.auth(world.other_key))
    assert answer.status_code == 404 and answer.json()["code"] == "resource_missing"
    listed = world.client.get("/v1/payments", headers=world.auth(world.other_key)).json()
    assert listed["data"] == []


def test_bad_input_is_a_clear_problem_and_changes_nothing(world: World) -> None:
    floats = world.terminal.post("/v1/payments", {"amount": 12.5})
    assert floats.status_code == 422 and floats.json()["param"] == "amount"
    payment = world.terminal.create_payment(100)
    short = world.terminal.authorise_payment(payment["id"], b"\x00" * 30, b"\x00" * 3)
    assert short.status_code == 400
    assert short.json()["code"] in ("invalid_issuer_data", "invalid_initialize_response")
    assert _payment(world, payment["id"])["status"] == "requires_card"


def test_list_pages_newest_first(world: World) -> None:
    ids = []
    for _ in range(3):
        ids.append(world.terminal.create_payment(100)["id"])
        world.clock.advance(dt.timedelta(seconds=1))
    auth = world.auth(world.merchant_key)
    first = world.client.get("/v1/payments?limit=2", headers=auth).json()
    assert [p["id"] for p in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = world.client.get(f"/v1/payments?limit=2&starting_after={ids[1]}", headers=auth).json()
    assert [p["id"] for p in rest["data"]] == [ids[0]] and not rest["has_more"]


def test_state_changes_merchants_care_about_become_events(world: World) -> None:
    card = world.funded_card(1_000)
    paid = world.terminal.purchase(card, 100)
    declined = _decline(world, card, 5_000, init_amount=0)
    refund = world.terminal.post("/v1/refunds", {"payment": paid["id"], "amount": 40}).json()
    listed = world.client.get("/v1/events?limit=100", headers=world.auth(world.merchant_key))
    assert listed.status_code == 200, listed.text
    seen = {(e["type"], e["data"]["object"]["id"]) for e in listed.json()["data"]}
    assert ("payment.succeeded", paid["id"]) in seen
    assert ("payment.failed", declined["payment"]["id"]) in seen
    assert ("refund.created", refund["id"]) in seen
    assert ("load.succeeded", refund["load"]) not in seen  # the refund is not delivered yet


def test_a_payment_the_sweep_made_uncertain_is_still_captured_by_the_cards_answer(
    world: World,
) -> None:
    card = world.funded_card(1_000)
    payment, debit = _authorised(world, card, 300)
    world.clock.advance(dt.timedelta(minutes=3))  # the shopper took their time
    world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    assert _payment(world, payment["id"])["status"] == "uncertain"
    answer = ok(card, debit)
    captured = world.terminal.post(
        f"/v1/payments/{payment['id']}/capture", {"debit_response": answer.hex()}
    )
    assert captured.status_code == 200 and captured.json()["status"] == "succeeded"
