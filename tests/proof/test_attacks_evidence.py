"""Attacks on a card's status: nobody freezes someone else's card (docs/settlement-api.md,
"Evidence").

A card is blocked only on evidence only the card could give, fresh for this contact: a
card check's MAC1 over a terminal id settlement chose at random. Every unauthenticated
answer — a forged EF 0x15 naming the victim's card number, an INITIALIZE FOR PURCHASE
balance, a relayed 9303, a MAC1 that does not verify — and every replayed authenticated
one declines the transaction at hand and nothing else: the victim's card stays ``active``
and its next purchase succeeds. A real clone (a copied image with the real keys, both
used) is still blocked (also ``test_attacks_card.py``). Settlement app in-process
(SQLite) here; the forged EF 0x15 through a real agent against real servers is in
``test_attacks_evidence_live.py``. Rows go to the ``attacks_evidence`` proof table.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.proof.conftest import Proof
from tests.settlement.support import (
    World,
    database_url,
    deterministic_random,
    make_world,
    ok,
    read_issuer,
)
from webpurse.card import CardApplet, ImageFile
from webpurse.protocol.commands import InitializeForPurchase, InitializeForPurchaseResponse
from webpurse.protocol.records import IssuerData
from webpurse.settlement.models import Card

SUITE = "attacks_evidence"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with database_url("sqlite", tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def card_row(world: World, card: CardApplet) -> Card:
    with world.factory() as session:
        return session.query(Card).filter_by(card_number=card.state.issuer.card_number).one()


def observations(world: World, card: CardApplet) -> list[str]:
    answer = world.client.get(
        f"/v1/card_observations?card_number={card.state.issuer.card_number}",
        headers=world.auth(world.operator_key),
    )
    assert answer.status_code == 200, answer.text
    return [o["kind"] for o in reversed(answer.json()["data"])]


def untouched(world: World, victim: CardApplet, balance: int) -> None:
    """The victim's card as the genuine history left it: active, unflagged, same shadow."""
    row = card_row(world, victim)
    assert (row.status, row.flagged, row.shadow_balance) == ("active", False, balance)
    assert row.shadow_balance == victim.state.balance
    assert row.offline_counter == victim.state.offline_counter


def forged_ef15(attacker: CardApplet, victim_number: str) -> bytes:
    """The attacker's own EF 0x15 with the victim's card number (printed on the card)."""
    mine = IssuerData.from_bytes(read_issuer(attacker))
    return replace(mine, serial=bytes.fromhex(victim_number)).to_bytes()


def test_forged_ef15_with_a_huge_balance_through_the_api_freezes_nothing(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "hostile merchant (API): authorise with the victim's card number in a forged EF 0x15"
        " and INITIALIZE balance FFFFFFFF; answer the card check it is offered with made-up"
        " MAC1",
        expected="402 balance_mismatch for that payment only; observation for the operator;"
        " check verdict unverified; victim active, next purchase succeeds",
    ) as row:
        victim, attacker = world.funded_card(10_000), world.funded_card(1_000)
        number = victim.state.issuer.card_number
        payment = world.terminal.create_payment(350)
        _, init = world.terminal.purchase_batch1(attacker, 350)
        huge = replace(InitializeForPurchaseResponse.from_data(init), balance=0xFFFFFFFF)
        answer = world.terminal.authorise_payment(
            payment["id"], forged_ef15(attacker, number), huge.to_data()
        )
        assert answer.status_code == 402, answer.text
        body: dict[str, Any] = answer.json()
        assert body["decline_code"] == "balance_mismatch"
        assert "10000" not in body["detail"]
        untouched(world, victim, 10_000)
        # The attacker answers the check with its own card (other keys for this number).
        fake = ok(attacker, bytes.fromhex(body["card_check"]["initialize_apdu"]))
        verdict = world.terminal.post(
            f"/v1/card_checks/{body['card_check']['id']}", {"initialize_response": fake.hex()}
        ).json()["verdict"]
        assert verdict == "unverified"
        untouched(world, victim, 10_000)
        assert observations(world, victim) == ["balance_above", "check_unverified"]
        assert world.other_terminal.purchase(victim, 350)["status"] == "succeeded"
        row.observed = (
            "402 balance_mismatch; check unverified; victim active, unflagged; next purchase"
            " at another shop succeeded"
        )


