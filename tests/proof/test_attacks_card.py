"""Attacks on the money path: a hostile merchant relay, forged and cloned cards, guessing.

Each attack runs against the real settlement app (SQLite, migrated by Alembic, its own
security module) and the real card emulator, and must be refused with a specific answer
(an HTTP problem code / decline code, or the card's status word), leave a log line naming
that refusal, and change nothing: ledger balances, card registry, the card's purse and
the payment's status stay as the lifecycle says (docs/settlement-api.md). Each records a
row of the ``attacks`` proof table.
"""

from __future__ import annotations

import datetime as dt
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from sqlalchemy import select

from tests.proof.conftest import Proof
from tests.settlement.support import (
    BACKENDS,
    Terminal,
    World,
    apdu,
    database_url,
    deterministic_random,
    live_server,
    make_world,
    ok,
    prove,
    read_issuer,
)
from webpurse.card import CardApplet, ImageFile, MasterKeys, MemoryStore, personalise
from webpurse.protocol import host
from webpurse.protocol.apdu import CommandApdu, StatusWord
from webpurse.protocol.commands import (
    DebitForPurchase,
    InitializeForLoadResponse,
    InitializeForPurchase,
    InitializeForPurchaseResponse,
)
from webpurse.protocol.crypto import diversify
from webpurse.protocol.records import decode_bcd_date, decode_bcd_time
from webpurse.settlement import ledger
from webpurse.settlement.models import Account, Card, CardEvent, Load, Payment

