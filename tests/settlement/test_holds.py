"""Card holds (holds.py): the bound on an open transaction, healing a card one ahead.

The attack scenarios (a forged uncertain payment, a released real debit, the operator
queue) are in tests/proof/test_attacks_stuck.py; here the pure decision, the setting, and
a stale *load*: it frees the card but keeps its funds until a verified TAC settles it.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import select

from tests.settlement.support import World, ok, prove
from webpurse.card import CardApplet
from webpurse.protocol.commands import InitializeForPurchaseResponse
from webpurse.protocol.records import TransactionType
from webpurse.settlement import ledger
from webpurse.settlement.decisions import DeclineCode, decide_gap
from webpurse.settlement.models import Card, Load
from webpurse.settlement.settings import Settings


def test_only_a_provable_counter_one_ahead_asks_for_the_cards_proof() -> None:
    asked = decide_gap(5, 4, "payment", provable=True)
    assert asked is not None and asked.decline_code is DeclineCode.RECOVERY_REQUIRED
    assert asked.observation is None  # the card asked for its proof: nothing to record
    assert asked.recover is not None and asked.recover.to_json() == {
        "transaction_type": f"{TransactionType.EP_PURCHASE:02X}",
        "counter": 4,
        "heal": True,
    }
    load = decide_gap(3, 2, "load", provable=True)
    assert load is not None and load.recover is not None
    assert load.recover.transaction_type is TransactionType.EP_LOAD
    assert decide_gap(5, 4, "payment", provable=False) is None  # no MAC issued: no proof
    assert decide_gap(6, 4, "payment", provable=True) is None  # two ahead: not one proof
    assert decide_gap(4, 4, "payment", provable=True) is None


def test_the_bound_is_a_setting() -> None:
    assert Settings.from_env({}).card_hold_ttl == dt.timedelta(hours=1)
    assert Settings.from_env({"WEBPURSE_CARD_HOLD_TTL": "90"}).card_hold_ttl == dt.timedelta(
        seconds=90
    )


def test_a_stale_uncertain_load_frees_the_card_and_a_later_load_releases_it(world: World) -> None:
    card = world.issue()
    world.other_terminal.load(card, 200)
    stuck = world.terminal.create_load(100)
    issuer, init = world.terminal.load_batch1(card, 100, world.terminal_id)
    answer = world.terminal.post(
        f"/v1/loads/{stuck['id']}/authorise",
        {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": world.terminal_id,
        },
    )
    assert answer.status_code == 200  # MAC2 out; the CREDIT never reaches the card
    assert world.terminal.post(f"/v1/loads/{stuck['id']}/uncertain").status_code == 200
    blocked = world.other_terminal.create_payment(50)
    issuer_b, init_b = world.other_terminal.purchase_batch1(card, 50)
    refused = world.other_terminal.authorise_payment(blocked["id"], issuer_b, init_b)
    assert refused.json()["decline_code"] == "recovery_required"
    world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(seconds=1))
    assert (
        world.client.post(
            "/v1/maintenance/sweep", headers=world.auth(world.operator_key)
        ).status_code
        == 200
    )
    with world.factory() as session:
        load = session.get(Load, stuck["id"])
        assert load is not None and load.status == "uncertain"  # its funds stay held
        assert ledger.balance(session, ledger.HELD_LOADS) == 100
    world.other_terminal.purchase(card, 50)  # the card is free
    world.other_terminal.load(card, 30)  # at the stuck load's online counter: releases it
    with world.factory() as session:
        load = session.get(Load, stuck["id"])
        assert load is not None and load.status == "canceled"
        assert ledger.balance(session, ledger.HELD_LOADS) == 0
        assert ledger.balance(session, ledger.topups_account(world.merchant_id)) == 0
        assert ledger.check(session).ok
    assert card.state.balance == 180


def test_a_batch_cannot_hold_a_card_again_at_a_counter_released_at_the_bound(
    world: World,
) -> None:
    card = world.issue()
    world.other_terminal.load(card, 500)
    issuer, real = world.terminal.purchase_batch1(card, 1)
    forged = InitializeForPurchaseResponse.from_data(real)
    forged = InitializeForPurchaseResponse(
        forged.balance, forged.offline_counter, 0, forged.key_version, 0, b"\xa5" * 4
    )
    first = world.terminal.create_payment(500)
    held = world.terminal.authorise_payment(first["id"], issuer, forged.to_data())
    assert held.status_code == 200
    world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(minutes=3))
    world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    second = world.terminal.create_payment(500)
    answer = world.client.post(
        "/v1/batch",
        json={
            "requests": [
                {
                    "path": f"/v1/payments/{second['id']}/authorise",
                    "body": {
                        "issuer_data": issuer.hex(),
                        "initialize_response": forged.to_data().hex(),
                        "terminal_id": world.terminal_id,
                    },
                }
            ]
        },
        headers=world.auth(world.merchant_key),
    )
    (only,) = answer.json()["responses"]
    assert (only["status"], only["body"]["code"]) == (409, "card_hold_exhausted")
    world.other_terminal.purchase(card, 100)  # the other shop is not affected


def test_a_freed_load_whose_credit_ran_heals_from_its_proof_at_a_purchase(world: World) -> None:
    """Shop A's load credited the card but A never completed it; freed at the bound, the
    card shows more than the shadow. Shop B's purchase is asked for the load's proof (not
    called a clone); the proof settles A's load, then B's purchase goes through."""
    card = world.issue()
    world.other_terminal.load(card, 200)
    stuck = world.terminal.create_load(100)
    issuer, init = world.terminal.load_batch1(card, 100, world.terminal_id)
    answer = world.terminal.post(
        f"/v1/loads/{stuck['id']}/authorise",
        {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": world.terminal_id,
        },
    )
    ok(card, bytes.fromhex(answer.json()["authorisation"]["credit_apdu"]))  # the CREDIT ran
    assert world.terminal.post(f"/v1/loads/{stuck['id']}/uncertain").status_code == 200
    world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(seconds=1))
    world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    payment = world.other_terminal.create_payment(50)
    issuer_b, init_b = world.other_terminal.purchase_batch1(card, 50)
    asked = world.other_terminal.authorise_payment(payment["id"], issuer_b, init_b)
    assert asked.status_code == 402, asked.text
    recover = asked.json()["recover"]
    assert recover == {"transaction_type": "02", "counter": 1, "heal": True}
    proof, sw = prove(card, 0x02, recover["counter"] + 1)
    assert sw == 0x9000
    healed = world.other_terminal.post(
        "/v1/heal",
        {"issuer_data": issuer_b.hex(), "transaction_type": "02", "prove_response": proof.hex()},
    )
    assert healed.status_code == 200, healed.text
    assert (healed.json()["online_counter"], healed.json()["offline_counter"]) == (2, 0)
    issuer_b, init_b = world.other_terminal.purchase_batch1(card, 50)
    retry = world.other_terminal.authorise_payment(payment["id"], issuer_b, init_b)
    assert retry.status_code == 200, retry.text
    with world.factory() as session:
        load = session.get(Load, stuck["id"])
        assert load is not None and load.status == "succeeded"  # settled for A, who sold it
        found = session.scalars(select(Card).where(Card.card_number == issuer_b_number(card)))
        assert not found.one().flagged
        assert ledger.check(session).ok


def issuer_b_number(card: CardApplet) -> str:
    return card.state.issuer.card_number
