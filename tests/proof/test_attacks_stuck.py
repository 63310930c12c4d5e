"""Attacks that try to get money or a card stuck for good, or one merchant to stall others.

Issue 19, findings 1, 2 and 8, on SQLite and on PostgreSQL, through settlement's HTTP API
with the real card emulator. Each scenario ends with the conservation check
(:func:`tests.proof.invariants.check_invariants`, which runs ``webpurse ledger check`` too)
and, where money moved to a merchant, the payout rule: a clearing batch pays out exactly
captures − refunds − top-ups.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.proof.conftest import Proof
from tests.proof.invariants import InvariantReport, check_invariants
from tests.settlement.support import (
    BACKENDS,
    World,
    database_url,
    make_world,
    ok,
    prove,
    read_issuer,
)
from webpurse.card import CardApplet
from webpurse.protocol.commands import InitializeForPurchaseResponse
from webpurse.settlement import clearing, ledger
from webpurse.settlement.models import Payment, Refund

SUITE = "attacks_stuck"


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def backend(world: World) -> str:
    return "PostgreSQL" if world.url.startswith("postgresql") else "SQLite"


def invariants(world: World, cards: list[CardApplet], *, settled: bool = True) -> InvariantReport:
    return check_invariants(world.factory, world.url, cards, settled=settled)


def post(
    world: World, path: str, body: dict[str, Any] | None = None, key: str | None = None
) -> Any:
    return world.client.post(path, json=body or {}, headers=world.auth(key or world.merchant_key))


# --- finding 8: a batch keeps its items' order ----------------------------------------


def test_a_batch_cancel_then_authorise_answers_as_one_by_one(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"batch [cancel P, authorise P] in one request ({backend(world)})",
        expected="cancel 200, authorise 409 invalid_payment_state — as the same calls one by one;"
        " no hold; ledger check ok",
    ) as row:
        card = world.funded_card(500)
        payment = world.terminal.create_payment(200)
        issuer, init = world.terminal.purchase_batch1(card, 200)
        answer = post(
            world,
            "/v1/batch",
            {
                "requests": [
                    {"path": f"/v1/payments/{payment['id']}/cancel", "body": None},
                    {
                        "path": f"/v1/payments/{payment['id']}/authorise",
                        "body": {
                            "issuer_data": issuer.hex(),
                            "initialize_response": init.hex(),
                            "terminal_id": world.terminal_id,
                        },
                    },
                ]
            },
        )
        assert answer.status_code == 200, answer.text
        cancel, authorise = answer.json()["responses"]
        assert (cancel["status"], cancel["body"]["status"]) == (200, "canceled")
        assert (authorise["status"], authorise["body"]["code"]) == (409, "invalid_payment_state")
        report = invariants(world, [card])
        row.observed = (
            f"cancel {cancel['status']} {cancel['body']['status']}, authorise"
            f" {authorise['status']} {authorise['body']['code']}; {report.summary()}"
        )


# --- the payout rule -------------------------------------------------------------------


def payout_rule(world: World) -> str:
    """Clear merchant A's day: the payout is exactly captures − refunds (its cards were
    funded by shop B, so A sold no top-ups); failed refunds count for nothing."""
    world.clock.advance(dt.timedelta(days=1))
    day = clearing.business_day_of(world.clock.now - dt.timedelta(days=1))
    with world.factory() as session, session.begin():
        captured = session.scalar(
            select(func.coalesce(func.sum(Payment.amount), 0)).where(
                Payment.merchant_id == world.merchant_id, Payment.status == "succeeded"
            )
        )
        refunded = session.scalar(
            select(func.coalesce(func.sum(Refund.amount), 0)).where(
                Refund.merchant_id == world.merchant_id, Refund.status != "failed"
            )
        )
        batch = clearing.run_batch(session, world.merchant_id, day, world.clock.now).batch
        assert batch.payout == captured - refunded, (batch.payout, captured, refunded)
        assert batch.payment_total - batch.refund_total == captured - refunded
        assert ledger.balance(session, ledger.merchant_account(world.merchant_id)) == 0
    return f"payout {batch.payout} = captures {captured} − refunds {refunded}"


# --- finding 1: a refund whose delivery fails is failed, never stuck --------------------


def _paid_and_refunded(
    world: World, amount: int
) -> tuple[CardApplet, dict[str, Any], dict[str, Any]]:
    card = world.issue()
    world.other_terminal.load(card, 1_000)  # funded by shop B: A sold no top-up
    paid = world.terminal.purchase(card, amount)
    answer = post(world, "/v1/refunds", {"payment": paid["id"]})
    assert answer.status_code == 201, answer.text
    return card, paid, answer.json()


def _refund_state(world: World, paid: dict[str, Any], refund: dict[str, Any]) -> tuple[str, int]:
    refund_now = world.client.get(
        f"/v1/refunds/{refund['id']}", headers=world.auth(world.merchant_key)
    ).json()
    payment_now = world.client.get(
        f"/v1/payments/{paid['id']}", headers=world.auth(world.merchant_key)
    ).json()
    return refund_now["status"], payment_now["amount_refunded"]


def _load_attempt(
    world: World, card: CardApplet, load_id: str, amount: int, key: str | None = None
) -> Any:
    issuer, init = world.terminal.load_batch1(card, amount, world.terminal_id)
    return post(
        world,
        f"/v1/loads/{load_id}/authorise",
        {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": world.terminal_id,
        },
        key,
    )


def test_a_declined_refund_delivery_is_failed_not_stuck(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"refund: one delivery attempt with a wrong amount (402 mac_invalid) ({backend(world)})",
        expected="refund failed, 300 back in the payable, amount_refunded 0; a new refund of the"
        " whole amount is delivered; ledger check (refunds:pending vs open refunds) ok; payout"
        " = captures − refunds",
    ) as row:
        card, paid, refund = _paid_and_refunded(world, 300)
        answer = _load_attempt(world, card, refund["load"], 1)
        assert answer.status_code == 402 and answer.json()["decline_code"] == "mac_invalid"
        assert _refund_state(world, paid, refund) == ("failed", 0)
        invariants(world, [card])
        again = post(world, "/v1/refunds", {"payment": paid["id"]})
        assert again.status_code == 201 and again.json()["amount"] == 300, again.text
        world.terminal.run_load(
            card, {"id": again.json()["load"], "amount": 300, "terminal_id": world.terminal_id}
        )
        assert _refund_state(world, paid, again.json()) == ("succeeded", 300)
        report = invariants(world, [card])
        row.observed = (
            f"refund failed → re-refunded and delivered; {payout_rule(world)}; {report.summary()}"
        )


def test_a_canceled_refund_load_fails_the_refund(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"refund: its load canceled by the merchant ({backend(world)})",
        expected="refund failed, money back in the payable, amount_refunded 0; ledger check ok;"
        " payout = captures − refunds",
    ) as row:
        card, paid, refund = _paid_and_refunded(world, 250)
        answer = post(world, f"/v1/loads/{refund['load']}/cancel")
        assert answer.status_code == 200 and answer.json()["status"] == "canceled", answer.text
        assert _refund_state(world, paid, refund) == ("failed", 0)
        report = invariants(world, [card])
        row.observed = f"refund failed; {payout_rule(world)}; {report.summary()}"


def test_a_superseded_refund_load_fails_the_refund(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"refund: its load uncertain, then superseded by shop B's top-up at that counter"
        f" ({backend(world)})",
        expected="B's verified TAC releases the refund's load; refund failed, money back in A's"
        " payable; ledger check ok; payout = captures − refunds",
    ) as row:
        card, paid, refund = _paid_and_refunded(world, 200)
        answer = _load_attempt(world, card, refund["load"], 200)
        assert answer.status_code == 200, answer.text  # MAC2 out; the CREDIT never reaches the card
        assert post(world, f"/v1/loads/{refund['load']}/uncertain").status_code == 200
        topup = world.other_terminal.create_load(100)
        issuer, init = world.other_terminal.load_batch1(card, 100, world.other_terminal_id)
        authorised = world.other_terminal.post(
            f"/v1/loads/{topup['id']}/authorise",
            {
                "issuer_data": issuer.hex(),
                "initialize_response": init.hex(),
                "terminal_id": world.other_terminal_id,
            },
        )
        assert authorised.status_code == 200, authorised.text
        tac = ok(card, bytes.fromhex(authorised.json()["authorisation"]["credit_apdu"]))
        done = world.other_terminal.post(
            f"/v1/loads/{topup['id']}/complete", {"credit_response": tac.hex()}
        )
        assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
        assert _refund_state(world, paid, refund) == ("failed", 0)
        report = invariants(world, [card])
        row.observed = (
            f"refund load released, refund failed; {payout_rule(world)}; {report.summary()}"
        )


# --- finding 2: one merchant cannot freeze a card; a card ahead of the shadow heals -----


def forged_initialize(world: World, card: CardApplet, balance: int, counter: int) -> bytes:
    """An INITIALIZE FOR PURCHASE answer the attacker predicts (it carries no MAC): the
    key version as a real INITIALIZE shows it, balance and counter as the shadow's."""
    _, real = world.terminal.purchase_batch1(card, 1)
    return InitializeForPurchaseResponse(
        balance=balance,
        offline_counter=counter,
        overdraft_limit=0,
        key_version=InitializeForPurchaseResponse.from_data(real).key_version,
        algorithm_id=0,
        random=bytes.fromhex("A5A5A5A5"),
    ).to_data()