SUITE = "attacks"


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """SQLite by default; ``parametrize("world", BACKENDS, indirect=True)`` adds PostgreSQL."""
    backend = getattr(request, "param", "sqlite")
    with database_url(backend, tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def on(world: World) -> str:
    """The scenario suffix naming the database when it is not the default SQLite."""
    return " (PostgreSQL)" if world.url.startswith("postgresql") else ""


BOTH = pytest.mark.parametrize("world", BACKENDS, indirect=True)


# --- what "nothing changed" means ---------------------------------------------------


@dataclass(frozen=True)
class Books:
    """Settlement's side: every ledger balance, every object's status, every card's shadow."""

    accounts: dict[str, int]
    payments: dict[str, str]
    loads: dict[str, str]
    cards: dict[str, tuple[str, int, int, int, str | None]]

    def money(self) -> dict[str, int]:
        return {k: v for k, v in self.accounts.items() if v}


def books(world: World) -> Books:
    """Settlement's books now; also proves them balanced (``webpurse ledger check``'s rules)."""
    with world.factory() as session:
        report = ledger.check(session)
        assert report.ok, report.problems
        return Books(
            accounts={a.id: a.balance for a in session.scalars(select(Account))},
            payments={p.id: p.status for p in session.scalars(select(Payment))},
            loads={x.id: x.status for x in session.scalars(select(Load))},
            cards={
                c.card_number: (
                    c.status,
                    c.shadow_balance,
                    c.online_counter,
                    c.offline_counter,
                    c.open_transaction,
                )
                for c in session.scalars(select(Card))
            },
        )


def purse(card: CardApplet) -> tuple[int, int, int, int]:
    """The card's value-bearing state: balance, counters, log length."""
    state = card.state
    return state.balance, state.online_counter, state.offline_counter, len(state.log)


def observations(world: World, card: CardApplet) -> list[str]:
    """The operator's observations (unauthenticated mismatches) for ``card``, oldest first."""
    answer = world.client.get(
        f"/v1/card_observations?card_number={card.state.issuer.card_number}",
        headers=world.auth(world.operator_key),
    )
    assert answer.status_code == 200, answer.text
    return [o["kind"] for o in reversed(answer.json()["data"])]


def card_row(world: World, card: CardApplet) -> Card:
    with world.factory() as session:
        row = session.scalars(
            select(Card).where(Card.card_number == card.state.issuer.card_number)
        ).one()
        session.expunge(row)
        return row


def card_events(world: World, card: CardApplet) -> list[str]:
    row = card_row(world, card)
    with world.factory() as session:
        return list(
            session.scalars(
                select(CardEvent.kind).where(CardEvent.card_id == row.id).order_by(CardEvent.id)
            )
        )


def logged(events: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """The first captured structlog event carrying ``fields``; fail if none does."""
    for event in events:
        if all(event.get(k) == v for k, v in fields.items()):
            return event
    raise AssertionError(f"no log event with {fields}: {[e.get('event') for e in events]}")


def problem(answer: Any, status: int, code: str, decline_code: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = answer.json()
    assert body["code"] == code, body
    if decline_code is not None:
        assert body["decline_code"] == decline_code, body
    return body


def payment_status(world: World, payment_id: str) -> str:
    answer = world.client.get(f"/v1/payments/{payment_id}", headers=world.auth(world.merchant_key))
    return str(answer.json()["status"])


def authorised(world: World, card: CardApplet, amount: int) -> tuple[dict[str, Any], bytes]:
    """A payment authorised for ``card``: (payment json, the DEBIT APDU settlement issued)."""
    terminal = world.terminal
    payment = terminal.create_payment(amount)
    issuer, init = terminal.purchase_batch1(card, amount)
    answer = terminal.authorise_payment(payment["id"], issuer, init)
    assert answer.status_code == 200, answer.text
    return answer.json(), bytes.fromhex(answer.json()["authorisation"]["debit_apdu"])


# --- a hostile merchant relay ------------------------------------------------------


def test_relay_initializes_for_another_amount_and_says_so(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "relay: INITIALIZE for 50.00 on a 1.00 payment (amount sent)",
        expected="402 amount_mismatch, logged; no MAC1, ledger/card unchanged, payment declined",
    ) as row:
        card = world.funded_card(5_000)
        payment = world.terminal.create_payment(100)
        before, purse_before = books(world), purse(card)
        issuer, init = world.terminal.purchase_batch1(card, 5_000)
        with structlog.testing.capture_logs() as events:
            answer = world.terminal.authorise_payment(payment["id"], issuer, init, amount=5_000)
        body = problem(answer, 402, "card_declined", "amount_mismatch")
        logged(events, event="payment.declined", decline_code="amount_mismatch")
        assert "authorisation" not in body["payment"] or body["payment"]["authorisation"] is None
        after = books(world)
        assert after.accounts == before.accounts and after.cards == before.cards
        assert purse(card) == purse_before
        assert payment_status(world, payment["id"]) == "declined"
        row.observed = "402 amount_mismatch; ledger, registry and purse unchanged"


def test_relay_hides_the_amount_and_the_card_refuses_the_debit(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "relay: INITIALIZE for 50.00 on a 1.00 payment (amount hidden), DEBIT with its MAC1",
        expected="card 9302 (MAC1 is for 1.00); nothing debited; resolve releases the hold",
    ) as row:
        card = world.funded_card(5_000)
        before, purse_before = books(world), purse(card)
        payment = world.terminal.create_payment(100)
        issuer, init = world.terminal.purchase_batch1(card, 5_000)
        answer = world.terminal.authorise_payment(payment["id"], issuer, init)
        assert answer.status_code == 200  # settlement's MAC1 binds 1.00, not 50.00
        debit = bytes.fromhex(answer.json()["authorisation"]["debit_apdu"])
        _, sw = apdu(card, _command(debit))
        assert sw == StatusWord.MAC_INVALID
        assert purse(card) == purse_before
        # The relay cannot capture: it has no MAC2/TAC. A garbage one is refused and logged.
        with structlog.testing.capture_logs() as events:
            refused = world.terminal.post(
                f"/v1/payments/{payment['id']}/capture", {"debit_response": "00" * 8}
            )
        problem(refused, 402, "verification_failed")
        logged(events, event="http.problem", code="verification_failed")
        # The card's next contact proves nothing happened: the hold goes back to the card.
        fresh = ok(card, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())
        resolved = world.terminal.post(
            f"/v1/payments/{payment['id']}/resolve", {"initialize_response": fresh.hex()}
        )
        assert resolved.status_code == 200 and resolved.json()["status"] == "canceled"
        after = books(world)
        assert after.money() == before.money()
        assert after.cards == before.cards
        row.observed = (
            "card 9302; capture 402 verification_failed; resolved canceled; ledger as before"
        )


def _command(raw: bytes) -> CommandApdu:
    return CommandApdu.from_bytes(raw)


def test_relay_sends_a_debit_for_another_amount(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "relay: DEBIT with the MAC1 of a 1.00 payment after INITIALIZE for 30.00",
        expected="card 9302; purse unchanged; the 30.00 payment gets no MAC1 without authorise",
    ) as row:
        card = world.funded_card(5_000)
        _, debit_small = authorised(world, card, 100)
        # Settle the small one honestly, then try its MAC1 on a bigger INITIALIZE.
        ok(card, debit_small)
        purse_before = purse(card)
        ok(card, InitializeForPurchase(1, 3_000, bytes.fromhex(world.terminal_id)).to_apdu())
        _, sw = apdu(card, _command(debit_small))
        assert sw == StatusWord.MAC_INVALID
        assert purse(card) == purse_before
        row.observed = "card 9302; balance and counters unchanged"


def test_replayed_mac1_is_refused_by_the_card(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "replay: an earlier DEBIT (MAC1) sent again after a new INITIALIZE",
        expected="card 9302; nothing debited twice",
    ) as row:
        card = world.funded_card(5_000)
        paid = world.terminal.purchase(card, 700)
        assert paid["status"] == "succeeded"
        debit = bytes.fromhex(paid["authorisation"]["debit_apdu"])
        purse_before, before = purse(card), books(world)
        ok(card, InitializeForPurchase(1, 700, bytes.fromhex(world.terminal_id)).to_apdu())
        _, sw = apdu(card, _command(debit))
        assert sw == StatusWord.MAC_INVALID
        assert purse(card) == purse_before and books(world) == before
        row.observed = "card 9302; balance 4300 once"


@BOTH
def test_replayed_mac2_and_tac_are_refused(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "replay: capture payment B with payment A's TAC‖MAC2" + on(world),
        expected="402 verification_failed, logged; B stays authorised; ledger unchanged",
    ) as row:
        card = world.funded_card(5_000)
        first, debit_first = authorised(world, card, 500)
        answer_first = ok(card, debit_first)
        captured = world.terminal.post(
            f"/v1/payments/{first['id']}/capture", {"debit_response": answer_first.hex()}
        )
        assert captured.status_code == 200
        second, _ = authorised(world, card, 500)
        before = books(world)
        with structlog.testing.capture_logs() as events:
            replay = world.terminal.post(
                f"/v1/payments/{second['id']}/capture", {"debit_response": answer_first.hex()}
            )
        problem(replay, 402, "verification_failed")
        logged(events, event="http.problem", code="verification_failed")
        assert books(world) == before
        assert payment_status(world, second["id"]) == "authorised"
        assert card_events(world, card)[-1] == "verification_failed"
        row.observed = "402 verification_failed; B authorised; ledger unchanged; event recorded"


def test_replayed_proof_in_resolve_is_refused(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "replay: resolve an uncertain payment with an older purchase's MAC2‖TAC as its proof",
        expected="402 verification_failed; payment stays uncertain; ledger unchanged",
    ) as row:
        card = world.funded_card(5_000)
        first, debit_first = authorised(world, card, 500)
        old = DebitAnswer(ok(card, debit_first))
        assert world.terminal.post(
            f"/v1/payments/{first['id']}/capture", {"debit_response": old.raw.hex()}
        ).is_success
        second, debit_second = authorised(world, card, 500)
        ok(card, debit_second)  # the debit happened, but its answer is "lost"
        assert world.terminal.post(f"/v1/payments/{second['id']}/uncertain").is_success
        before = books(world)
        fresh = ok(card, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())
        with structlog.testing.capture_logs() as events:
            forged = world.terminal.post(
                f"/v1/payments/{second['id']}/resolve",
                {"initialize_response": fresh.hex(), "prove_response": old.proof.hex()},
            )
        problem(forged, 402, "verification_failed")
        logged(events, event="http.problem", code="verification_failed")
        assert books(world) == before
        assert payment_status(world, second["id"]) == "uncertain"
        row.observed = "402 verification_failed; uncertain kept; ledger unchanged"


@dataclass(frozen=True)
class DebitAnswer:
    raw: bytes  # TAC 4 ‖ MAC2 4

    @property
    def proof(self) -> bytes:  # GET TRANSACTION PROVE order: MAC2 4 ‖ TAC 4
        return self.raw[4:] + self.raw[:4]


@BOTH
def test_capturing_twice_posts_once(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "relay: capture a succeeded payment again (new request, and same Idempotency-Key)"
        + on(world),
        expected="409 invalid_payment_state, logged; the stored answer replayed; posted once",
    ) as row:
        card = world.funded_card(5_000)
        payment, debit = authorised(world, card, 800)
        answer = ok(card, debit)
        body = {"debit_response": answer.hex()}
        first = world.client.post(
            f"/v1/payments/{payment['id']}/capture",
            json=body,
            headers=world.terminal.headers("cap-1"),
        )
        assert first.status_code == 200
        before = books(world)
        with structlog.testing.capture_logs() as events:
            again = world.terminal.post(f"/v1/payments/{payment['id']}/capture", body)
        problem(again, 409, "invalid_payment_state")
        logged(events, event="http.problem", code="invalid_payment_state")
        replayed = world.client.post(
            f"/v1/payments/{payment['id']}/capture",
            json=body,
            headers=world.terminal.headers("cap-1"),
        )
        assert replayed.status_code == 200
        assert replayed.headers.get("idempotent-replayed") == "true"
        assert books(world) == before
        with world.factory() as session:
            merchant = session.get(Account, f"merchant:{world.merchant_id}")
            assert merchant is not None and merchant.balance == 800
        row.observed = "409 invalid_payment_state; idempotent replay; merchant credited 800 once"


# --- forged and cloned cards -------------------------------------------------------

FORGER = MasterKeys(b"\x13" * 16, b"\x37" * 16, b"\x42" * 16)


def forged_copy(world: World, genuine: CardApplet) -> CardApplet:
    """A counterfeit of ``genuine``: same card number, balance and counters, other keys."""
    state = personalise(FORGER, genuine.state.issuer.serial, start=genuine.state.issuer.start_date)
    state = replace(
        state,
        issuer=genuine.state.issuer,
        balance=genuine.state.balance,
        online_counter=genuine.state.online_counter,
        offline_counter=genuine.state.offline_counter,
    )
    return CardApplet(state, MemoryStore(state), deterministic_random(77))


@BOTH
def test_forged_card_cannot_pay(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "forged card (other master keys, a real card's number): purchase with made-up MAC2/TAC"
        + on(world),
        expected="card 9302 to settlement's MAC1; fabricated TAC 402 verification_failed; unpaid",
    ) as row:
        genuine = world.funded_card(5_000)
        fake = forged_copy(world, genuine)
        before_money = books(world).money()
        payment, debit = authorised(world, fake, 900)
        _, sw = apdu(fake, _command(debit))
        assert sw == StatusWord.MAC_INVALID  # its keys are not the issuer's
        # A forger answers the DEBIT with MACs from its own keys instead.
        with world.factory() as session:
            row_payment = session.get(Payment, payment["id"])
            assert row_payment is not None
            seq, date, time = (
                row_payment.terminal_seq or 0,
                decode_bcd_date(bytes.fromhex(row_payment.txn_date or "")),
                decode_bcd_time(bytes.fromhex(row_payment.txn_time or "")),
            )
            random = bytes.fromhex(row_payment.card_random or "")
            counter = row_payment.counter or 0
        serial = genuine.state.issuer.serial
        mac2 = host.purchase_mac2(
            diversify(FORGER.dpk, serial),
            random=random,
            offline_counter=counter,
            terminal_seq=seq,
            amount=900,
        )
        tac = host.purchase_tac(
            diversify(FORGER.dtk, serial),
            amount=900,
            terminal_id=bytes.fromhex(world.terminal_id),
            terminal_seq=seq,
            date=date,
            time=time,
        )
        with structlog.testing.capture_logs() as events:
            answer = world.terminal.post(
                f"/v1/payments/{payment['id']}/capture", {"debit_response": (tac + mac2).hex()}
            )
        problem(answer, 402, "verification_failed")
        logged(events, event="http.problem", code="verification_failed")
        assert payment_status(world, payment["id"]) == "authorised"
        with world.factory() as session:
            merchant = session.get(Account, f"merchant:{world.merchant_id}")
            assert merchant is None or merchant.balance == 0
        # The genuine card's next contact releases the hold: value back where it was.
        fresh = ok(genuine, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())
        assert (
            world.terminal.post(
                f"/v1/payments/{payment['id']}/resolve", {"initialize_response": fresh.hex()}
            ).json()["status"]
            == "canceled"
        )
        assert books(world).money() == before_money
        row.observed = "card 9302; 402 verification_failed; merchant 0; hold released on resolve"


def test_forged_card_cannot_load(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "forged card: load (its MAC1 made with other keys)",
        expected="402 mac_invalid, observed for the operator (card untouched), funds returned,"
        " no MAC2",
    ) as row:
        genuine = world.funded_card(1_000)
        fake = forged_copy(world, genuine)
        load = world.terminal.create_load(2_000)
        before = books(world)
        purse_before = purse(fake)
        issuer, init = world.terminal.load_batch1(fake, 2_000, load["terminal_id"])
        with structlog.testing.capture_logs() as events:
            answer = world.terminal.post(
                f"/v1/loads/{load['id']}/authorise",
                {
                    "issuer_data": issuer.hex(),
                    "initialize_response": init.hex(),
                    "terminal_id": load["terminal_id"],
                },
            )
        body = problem(answer, 402, "card_declined", "mac_invalid")
        logged(events, event="http.problem", decline_code="mac_invalid")
        assert "mac2" not in str(body.get("load", {}).get("authorisation"))
        after = books(world)
        assert after.loads[load["id"]] == "declined"
        assert after.accounts.get("held:loads", 0) == 0
        assert sum(v for k, v in after.accounts.items() if k.startswith("card:")) == 1_000
        assert not card_row(world, genuine).flagged  # a bad MAC is anyone's, not the card's
        assert observations(world, genuine) == ["mac1_invalid"]
        assert purse(fake) == purse_before
        assert before.cards == {k: v for k, v in after.cards.items()}
        row.observed = "402 mac_invalid; load declined, held 0, observed; registry unchanged"


def test_unknown_card_is_declined(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "forged card with a number settlement never issued",
        expected="402 unknown_card, logged; nothing changes",
    ) as row:
        state = personalise(FORGER, bytes(9) + b"\x99", start=world.clock().date())
        fake = CardApplet(state, MemoryStore(state), deterministic_random(5))
        payment = world.terminal.create_payment(100)
        before = books(world)
        issuer, init = world.terminal.purchase_batch1(fake, 0)
        with structlog.testing.capture_logs() as events:
            answer = world.terminal.authorise_payment(payment["id"], issuer, init)
        problem(answer, 402, "card_declined", "unknown_card")
        logged(events, event="payment.declined", decline_code="unknown_card")
        assert books(world).accounts == before.accounts
        row.observed = "402 unknown_card; ledger unchanged"


def _image_card(path: Path, seed: int) -> CardApplet:
    store = ImageFile(path)
    return CardApplet(store.load(), store, deterministic_random(seed))


@BOTH
def test_cloned_card_image_counter_going_back_blocks_the_card(
    world: World, proof: Proof, tmp_path: Path
) -> None:
    with proof.row(
        SUITE,
        "clone: copy a card image (real keys), pay with copy A, then with copy B (counter goes"
        " back)" + on(world),
        expected="402 counter_mismatch (unauthenticated: observed, card untouched); the card"
        " check's verified, fresh MAC1 blocks it (suspected_clone); then card_blocked",
    ) as row:
        original = world.funded_card(5_000)
        ImageFile(tmp_path / "a.json").create(original.state)
        shutil.copy(tmp_path / "a.json", tmp_path / "b.json")
        copy_a, copy_b = _image_card(tmp_path / "a.json", 1), _image_card(tmp_path / "b.json", 2)
        assert world.terminal.purchase(copy_a, 1_000)["status"] == "succeeded"
        before, purse_b = books(world), purse(copy_b)
        payment = world.terminal.create_payment(1_000)
        issuer, init = world.terminal.purchase_batch1(copy_b, 1_000)
        with structlog.testing.capture_logs() as events:
            answer = world.terminal.authorise_payment(payment["id"], issuer, init)
        body = problem(answer, 402, "card_declined", "counter_mismatch")
        logged(events, event="payment.declined", decline_code="counter_mismatch")
        # INITIALIZE FOR PURCHASE proves nothing: the card is not touched by it.
        assert card_row(world, copy_b).status == "active"
        assert observations(world, copy_b) == ["counter_behind"]
        # The check: copy B's MAC1 over settlement's fresh terminal id verifies, and shows a
        # balance above the shadow with the online counter unchanged — a real clone.
        assert world.terminal.card_check(copy_b, body)["verdict"] == "clone"
        flagged = card_row(world, copy_b)
        assert flagged.status == "blocked" and flagged.flagged
        assert "suspected_clone" in card_events(world, copy_b)
        assert books(world).accounts == before.accounts
        assert purse(copy_b) == purse_b  # the check's amount-0 INITIALIZE changes nothing
        # From now on neither copy pays.
        again = world.terminal.create_payment(100)
        issuer, init = world.terminal.purchase_batch1(copy_a, 100)
        problem(
            world.terminal.authorise_payment(again["id"], issuer, init),
            402,
            "card_declined",
            "card_blocked",
        )
        row.observed = (
            "402 counter_mismatch, card active; check verdict clone → blocked; ledger unchanged;"
            " copy A then card_blocked"
        )


@BOTH
def test_cloned_card_same_counter_other_balance_blocks_the_card(
    world: World, proof: Proof, tmp_path: Path
) -> None:
    with proof.row(
        SUITE,
        "clone: copy A pays; copy B loads with the same online counter and the old balance"
        + on(world),
        expected="402 balance_mismatch, funds returned (its MAC1 may be a recording: card"
        " untouched); the card check's fresh MAC1 blocks it",
    ) as row:
        original = world.funded_card(5_000)
        ImageFile(tmp_path / "a.json").create(original.state)
        shutil.copy(tmp_path / "a.json", tmp_path / "b.json")
        copy_a, copy_b = _image_card(tmp_path / "a.json", 3), _image_card(tmp_path / "b.json", 4)
        assert world.terminal.purchase(copy_a, 2_000)["status"] == "succeeded"
        load = world.terminal.create_load(1_000)
        before = books(world)
        issuer, init = world.terminal.load_batch1(copy_b, 1_000, load["terminal_id"])
        parsed = InitializeForLoadResponse.from_data(init)
        assert parsed.online_counter == card_row(world, copy_b).online_counter  # repeats
        with structlog.testing.capture_logs() as events:
            answer = world.terminal.post(
                f"/v1/loads/{load['id']}/authorise",
                {
                    "issuer_data": issuer.hex(),
                    "initialize_response": init.hex(),
                    "terminal_id": load["terminal_id"],
                },
            )
        body = problem(answer, 402, "card_declined", "balance_mismatch")
        logged(events, event="http.problem", decline_code="balance_mismatch")
        assert card_row(world, copy_b).status == "active"
        assert world.terminal.card_check(copy_b, body)["verdict"] == "clone"
        assert card_row(world, copy_b).status == "blocked"
        after = books(world)
        assert after.loads[load["id"]] == "declined" and after.accounts.get("held:loads") == 0
        card_accounts = {k: v for k, v in after.accounts.items() if k.startswith("card:")}
        assert card_accounts == {k: v for k, v in before.accounts.items() if k.startswith("card:")}
        row.observed = (
            "402 balance_mismatch, card active; check verdict clone → blocked; funds back"
        )


# --- blocked, expired ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "decline"),
    [("blocked", "card_blocked"), ("lost", "card_lost"), ("expired", "card_expired")],
)
def test_blacklisted_and_expired_cards_are_declined(
    world: World, proof: Proof, status: str, decline: str
) -> None:
    with proof.row(
        SUITE,
        f"{status} card (registry status) tries to pay",
        expected=f"402 {decline}, logged; ledger, registry and purse unchanged",
    ) as row:
        card = world.funded_card(1_000)
        changed = world.client.post(
            f"/v1/cards/{card.state.issuer.card_number}/status",
            json={"status": status, "reason": "proof"},
            headers=world.auth(world.operator_key),
        )
        assert changed.status_code == 200, changed.text
        payment = world.terminal.create_payment(100)
        before, purse_before = books(world), purse(card)
        issuer, init = world.terminal.purchase_batch1(card, 100)
        with structlog.testing.capture_logs() as events:
            answer = world.terminal.authorise_payment(payment["id"], issuer, init)
        problem(answer, 402, "card_declined", decline)
        logged(events, event="payment.declined", decline_code=decline)
        after = books(world)
        assert after.accounts == before.accounts and after.cards == before.cards
        assert purse(card) == purse_before
        row.observed = f"402 {decline}; nothing changed"


def test_a_card_past_its_expiry_date_is_declined(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "card past its expiry date (EF 0x15 and registry)",
        expected="402 card_expired, logged; nothing changes",
    ) as row:
        card = world.funded_card(1_000)
        world.clock.advance(dt.timedelta(days=366 * 6))
        payment = world.terminal.create_payment(100)
        before = books(world)
        issuer, init = world.terminal.purchase_batch1(card, 100)
        with structlog.testing.capture_logs() as events:
            answer = world.terminal.authorise_payment(payment["id"], issuer, init)
        problem(answer, 402, "card_declined", "card_expired")
        logged(events, event="payment.declined", decline_code="card_expired")
        assert books(world).accounts == before.accounts
        row.observed = "402 card_expired; ledger unchanged"


# --- guessing MAC1 ------------------------------------------------------------------


def test_guessing_mac1_locks_the_card(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "guess MAC1 at the card: DEBIT with made-up MAC1s",
        expected="10 × 9302, then 9303 to INITIALIZE; balance never moves",
    ) as row:
        card = world.funded_card(5_000)
        purse_before = purse(card)
        terminal_id = bytes.fromhex(world.terminal_id)
        read_issuer(card)
        answers = []
        for guess in range(10):
            ok(card, InitializeForPurchase(1, 1_000, terminal_id).to_apdu())
            debit = DebitForPurchase(
                guess + 1, dt.date(2026, 11, 27), dt.time(12), guess.to_bytes(4, "big")
            )
            answers.append(apdu(card, debit.to_apdu())[1])
        assert answers == [StatusWord.MAC_INVALID] * 10
        _, sw = apdu(card, InitializeForPurchase(1, 1_000, terminal_id).to_apdu())
        assert sw == StatusWord.APPLICATION_LOCKED
        assert card.state.locked and purse(card) == purse_before
        row.observed = "9302 ×10, then 9303; balance 5000 unchanged"


def test_guessing_the_cards_mac1_at_settlement_is_observed_not_flagged(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "guess the card's load MAC1 at settlement (to get a MAC2 without the card)",
        expected="402 mac_invalid each time, logged; an observation per guess for the operator;"
        " the card itself untouched (a bad MAC is anyone's)",
    ) as row:
        card = world.funded_card(1_000)
        issuer, init = world.terminal.load_batch1(card, 500, "000000000000")
        honest = InitializeForLoadResponse.from_data(init)
        declines = []
        with structlog.testing.capture_logs() as events:
            for guess in range(3):
                load = world.terminal.create_load(500)
                forged = replace(honest, mac1=guess.to_bytes(4, "big")).to_data()
                answer = world.terminal.post(
                    f"/v1/loads/{load['id']}/authorise",
                    {
                        "issuer_data": issuer.hex(),
                        "initialize_response": forged.hex(),
                        "terminal_id": load["terminal_id"],
                    },
                )
                declines.append(problem(answer, 402, "card_declined")["decline_code"])
        assert declines == ["mac_invalid"] * 3
        logged(events, event="http.problem", decline_code="mac_invalid")
        untouched = card_row(world, card)
        assert not untouched.flagged and untouched.status == "active"
        assert untouched.shadow_balance == 1_000
        assert observations(world, card) == ["mac1_invalid"] * 3
        after = books(world)
        assert after.accounts.get("held:loads") == 0
        assert world.terminal.purchase(card, 100)["status"] == "succeeded"
        row.observed = "402 mac_invalid ×3; 3 observations, card active; funds returned"


# --- racing captures through a real server -------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_racing_captures_post_once(backend: str, tmp_path: Path, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"relay: the same capture sent twice at once to a real server ({backend})",
        expected="one 200, the other 409 invalid_payment_state; merchant credited once",
    ) as row:
        with (
            database_url(backend, tmp_path, migrated=True) as url,
            live_server(url, tmp_path) as server,
            httpx.Client(base_url=server.base_url, timeout=60) as http,
        ):
            terminal = Terminal(http, server.merchant_key, server.terminal_id)
            card = server.issue()
            terminal.load(card, 5_000)
            outcomes: list[list[int]] = []
            for _ in range(5):
                payment = terminal.create_payment(300)
                issuer, init = terminal.purchase_batch1(card, 300)
                answer = terminal.authorise_payment(payment["id"], issuer, init)
                assert answer.status_code == 200, answer.text
                debit = ok(card, bytes.fromhex(answer.json()["authorisation"]["debit_apdu"]))
                gate = threading.Barrier(2)

                def capture(pid: str = payment["id"], body: bytes = debit) -> int:
                    gate.wait(timeout=30)
                    return terminal.post(
                        f"/v1/payments/{pid}/capture", {"debit_response": body.hex()}
                    ).status_code

                with ThreadPoolExecutor(2) as pool:
                    outcomes.append(sorted(pool.map(lambda _: capture(), range(2))))
            assert outcomes == [[200, 409]] * 5, outcomes
            with server.factory() as session:
                report = ledger.check(session)
                assert report.ok, report.problems
                merchant = session.scalars(
                    select(Account).where(Account.id.startswith("merchant:"))
                ).one()
                assert merchant.balance == 5 * 300
            assert card.state.balance == 5_000 - 5 * 300
        row.observed = "5 races: 200 + 409 each; merchant 1500 = 5 × 300; ledger check ok"


# --- refunds and top-ups by a hostile merchant -----------------------------------------


def test_refunds_beyond_the_captured_amount_are_refused(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "merchant refunds more than captured (at once, in parts), an unpaid or another's payment",
        expected="422 amount_too_large / 409 invalid_payment_state / 404, logged; ledger unchanged",
    ) as row:
        card = world.funded_card(5_000)
        paid = world.terminal.purchase(card, 1_000)
        unpaid = world.terminal.create_payment(100)
        refund = "/v1/refunds"
        mine = world.auth(world.merchant_key)
        assert world.client.post(
            refund, json={"payment": paid["id"], "amount": 600}, headers=mine
        ).is_success
        before = books(world)
        attempts = [
            ({"payment": paid["id"], "amount": 1_001}, mine, 422, "amount_too_large"),
            ({"payment": paid["id"], "amount": 401}, mine, 422, "amount_too_large"),
            ({"payment": unpaid["id"], "amount": 50}, mine, 409, "invalid_payment_state"),
            (
                {"payment": paid["id"], "amount": 1},
                world.auth(world.other_key),
                404,
                "resource_missing",
            ),
        ]
        for body, headers, status, code in attempts:
            with structlog.testing.capture_logs() as events:
                answer = world.client.post(refund, json=body, headers=headers)
            problem(answer, status, code)
            logged(events, event="http.problem", code=code)
        assert books(world) == before
        row.observed = "422, 422, 409, 404; refunded 600 of 1000 only; ledger unchanged"


def test_a_merchants_cash_top_ups_draw_only_its_own_prepaid_float(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "compromised merchant server tops up a card with 'cash' it never collected",
        expected="drawn from that merchant's own prepaid float (float:<merchant>); nothing else"
        " moves (attacks_funding: beyond the float 409 insufficient_float)",
    ) as row:
        card = world.issue()
        with world.factory() as session:
            before = {a.id: a.balance for a in session.scalars(select(Account))}
        world.terminal.load(card, 10_000)  # only the merchant's API key, no cash
        with world.factory() as session:
            after = {a.id: a.balance for a in session.scalars(select(Account))}
        moved = {
            k: after.get(k, 0) - before.get(k, 0)
            for k in after
            if after.get(k, 0) != before.get(k, 0)
        }
        card_account = next(k for k in moved if k.startswith("card:"))
        assert moved == {ledger.float_account(world.merchant_id): -10_000, card_account: 10_000}
        assert books(world).cards[card.state.issuer.card_number][1] == 10_000
        row.observed = "float:<merchant> -10000 -> card +10000; nothing else moved; ledger check ok"


@BOTH
def test_a_fabricated_initialize_cannot_cancel_another_merchants_debit(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "relay fabricates an INITIALIZE (old counter, new random) to release another merchant's"
        " uncertain payment whose debit happened" + on(world),
        expected="that payment stays uncertain (theirs is only linked to it); the card's proof"
        " captures it and releases theirs",
    ) as row:
        card = world.funded_card(5_000)
        payment, debit = authorised(world, card, 1_000)
        ok(card, debit)  # the card paid; the answer is lost
        assert world.terminal.post(f"/v1/payments/{payment['id']}/uncertain").is_success
        issuer = read_issuer(card)
        honest = InitializeForPurchaseResponse(
            balance=5_000,
            offline_counter=0,
            overdraft_limit=0,
            key_version=card.state.keys[0].version,
            algorithm_id=0,
            random=b"\x0f\x0e\x0d\x0c",
        )
        other = world.other_terminal
        theirs = other.create_payment(100)
        with structlog.testing.capture_logs() as events:
            answer = other.authorise_payment(theirs["id"], issuer, honest.to_data())
        status = payment_status(world, payment["id"])
        assert status == "uncertain", f"{answer.status_code}; the real debit's payment is {status}"
        # Theirs may proceed (linked), but its MAC1 binds counter 0 and the card is at 1.
        assert answer.status_code == 200, answer.text
        logged(events, event="payment.supersedes", uncertain=payment["id"])
        with world.factory() as session:
            held = ledger.balance(session, ledger.HELD_PURCHASES)
            assert held == 1_100  # both holds stand until the card's proof settles them
        # The card's next contact at the first merchant is told to recover its own payment
        # (not the other merchant's), and the card's proof captures it and releases theirs.
        again = world.terminal.create_payment(100)
        issuer2, init2 = world.terminal.purchase_batch1(card, 100)
        declined = world.terminal.authorise_payment(again["id"], issuer2, init2)
        body = problem(declined, 402, "card_declined", "recovery_required")
        assert body["recover"] == {
            "transaction_type": "06",
            "counter": 0,
            "payment_id": payment["id"],
        }
        fresh = ok(card, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())
        proof_data, sw = prove(card, 0x06, 1)
        assert sw == StatusWord.SUCCESS
        resolved = world.terminal.post(
            f"/v1/payments/{payment['id']}/resolve",
            {"initialize_response": fresh.hex(), "prove_response": proof_data.hex()},
        )
        assert resolved.status_code == 200 and resolved.json()["status"] == "succeeded"
        theirs_now = other.http.get(
            f"/v1/payments/{theirs['id']}", headers=world.auth(world.other_key)
        ).json()
        assert theirs_now["status"] == "canceled"
        after = books(world)
        assert after.accounts.get("held:purchases", 0) == 0
        assert after.accounts[f"merchant:{world.merchant_id}"] == 1_000
        assert after.cards[card.state.issuer.card_number][1:4] == (4_000, 1, 1)
        assert card.state.balance == 4_000
        assert after.cards[card.state.issuer.card_number][4] is None
        row.observed = (
            "stays uncertain; theirs authorised (linked, held 1100); own recover hint; proof"
            " → succeeded, theirs canceled; card 4000 = shadow"
        )