def test_forged_ef15_through_the_batch_path_freezes_nothing(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "hostile merchant (POST /v1/batch): forged EF 0x15 with the victim's number, balance"
        " FFFFFFFF, counter 0",
        expected="that item 402 (counter or balance mismatch); victim active; next purchase"
        " succeeds",
    ) as row:
        victim, attacker = world.funded_card(5_000), world.funded_card(1_000)
        world.terminal.purchase(victim, 100)  # the victim's offline counter is 1 now
        payment = world.terminal.create_payment(350)
        _, init = world.terminal.purchase_batch1(attacker, 350)
        forged = replace(
            InitializeForPurchaseResponse.from_data(init), balance=0xFFFFFFFF, offline_counter=0
        )
        answer = world.client.post(
            "/v1/batch",
            json={
                "requests": [
                    {
                        "path": f"/v1/payments/{payment['id']}/authorise",
                        "body": {
                            "issuer_data": forged_ef15(
                                attacker, victim.state.issuer.card_number
                            ).hex(),
                            "initialize_response": forged.to_data().hex(),
                            "terminal_id": world.terminal_id,
                        },
                    }
                ]
            },
            headers=world.auth(world.merchant_key),
        )
        assert answer.status_code == 200, answer.text
        item = answer.json()["responses"][0]
        assert item["status"] == 402 and item["body"]["decline_code"] == "counter_mismatch"
        untouched(world, victim, 4_900)
        assert observations(world, victim) == ["counter_behind"]
        assert world.other_terminal.purchase(victim, 350)["status"] == "succeeded"
        row.observed = "item 402 counter_mismatch; victim active; next purchase succeeded"


def test_a_merchant_claiming_9303_on_cancel_changes_nothing(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "hostile merchant: cancel its own payment and a load naming the victim's card with"
        ' status word 9303 ("the card locked itself")',
        expected="its own objects canceled; an observation each; victim active, unflagged;"
        " next purchase succeeds",
    ) as row:
        victim, attacker = world.funded_card(1_000), world.funded_card(100)
        ef15 = forged_ef15(attacker, victim.state.issuer.card_number).hex()
        payment = world.terminal.create_payment(100)
        load = world.terminal.create_load(100)
        for path in (f"/v1/payments/{payment['id']}/cancel", f"/v1/loads/{load['id']}/cancel"):
            answer = world.terminal.post(path, {"issuer_data": ef15, "card_status_word": "9303"})
            assert answer.status_code == 200, answer.text
        untouched(world, victim, 1_000)
        assert observations(world, victim) == ["card_locked_claim", "card_locked_claim"]
        assert world.other_terminal.purchase(victim, 100)["status"] == "succeeded"
        row.observed = "both canceled; 2 observations; victim active; next purchase succeeded"