def other_shop_purchase(world: World, card: CardApplet, amount: int) -> Any:
    """Shop B's purchase up to authorise: (payment, the authorise answer)."""
    payment = world.other_terminal.create_payment(amount)
    issuer, init = world.other_terminal.purchase_batch1(card, amount)
    return payment, world.other_terminal.authorise_payment(payment["id"], issuer, init)


def finish_purchase(world: World, card: CardApplet, payment_id: str, answer: Any) -> Any:
    assert answer.status_code == 200, answer.text
    debit = ok(card, bytes.fromhex(answer.json()["authorisation"]["debit_apdu"]))
    done = world.other_terminal.post(
        f"/v1/payments/{payment_id}/capture", {"debit_response": debit.hex()}
    )
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    return done.json()


def sweep(world: World) -> dict[str, Any]:
    answer = world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def test_a_forged_uncertain_hold_frees_the_card_at_the_bound(world: World, proof: Proof) -> None:
    bound = getattr(world.settings, "card_hold_ttl", dt.timedelta(hours=1))
    with proof.row(
        SUITE,
        f"card frozen: shop A authorises the whole balance on a forged INITIALIZE, calls it"
        f" uncertain ({backend(world)})",
        expected=f"shop B gets recovery_required until the bound ({bound}); then the sweep"
        " releases A's hold (canceled, hold_expired), A cannot hold it again at that counter,"
        " and B buys and tops up; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        attacker = world.terminal.create_payment(500)
        forged = forged_initialize(world, card, 500, 0)
        issuer = read_issuer(card)
        held = world.terminal.authorise_payment(attacker["id"], issuer, forged)
        assert held.status_code == 200, held.text
        assert post(world, f"/v1/payments/{attacker['id']}/uncertain").status_code == 200
        _, refused = other_shop_purchase(world, card, 100)
        assert refused.status_code == 402, refused.text
        assert refused.json()["decline_code"] == "recovery_required"
        world.clock.advance(bound / 2)
        sweep(world)
        _, still = other_shop_purchase(world, card, 100)
        assert still.json()["decline_code"] == "recovery_required"  # within the bound
        world.clock.advance(bound / 2 + dt.timedelta(seconds=1))
        report_sweep = sweep(world)
        released = world.client.get(
            f"/v1/payments/{attacker['id']}", headers=world.auth(world.merchant_key)
        ).json()
        assert (released["status"], released["decline_code"]) == ("canceled", "hold_expired")
        again = world.terminal.create_payment(500)  # the same forgery, for a second bound
        rehold = world.terminal.authorise_payment(
            again["id"], issuer, forged_initialize(world, card, 500, 0)
        )
        assert rehold.status_code == 409 and rehold.json()["code"] == "card_hold_exhausted"
        payment, answer = other_shop_purchase(world, card, 100)  # the first one expired meanwhile
        finish_purchase(world, card, payment["id"], answer)
        world.other_terminal.load(card, 50)  # top-ups go through too
        assert card.state.balance == 450
        report = invariants(world, [card])
        row.observed = (
            f"B refused (recovery_required) within the bound; after it the sweep released A's"
            f" hold ({report_sweep}); A's second forged hold 409 card_hold_exhausted; B paid 100"
            f" and loaded 50; {report.summary()}"
        )


def test_a_released_real_debit_heals_from_the_cards_proof(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"card ahead of the shadow: shop A debits 1 fen for real, then releases it with a"
        f" forged 'counter unchanged' ({backend(world)})",
        expected="shop B gets recovery_required with recover.heal (not a decline for good);"
        " B's PROVE answer settles A's debit for A (succeeded); B then buys; a bad proof"
        " changes nothing; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        attacker = world.terminal.create_payment(1)
        issuer, init = world.terminal.purchase_batch1(card, 1)
        held = world.terminal.authorise_payment(attacker["id"], issuer, init)
        ok(card, bytes.fromhex(held.json()["authorisation"]["debit_apdu"]))  # the real debit
        assert post(world, f"/v1/payments/{attacker['id']}/uncertain").status_code == 200
        released = post(
            world,
            f"/v1/payments/{attacker['id']}/resolve",
            {"initialize_response": forged_initialize(world, card, 500, 0).hex()},
        )
        assert released.status_code == 200 and released.json()["status"] == "canceled"
        payment, answer = other_shop_purchase(world, card, 100)
        assert answer.status_code == 402, answer.text
        recover = answer.json()["recover"]
        assert answer.json()["decline_code"] == "recovery_required" and recover["heal"] is True
        assert "payment_id" not in recover  # A's id is not B's to see
        bad = world.other_terminal.post(
            "/v1/heal",
            {
                "issuer_data": read_issuer(card).hex(),
                "transaction_type": recover["transaction_type"],
                "prove_response": "00" * 8,
            },
        )
        assert bad.status_code == 402 and bad.json()["code"] == "verification_failed", bad.text
        proof_data, sw = prove(card, 0x06, recover["counter"] + 1)
        assert sw == 0x9000
        healed = world.other_terminal.post(
            "/v1/heal",
            {
                "issuer_data": read_issuer(card).hex(),
                "transaction_type": recover["transaction_type"],
                "prove_response": proof_data.hex(),
            },
        )
        assert healed.status_code == 200, healed.text
        settled = world.client.get(
            f"/v1/payments/{attacker['id']}", headers=world.auth(world.merchant_key)
        ).json()
        assert settled["status"] == "succeeded"  # settled against A, who released it
        issuer_b, init_b = world.other_terminal.purchase_batch1(card, 100)
        retry = world.other_terminal.authorise_payment(payment["id"], issuer_b, init_b)
        finish_purchase(world, card, payment["id"], retry)
        assert card.state.balance == 399
        report = invariants(world, [card])
        rule = payout_rule(world)
        row.observed = (
            f"B: recovery_required heal; bad proof 402; PROVE healed (A's 1 fen succeeded);"
            f" B paid 100; {rule}; {report.summary()}"
        )


def test_operators_see_and_release_any_merchants_stale_hold(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"operator queue: another merchant's stale uncertain hold ({backend(world)})",
        expected="GET /v1/holds lists it once past the bound; an operator releases it with a"
        " reason (audited: operator key, time, reason); a merchant key is 403; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 300)
        attacker = world.terminal.create_payment(300)
        held = world.terminal.authorise_payment(
            attacker["id"], read_issuer(card), forged_initialize(world, card, 300, 0)
        )
        assert held.status_code == 200
        assert post(world, f"/v1/payments/{attacker['id']}/uncertain").status_code == 200
        operator = world.auth(world.operator_key)
        assert world.client.get("/v1/holds", headers=operator).json()["data"] == []
        world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(seconds=1))
        listed = world.client.get("/v1/holds", headers=operator).json()["data"]
        assert [(h["id"], h["stale"], h["merchant"]) for h in listed] == [
            (attacker["id"], True, world.merchant_id)
        ]
        merchant_try = world.other_terminal.post(
            f"/v1/holds/{attacker['id']}/release", {"reason": "mine now"}
        )
        assert merchant_try.status_code == 403
        released = world.client.post(
            f"/v1/holds/{attacker['id']}/release",
            json={"reason": "ticket 42: forged hold"},
            headers=operator,
        )
        assert released.status_code == 200 and released.json()["status"] == "canceled"
        events = world.client.get(
            f"/v1/cards/{card.state.issuer.card_number}/events", headers=operator
        ).json()["data"]
        audit = [e for e in events if e["kind"] == "operator_released"]
        assert audit and audit[0]["detail"]["reason"] == "ticket 42: forged hold"
        assert audit[0]["detail"]["operator"] and audit[0]["detail"]["at"]
        world.other_terminal.purchase(card, 100)
        report = invariants(world, [card])
        row.observed = f"listed, released by operator (audited); B paid 100; {report.summary()}"