def test_replayed_authenticated_answers_after_the_victim_spent_freeze_nothing(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "replay: a hostile shop records the victim card's authenticated answers at its till"
        " (INITIALIZE FOR LOAD with MAC1; a card check's answer, held back unposted; DEBIT's"
        " MAC2‖TAC) and sends them after the victim spent elsewhere",
        expected="load 402 balance_mismatch, card untouched; replayed check answer"
        " unverified; held-back check answer judged against its issue-time shadow:"
        " consistent; MAC2‖TAC 402 verification_failed; victim active, next purchase succeeds",
    ) as row:
        victim = world.funded_card(5_000)
        hostile, honest = world.terminal, world.other_terminal
        # At the hostile shop's till: a real purchase (its DEBIT answer recorded), a
        # recorded INITIALIZE FOR LOAD (MAC1 verifies: it is the card's), and a card check
        # the shop provoked with a doctored authorise, relayed to the card and kept.
        bought = hostile.create_payment(100)
        issuer, init = hostile.purchase_batch1(victim, 100)
        auth = hostile.authorise_payment(bought["id"], issuer, init).json()
        debit_answer = ok(victim, bytes.fromhex(auth["authorisation"]["debit_apdu"]))
        assert (
            hostile.post(
                f"/v1/payments/{bought['id']}/capture", {"debit_response": debit_answer.hex()}
            ).json()["status"]
            == "succeeded"
        )
        load_issuer, load_init = hostile.load_batch1(victim, 1_000, world.terminal_id)
        provoke = hostile.create_payment(100)
        _, init = hostile.purchase_batch1(victim, 100)
        doctored = replace(InitializeForPurchaseResponse.from_data(init), balance=1)
        held_check = hostile.authorise_payment(provoke["id"], issuer, doctored.to_data()).json()[
            "card_check"
        ]
        held_answer = ok(victim, bytes.fromhex(held_check["initialize_apdu"]))
        # The victim spends 2000 at another shop.
        assert honest.purchase(victim, 2_000)["status"] == "succeeded"
        assert victim.state.balance == 2_900
        # Replay 1: the recorded load answer (balance 4900 > shadow 2900, MAC1 valid).
        load = hostile.create_load(1_000)
        replayed = hostile.post(
            f"/v1/loads/{load['id']}/authorise",
            {
                "issuer_data": load_issuer.hex(),
                "initialize_response": load_init.hex(),
                "terminal_id": load["terminal_id"],
            },
        )
        assert replayed.status_code == 402 and replayed.json()["decline_code"] == (
            "balance_mismatch"
        )
        untouched(world, victim, 2_900)
        # Replay 2: the recorded check answer to the new check the decline offered.
        new_check = replayed.json()["card_check"]
        verdict = hostile.post(
            f"/v1/card_checks/{new_check['id']}", {"initialize_response": held_answer.hex()}
        ).json()["verdict"]
        assert verdict == "unverified"  # its MAC1 covers another terminal id
        # Replay 3: the held-back answer to its own check, after the victim spent.
        verdict = hostile.post(
            f"/v1/card_checks/{held_check['id']}", {"initialize_response": held_answer.hex()}
        ).json()["verdict"]
        assert verdict == "consistent"  # judged against the shadow when it was issued
        # Replay 4: the recorded DEBIT answer to capture a new payment.
        again = hostile.create_payment(100)
        _, init = hostile.purchase_batch1(victim, 100)
        hostile.authorise_payment(again["id"], issuer, init)
        captured = hostile.post(
            f"/v1/payments/{again['id']}/capture", {"debit_response": debit_answer.hex()}
        )
        assert captured.status_code == 402 and captured.json()["code"] == "verification_failed"
        assert card_row(world, victim).status == "active"
        assert not card_row(world, victim).flagged
        # The victim's next purchase: the hostile shop's authorised payment holds the card
        # until its own proof settles it (spec §6); the victim's card answers, it is released.
        fresh = ok(victim, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())
        assert (
            hostile.post(
                f"/v1/payments/{again['id']}/resolve", {"initialize_response": fresh.hex()}
            ).json()["status"]
            == "canceled"
        )
        assert honest.purchase(victim, 100)["status"] == "succeeded"
        row.observed = (
            "load 402 balance_mismatch; replayed check unverified; held-back check consistent;"
            " capture 402 verification_failed; victim active; next purchase succeeded"
        )


def test_a_real_clone_is_still_blocked_by_its_own_fresh_mac1(
    world: World, proof: Proof, tmp_path: Path
) -> None:
    with proof.row(
        SUITE,
        "real clone: the genuine card image copied (real keys); copy A pays, copy B pays",
        expected="copy B 402 counter_mismatch; its card check's MAC1 verifies over the fresh"
        " terminal id and shows a balance above the shadow: blocked (suspected_clone), with"
        " the evidence in the card's events",
    ) as row:
        original = world.funded_card(5_000)
        ImageFile(tmp_path / "a.json").create(original.state)
        shutil.copy(tmp_path / "a.json", tmp_path / "b.json")
        copies = []
        for name, seed in (("a", 11), ("b", 12)):
            store = ImageFile(tmp_path / f"{name}.json")
            copies.append(CardApplet(store.load(), store, deterministic_random(seed)))
        copy_a, copy_b = copies
        assert world.terminal.purchase(copy_a, 1_000)["status"] == "succeeded"
        payment = world.other_terminal.create_payment(500)
        issuer, init = world.other_terminal.purchase_batch1(copy_b, 500)
        answer = world.other_terminal.authorise_payment(payment["id"], issuer, init)
        assert answer.status_code == 402 and answer.json()["decline_code"] == "counter_mismatch"
        assert card_row(world, copy_b).status == "active"
        assert world.other_terminal.card_check(copy_b, answer.json())["verdict"] == "clone"
        blocked = card_row(world, copy_b)
        assert blocked.status == "blocked" and blocked.flagged
        events = world.client.get(
            f"/v1/cards/{copy_b.state.issuer.card_number}/events",
            headers=world.auth(world.operator_key),
        ).json()["data"]
        evidence = next(e for e in events if e["kind"] == "suspected_clone")["detail"]
        assert (evidence["balance"], evidence["shadow_balance"]) == (5_000, 4_000)
        row.observed = "402 counter_mismatch; check verdict clone; blocked with the evidence"
