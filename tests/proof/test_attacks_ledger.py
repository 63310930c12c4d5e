"""Attacks on the one-transfer purchase ledger (issue 20): the hold is the payment's status.

A purchase posts one transfer, ``card:<id> → merchant:<id>``, at capture; authorise,
release, expiry and cancel post nothing, and ``held:purchases`` and each card's account are
derived from the open payments (``ledger.balance``, ``ledger.available``). These scenarios
try to make a card hold or spend more than its ledger value, capture one value twice, get
clearing to pay out a held amount, or hide a tampered hold from ``webpurse ledger check``:
on SQLite and PostgreSQL through settlement's HTTP API with the card emulator, and with
real threads on their own PostgreSQL connections where concurrency is the point. Each
scenario ends with the invariants (:func:`tests.proof.invariants.check_invariants`).
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from tests.proof.conftest import Proof
from tests.proof.invariants import InvariantReport, check_invariants, ledger_check_cli
from tests.settlement.support import (
    BACKENDS,
    Terminal,
    World,
    database_url,
    live_server,
    make_world,
    ok,
    prove,
    read_issuer,
    seed_float,
)
from webpurse.card import CardApplet
from webpurse.protocol.commands import InitializeForPurchaseResponse
from webpurse.settlement import clearing, holds, ledger, payments
from webpurse.settlement.auth import MERCHANT, OPERATOR, Principal
from webpurse.settlement.merchants import create_merchant
from webpurse.settlement.models import Entry, Merchant, Payment, Transfer
from webpurse.settlement.schemas import CardHeal, PurchaseAuthorise, PurchaseCapture
from webpurse.settlement.service import Ctx

SUITE = "attacks_ledger"


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


@pytest.fixture
def pg_world(tmp_path: Path) -> Iterator[World]:
    with database_url("postgresql", tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def backend(world: World) -> str:
    return "PostgreSQL" if world.url.startswith("postgresql") else "SQLite"


def invariants(world: World, cards: list[CardApplet], *, settled: bool = True) -> InvariantReport:
    return check_invariants(world.factory, world.url, cards, settled=settled)


def post(world: World, path: str, body: Any = None, key: str | None = None) -> httpx.Response:
    return world.client.post(path, json=body or {}, headers=world.auth(key or world.merchant_key))


def get(world: World, path: str, key: str | None = None) -> Any:
    return world.client.get(path, headers=world.auth(key or world.merchant_key)).json()


def sweep(world: World) -> dict[str, Any]:
    answer = world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def forged_initialize(world: World, card: CardApplet, balance: int, counter: int) -> bytes:
    """An INITIALIZE FOR PURCHASE answer an attacker predicts (it carries no MAC)."""
    _, real = world.terminal.purchase_batch1(card, 0)
    return InitializeForPurchaseResponse(
        balance=balance,
        offline_counter=counter,
        overdraft_limit=0,
        key_version=InitializeForPurchaseResponse.from_data(real).key_version,
        algorithm_id=0,
        random=bytes.fromhex("A5A5A5A5"),
    ).to_data()


def authorised(terminal: Terminal, card: CardApplet, amount: int) -> tuple[str, bytes]:
    """Create and authorise a purchase on the card: (payment id, its DEBIT APDU)."""
    payment = terminal.create_payment(amount)
    issuer, init = terminal.purchase_batch1(card, amount)
    answer = terminal.authorise_payment(payment["id"], issuer, init)
    assert answer.status_code == 200, answer.text
    return payment["id"], bytes.fromhex(answer.json()["authorisation"]["debit_apdu"])


def capture(terminal: Terminal, payment_id: str, debit_response: bytes) -> httpx.Response:
    return terminal.post(
        f"/v1/payments/{payment_id}/capture", {"debit_response": debit_response.hex()}
    )


def transfers_of(world: World, payment_id: str) -> list[str]:
    with world.factory() as session:
        return list(session.scalars(select(Transfer.kind).where(Transfer.reference == payment_id)))


def card_id_of(world: World, payment_id: str) -> str:
    with world.factory() as session:
        payment = session.get(Payment, payment_id)
        assert payment is not None and payment.card_id is not None
        return payment.card_id


def available(world: World, card_id: str) -> int:
    with world.factory() as session:
        return ledger.available(session, [card_id])[card_id].amount


# --- a load and a refund while a purchase hold is open ---------------------------------


def test_a_load_and_a_refund_while_a_hold_is_open_neither_free_nor_lose_it(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"shop A holds 400 of a 500 card; a refund of an earlier purchase is issued and shop B"
        f" tops the card up while the hold is open ({backend(world)})",
        expected="the top-up and the refund's delivery wait for the card (recovery_required);"
        " the hold still covers 400 (available 100); after the capture both go through once;"
        " card = ledger = shadow; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 600)
        earlier = world.terminal.purchase(card, 100)
        held_id, debit = authorised(world.terminal, card, 400)
        debited = ok(card, debit)  # the card paid; the capture has not arrived yet
        card_id = card_id_of(world, held_id)
        assert available(world, card_id) == 100
        refund = post(world, "/v1/refunds", {"payment": earlier["id"]})
        assert refund.status_code == 201, refund.text
        refund_load = get(world, f"/v1/loads/{refund.json()['load']}")
        topup = world.other_terminal.create_load(250)
        issuer, init = world.other_terminal.load_batch1(card, 250, topup["terminal_id"])
        blocked = world.other_terminal.post(
            f"/v1/loads/{topup['id']}/authorise",
            {
                "issuer_data": issuer.hex(),
                "initialize_response": init.hex(),
                "terminal_id": topup["terminal_id"],
            },
        )
        assert blocked.status_code == 402, blocked.text
        assert blocked.json()["decline_code"] == "recovery_required"
        with world.factory() as session:
            assert ledger.balance(session, ledger.HELD_PURCHASES) == 400
            assert ledger.balance(session, ledger.card_account(card_id)) == 100
        assert available(world, card_id) == 100  # the refund is not on the card yet
        answer = capture(world.terminal, held_id, debited)
        assert answer.status_code == 200 and answer.json()["status"] == "succeeded", answer.text
        world.terminal.run_load(card, refund_load)
        world.other_terminal.load(card, 250)
        assert card.state.balance == 600 - 100 - 400 + 100 + 250
        assert available(world, card_id) == card.state.balance
        assert transfers_of(world, held_id) == ["purchase_capture"]
        report = invariants(world, [card])
        row.observed = (
            f"top-up during the hold {blocked.status_code} {blocked.json()['decline_code']};"
            f" available 100 while held; after capture refund and top-up went through, card"
            f" {card.state.balance}; {report.summary()}"
        )


# --- a released payment the card proves, when its value is held elsewhere ---------------


def test_healing_a_released_debit_cannot_capture_value_another_hold_covers(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"shop A debits 500 of a 500 card for real, releases it with a forged 'counter"
        f" unchanged', then holds the same 500 again on a forged INITIALIZE; shop B heals"
        f" with the card's PROVE ({backend(world)})",
        expected="the heal is refused (409 ledger_refused) while the forged hold covers the"
        " value: one value is never captured twice; after the sweep releases the forged hold"
        " the heal captures the real debit once; card = ledger = shadow 0; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        real_id, debit = authorised(world.terminal, card, 500)
        ok(card, debit)  # the real debit: the card holds 0 now
        assert post(world, f"/v1/payments/{real_id}/uncertain").status_code == 200
        released = post(
            world,
            f"/v1/payments/{real_id}/resolve",
            {"initialize_response": forged_initialize(world, card, 500, 0).hex()},
        )
        assert released.json()["status"] == "canceled", released.text
        card_id = card_id_of(world, real_id)
        assert available(world, card_id) == 500  # the ledger believes the forgery
        again = world.terminal.create_payment(500)
        hold = world.terminal.authorise_payment(
            again["id"], read_issuer(card), forged_initialize(world, card, 500, 0)
        )
        assert hold.status_code == 200, hold.text  # a fresh payment: not the released one
        assert available(world, card_id) == 0
        proof_data, sw = prove(card, 0x06, 1)
        assert sw == 0x9000
        body = {
            "issuer_data": read_issuer(card).hex(),
            "transaction_type": "06",
            "prove_response": proof_data.hex(),
        }
        refused = world.other_terminal.post("/v1/heal", body)
        assert refused.status_code == 409 and refused.json()["code"] == "ledger_refused", (
            refused.text
        )
        assert transfers_of(world, real_id) == []
        world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(seconds=1))
        sweep(world)
        assert get(world, f"/v1/payments/{again['id']}")["status"] == "canceled"
        healed = world.other_terminal.post("/v1/heal", body)
        assert healed.status_code == 200, healed.text
        assert get(world, f"/v1/payments/{real_id}")["status"] == "succeeded"
        assert world.other_terminal.post("/v1/heal", body).status_code != 200  # once
        assert transfers_of(world, real_id) == ["purchase_capture"]
        assert transfers_of(world, again["id"]) == []
        assert card.state.balance == 0 and available(world, card_id) == 0
        report = invariants(world, [card])
        row.observed = (
            f"heal while the forged hold stood: {refused.status_code}"
            f" {refused.json()['code']}; after the sweep: healed once (A's 500 succeeded, one"
            f" capture), a second heal {world.other_terminal.post('/v1/heal', body).status_code};"
            f" {report.summary()}"
        )


# --- a hostile merchant's capture after the release ------------------------------------


def test_a_capture_after_the_release_or_with_a_forged_mac2_posts_nothing(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"shop A captures a released payment with its real (stale) DEBIT answer, and an open"
        f" one with a forged MAC2/TAC ({backend(world)})",
        expected="409 invalid_payment_state and 402 verification_failed; no transfer; the"
        " released value stays the card's; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        first, debit = authorised(world.terminal, card, 300)
        stale = ok(card, debit)  # the card paid; A keeps the answer and releases instead
        assert post(world, f"/v1/payments/{first}/uncertain").status_code == 200
        released = post(
            world,
            f"/v1/payments/{first}/resolve",
            {"initialize_response": forged_initialize(world, card, 500, 0).hex()},
        )
        assert released.json()["status"] == "canceled"
        late = capture(world.terminal, first, stale)
        assert late.status_code == 409 and late.json()["code"] == "invalid_payment_state"
        assert transfers_of(world, first) == []
        # The card heals A's real debit (its PROVE) before its next purchase.
        proof_data, _ = prove(card, 0x06, 1)
        healed = world.other_terminal.post(
            "/v1/heal",
            {
                "issuer_data": read_issuer(card).hex(),
                "transaction_type": "06",
                "prove_response": proof_data.hex(),
            },
        )
        assert healed.status_code == 200, healed.text
        second, debit = authorised(world.terminal, card, 150)
        forged = bytes(8)  # TAC and MAC2 of zeros, the card never ran the DEBIT
        bad = capture(world.terminal, second, forged)
        assert bad.status_code == 402 and bad.json()["code"] == "verification_failed", bad.text
        assert transfers_of(world, second) == []
        answer = capture(world.terminal, second, ok(card, debit))
        assert answer.status_code == 200, answer.text
        assert card.state.balance == 50
        report = invariants(world, [card])
        row.observed = (
            f"stale capture {late.status_code} {late.json()['code']}; forged MAC2"
            f" {bad.status_code} {bad.json()['code']}; the real debits captured once each;"
            f" {report.summary()}"
        )


# --- clearing while holds are open -----------------------------------------------------


def test_clearing_never_pays_out_a_held_amount(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"clearing runs for shop A while A holds 300 authorised and 200 uncertain on two"
        f" cards ({backend(world)})",
        expected="the day's payout is the 100 captured only; the held 500 stays on"
        " held:purchases; captured the next day, it is paid out then; ledger check ok",
    ) as row:
        one, two = world.issue(), world.issue()
        world.other_terminal.load(one, 400)  # funded by shop B: A sold no top-up
        world.other_terminal.load(two, 200)
        world.terminal.purchase(one, 100)
        open_id, open_debit = authorised(world.terminal, one, 300)
        open_answer = ok(one, open_debit)
        unsure_id, unsure_debit = authorised(world.terminal, two, 200)
        unsure_answer = ok(two, unsure_debit)
        assert post(world, f"/v1/payments/{unsure_id}/uncertain").status_code == 200
        world.clock.advance(dt.timedelta(days=1))
        day = clearing.business_day_of(world.clock.now - dt.timedelta(days=1))
        with world.factory() as session, session.begin():
            first = clearing.run_batch(session, world.merchant_id, day, world.clock.now).batch
            assert first.payout == 100
            assert ledger.balance(session, ledger.HELD_PURCHASES) == 500
        for payment_id, answer in ((open_id, open_answer), (unsure_id, unsure_answer)):
            done = capture(world.terminal, payment_id, answer)
            assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
        world.clock.advance(dt.timedelta(days=1))
        day2 = clearing.business_day_of(world.clock.now - dt.timedelta(days=1))
        with world.factory() as session, session.begin():
            second = clearing.run_batch(session, world.merchant_id, day2, world.clock.now).batch
            assert second.payout == 500
            assert ledger.balance(session, ledger.merchant_account(world.merchant_id)) == 0
            assert ledger.balance(session, ledger.HELD_PURCHASES) == 0
        report = invariants(world, [one, two])
        row.observed = (
            f"payout with 500 held: {first.payout}; after the captures: {second.payout};"
            f" {report.summary()}"
        )


# --- real concurrency on PostgreSQL ----------------------------------------------------


@pytest.mark.postgres
def test_two_merchants_racing_to_hold_one_card_hold_no_more_than_it_has(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "two merchants authorise 500 each at once on a 1000 card that already holds 400"
        " uncertain: available 600 covers either, not both (PostgreSQL, real uvicorn, two"
        " threads, 3 rounds)",
        expected="each round exactly one authorisation 200, the other refused; the open holds"
        " never exceed the card's account; nothing captured; ledger check ok",
    ) as row:
        rounds: list[list[int]] = []
        with (
            database_url("postgresql", tmp_path, migrated=True) as url,
            live_server(url, tmp_path) as server,
            httpx.Client(base_url=server.base_url, timeout=60) as http,
        ):
            with server.factory() as session, session.begin():
                now = dt.datetime.now(dt.UTC)
                other, other_key = create_merchant(session, "Shop B", now)
                seed_float(session, other.id, 100_000, now)
                other_terminal_id = other.terminal_id
            shops = [
                Terminal(http, server.merchant_key, server.terminal_id),
                Terminal(http, other_key, other_terminal_id),
            ]
            card = server.issue()
            shops[0].load(card, 1_000)
            for _round in range(3):
                unsure = shops[0].create_payment(400)
                issuer, init = shops[0].purchase_batch1(card, 400)
                assert shops[0].authorise_payment(unsure["id"], issuer, init).status_code == 200
                assert shops[0].post(f"/v1/payments/{unsure['id']}/uncertain").status_code == 200
                racers = [shop.create_payment(500) for shop in shops]
                inits = [shop.purchase_batch1(card, 500) for shop in shops]
                gate = threading.Barrier(2)

                def authorise(i: int, racers: Any = racers, inits: Any = inits) -> Any:
                    gate.wait(timeout=30)
                    return shops[i].authorise_payment(racers[i]["id"], *inits[i])

                with ThreadPoolExecutor(2) as pool:
                    answers = list(pool.map(authorise, range(2)))
                codes = sorted(a.status_code for a in answers)
                rounds.append(codes)
                assert codes[0] == 200 and codes[1] != 200, [a.text for a in answers]
                with server.factory() as session:
                    card_id = session.scalars(
                        select(Payment.card_id).where(Payment.id == unsure["id"])
                    ).one()
                    assert card_id is not None
                    held = ledger.open_holds_by_card(session).get(card_id, 0)
                    stored = session.scalar(
                        select(func.sum(Entry.amount)).where(
                            Entry.account_id == ledger.card_account(card_id)
                        )
                    )
                    assert held <= int(stored or 0) == 1_000, (held, stored)
                    assert ledger.check(session).ok
                # Nothing was debited: each open payment resolves to canceled on the card.
                for i, racer in enumerate(racers):
                    if answers[i].status_code != 200:
                        continue
                    shops[i].post(f"/v1/payments/{racer['id']}/uncertain")
                    _, fresh = shops[i].purchase_batch1(card, 0)
                    done = shops[i].post(
                        f"/v1/payments/{racer['id']}/resolve",
                        {"initialize_response": fresh.hex()},
                    )
                    assert done.json()["status"] == "canceled", done.text
                _, fresh = shops[0].purchase_batch1(card, 0)
                done = shops[0].post(
                    f"/v1/payments/{unsure['id']}/resolve", {"initialize_response": fresh.hex()}
                )
                assert done.status_code in (200, 409), done.text  # released with its successor
                with server.factory() as session:
                    status = session.get(Payment, unsure["id"]).status  # type: ignore[union-attr]
                    assert status == "canceled"
            report = check_invariants(server.factory, server.url, [card], settled=True)
        row.observed = f"rounds (status codes) {rounds}; {report.summary()}"


def _principal(world: World, terminal_id: str | None) -> Principal:
    if terminal_id is None:
        return Principal(role=OPERATOR, key_id="test")
    with world.factory() as session:
        merchant = session.query(Merchant).filter_by(terminal_id=terminal_id).one()
        return Principal(role=MERCHANT, key_id="test", merchant_id=merchant.id)


def _together(world: World, calls: dict[str, tuple[str | None, Callable[[Ctx], Any]]]) -> Any:
    """Run each call in its own thread and PostgreSQL transaction, released at once."""
    gate = threading.Barrier(len(calls))
    outcomes: dict[str, Any] = {}

    def run(name: str, terminal_id: str | None, call: Callable[[Ctx], Any]) -> None:
        principal = _principal(world, terminal_id)
        gate.wait(timeout=30)
        try:
            with world.factory() as session, session.begin():
                outcomes[name] = call(Ctx(session, world.security, world.clock(), principal))
        except Exception as exc:  # the outcome is what the test is about
            outcomes[name] = exc

    threads = [threading.Thread(target=run, args=(n, *c)) for n, c in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


@pytest.mark.postgres
def test_the_expiry_sweep_racing_a_capture_settles_the_debit_once(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "the expiry sweep and the capture of a stale hold run at once, each in its own"
        " PostgreSQL transaction (4 rounds)",
        expected="either the capture wins (the sweep skips it) or the sweep releases it and"
        " the capture is refused, then the card's PROVE heals it: each debit captured exactly"
        " once, never released and captured; card = ledger = shadow; ledger check ok",
    ) as row:
        card = world.funded_card(2_000)
        ttl = world.settings.card_hold_ttl
        seen: list[str] = []
        for _round in range(4):
            payment_id, debit = authorised(world.terminal, card, 300)
            answer = ok(card, debit)
            world.clock.advance(ttl + dt.timedelta(seconds=1))
            body = PurchaseCapture(debit_response=answer.hex())

            def capture_it(ctx: Ctx, pid: str = payment_id, body: PurchaseCapture = body) -> str:
                return payments.capture(ctx, pid, body).status

            outcomes = _together(
                world,
                {
                    "sweep": (None, lambda ctx: holds.release_stale(ctx, ttl)),
                    "capture": (world.terminal_id, capture_it),
                },
            )
            if outcomes["capture"] == "succeeded":
                assert outcomes["sweep"] == (0, 0), outcomes
                seen.append("capture first")
            else:
                assert outcomes["sweep"] == (1, 0), outcomes
                assert getattr(outcomes["capture"], "code", None) == "invalid_payment_state"
                seen.append("sweep first")
                counter = card.state.offline_counter
                proof_data, _ = prove(card, 0x06, counter)
                healed = world.other_terminal.post(
                    "/v1/heal",
                    {
                        "issuer_data": read_issuer(card).hex(),
                        "transaction_type": "06",
                        "prove_response": proof_data.hex(),
                    },
                )
                assert healed.status_code == 200, healed.text
            assert get(world, f"/v1/payments/{payment_id}")["status"] == "succeeded"
            assert transfers_of(world, payment_id) == ["purchase_capture"]
        assert card.state.balance == 2_000 - 4 * 300
        report = invariants(world, [card])
        row.observed = f"rounds: {seen}; {report.summary()}"


# --- a tampered payment row -------------------------------------------------------------


def _check(world: World) -> tuple[int, str]:
    """``webpurse ledger check``: its exit code and its output with the lines rejoined."""
    code, output = ledger_check_cli(world.url)
    return code, " ".join(output.split())


def _tamper(world: World, payment_id: str, status: str) -> None:
    with world.factory() as session, session.begin():
        session.execute(update(Payment).where(Payment.id == payment_id).values(status=status))


def test_a_payment_status_flipped_by_sql_is_reported_by_the_ledger_check(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"an insider flips payment statuses by SQL: an authorised hold to canceled (the hold"
        f" vanishes), a captured payment back to authorised, a canceled one over the card's"
        f" value to authorised ({backend(world)})",
        expected="`webpurse ledger check` exits 1 naming each: the card's open transaction"
        " not open, an open payment already captured, open holds exceeding the card;"
        " flipped back, it exits 0",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        paid = world.terminal.purchase(card, 100)["id"]
        held, debit = authorised(world.terminal, card, 300)
        debited = ok(card, debit)
        card_id = card_id_of(world, held)
        code, output = _check(world)
        assert code == 0, output
        found: list[str] = []
        for payment_id, status, back, problem in (
            (held, "canceled", "authorised", f"open transaction {held} is canceled"),
            (paid, "authorised", "succeeded", f"payment {paid} is authorised but captured"),
        ):
            _tamper(world, payment_id, status)
            code, output = _check(world)
            assert code == 1 and problem in output, output
            found.append(problem)
            _tamper(world, payment_id, back)
            assert _check(world)[0] == 0
        done = capture(world.terminal, held, debited)
        assert done.status_code == 200, done.text
        # A payment the card never covered: canceled at 1000, flipped to authorised.
        big = world.terminal.create_payment(1_000)
        issuer, init = world.terminal.purchase_batch1(card, 0)
        refused = world.terminal.authorise_payment(big["id"], issuer, init)
        assert refused.status_code in (402, 409), refused.text
        with world.factory() as session, session.begin():
            session.execute(
                update(Payment)
                .where(Payment.id == big["id"])
                .values(status="authorised", card_id=card_id)
            )
        code, output = _check(world)
        problem = f"card:{card_id}: open holds 1000 exceed its balance 100"
        assert code == 1 and problem in output, output
        found.append(problem)
        _tamper(world, big["id"], "declined")
        report = invariants(world, [card])
        row.observed = f"ledger check exit 1 naming: {found}; restored: {report.summary()}"


# --- the batch path and the single path on one card ---------------------------------------


def _batch(world: World, items: list[dict[str, Any]], key: str | None = None) -> list[Any]:
    answer = post(world, "/v1/batch", {"requests": items}, key)
    assert answer.status_code == 200, answer.text
    return list(answer.json()["responses"])


def _batch_authorise(terminal: Terminal, payment_id: str, card: CardApplet, amount: int) -> Any:
    issuer, init = terminal.purchase_batch1(card, amount)
    return {
        "path": f"/v1/payments/{payment_id}/authorise",
        "body": {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": terminal.terminal_id,
        },
    }


def _batch_capture(payment_id: str, debit_response: bytes) -> Any:
    return {
        "path": f"/v1/payments/{payment_id}/capture",
        "body": {"debit_response": debit_response.hex()},
    }


def test_the_batch_and_single_paths_on_one_card_never_hold_more_than_it_has(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"one card through both paths: a batch hold then a single authorise, a single"
        f" uncertain hold then batch authorisations that would overdraw it ({backend(world)})",
        expected="the single authorise during the batch hold: 402 recovery_required; a batch"
        " authorise the available value cannot cover: 402 recovery_required as one by one; one"
        " that it covers supersedes the uncertain hold and its capture releases it; card ="
        " ledger = shadow; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        first = world.terminal.create_payment(400)["id"]
        (held,) = _batch(world, [_batch_authorise(world.terminal, first, card, 400)])
        assert held["status"] == 200, held
        debited = ok(card, bytes.fromhex(held["body"]["authorisation"]["debit_apdu"]))
        intruder = world.other_terminal.create_payment(300)
        issuer, init = world.other_terminal.purchase_batch1(card, 0)
        single = world.other_terminal.authorise_payment(intruder["id"], issuer, init)
        assert single.status_code == 402 and single.json()["decline_code"] == "recovery_required"
        (captured,) = _batch(world, [_batch_capture(first, debited)])
        assert captured["body"]["status"] == "succeeded", captured
        world.other_terminal.load(card, 500)  # the card holds 600
        unsure = world.other_terminal.create_payment(300)["id"]  # shop B's, left uncertain
        issuer, init = world.other_terminal.purchase_batch1(card, 300)
        assert world.other_terminal.authorise_payment(unsure, issuer, init).status_code == 200
        assert (
            post(world, f"/v1/payments/{unsure}/uncertain", key=world.other_key).status_code == 200
        )
        card_id = card_id_of(world, unsure)
        assert available(world, card_id) == 300
        too_much = world.terminal.create_payment(400)["id"]
        item = _batch_authorise(world.terminal, too_much, card, 400)
        (refused,) = _batch(world, [item])
        # The uncertain 300 still holds part of the value: settle it first (the decision reads
        # the card's derived account, as the available check does).
        assert refused["status"] == 402, refused
        assert refused["body"]["decline_code"] == "recovery_required", refused
        fits = world.terminal.create_payment(300)["id"]
        (superseding,) = _batch(world, [_batch_authorise(world.terminal, fits, card, 300)])
        assert superseding["status"] == 200, superseding
        assert available(world, card_id) == 0
        debit = bytes.fromhex(superseding["body"]["authorisation"]["debit_apdu"])
        (done,) = _batch(world, [_batch_capture(fits, ok(card, debit))])
        assert done["body"]["status"] == "succeeded", done
        assert get(world, f"/v1/payments/{unsure}", world.other_key)["status"] == "canceled"
        assert card.state.balance == 300 and available(world, card_id) == 300
        report = invariants(world, [card])
        row.observed = (
            f"single during the batch hold {single.status_code}"
            f" {single.json()['decline_code']}; batch over the available"
            f" {refused['status']} {refused['body']['decline_code']}; the covered one"
            f" superseded and released the uncertain hold; {report.summary()}"
        )


# --- an uncertain payment resolved after the card moved on ------------------------------


def test_an_uncertain_debit_settled_by_the_card_cannot_be_captured_again_later(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"shop A's real 300 debit goes uncertain and expires; the card is healed, loaded and"
        f" spends at shop B; then A resolves and captures its payment late ({backend(world)})",
        expected="B's top-up before the heal is declined; A's late resolve and capture are"
        " 409 invalid_payment_state; the debit is captured exactly once (by the heal);"
        " card = ledger = shadow; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        unsure, debit = authorised(world.terminal, card, 300)
        answer = ok(card, debit)  # the card paid; A never heard
        assert post(world, f"/v1/payments/{unsure}/uncertain").status_code == 200
        world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(seconds=1))
        sweep(world)
        assert get(world, f"/v1/payments/{unsure}")["decline_code"] == "hold_expired"
        card_id = card_id_of(world, unsure)
        assert available(world, card_id) == 500  # released: the ledger has not seen the debit
        topup = world.other_terminal.create_load(100)
        issuer, init = world.other_terminal.load_batch1(card, 100, topup["terminal_id"])
        early = world.other_terminal.post(
            f"/v1/loads/{topup['id']}/authorise",
            {
                "issuer_data": issuer.hex(),
                "initialize_response": init.hex(),
                "terminal_id": topup["terminal_id"],
            },
        )
        assert early.status_code == 402, early.text  # the card's balance is not the shadow's
        blocked = world.other_terminal.create_payment(50)
        issuer, init = world.other_terminal.purchase_batch1(card, 50)
        refused = world.other_terminal.authorise_payment(blocked["id"], issuer, init)
        recover = refused.json()["recover"]
        assert recover["heal"] is True, refused.text
        proof_data, _ = prove(card, 0x06, recover["counter"] + 1)
        healed = world.other_terminal.post(
            "/v1/heal",
            {
                "issuer_data": read_issuer(card).hex(),
                "transaction_type": recover["transaction_type"],
                "prove_response": proof_data.hex(),
            },
        )
        assert healed.status_code == 200, healed.text
        world.other_terminal.load(card, 100)
        world.other_terminal.purchase(card, 50)
        _, fresh = world.terminal.purchase_batch1(card, 0)
        late = post(
            world,
            f"/v1/payments/{unsure}/resolve",
            {"initialize_response": fresh.hex(), "prove_response": proof_data.hex()},
        )
        assert late.status_code == 409 and late.json()["code"] == "invalid_payment_state"
        again = capture(world.terminal, unsure, answer)
        assert again.status_code == 409 and again.json()["code"] == "invalid_payment_state"
        assert transfers_of(world, unsure) == ["purchase_capture"]
        assert card.state.balance == 500 - 300 + 100 - 50 == available(world, card_id)
        report = invariants(world, [card])
        row.observed = (
            f"top-up before the heal {early.status_code}; healed; late resolve"
            f" {late.status_code} and capture {again.status_code}"
            f" {again.json()['code']}; one capture; {report.summary()}"
        )


@pytest.mark.postgres
def test_a_heal_racing_a_forged_rehold_of_the_same_value_captures_it_at_most_once(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "shop A's real 500 debit released on a forged 'counter unchanged'; A re-holds the"
        " card's whole ledger value on a forged INITIALIZE while shop B heals with the card's"
        " PROVE, at once, each in its own PostgreSQL transaction (3 rounds)",
        expected="one wins: the heal captures the debit and the forged hold is declined, or the"
        " hold stands and the heal is refused (ledger_refused) until it expires; never both;"
        " the debit captured once; card = ledger = shadow; ledger check ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 1_500)
        seen: list[str] = []
        for _round in range(3):
            balance = card.state.balance
            counter = card.state.offline_counter
            real, debit = authorised(world.terminal, card, 500)
            ok(card, debit)
            assert post(world, f"/v1/payments/{real}/uncertain").status_code == 200
            forged = forged_initialize(world, card, balance, counter)
            released = post(
                world, f"/v1/payments/{real}/resolve", {"initialize_response": forged.hex()}
            )
            assert released.json()["status"] == "canceled", released.text
            rehold = world.terminal.create_payment(balance)["id"]  # all the ledger believes
            proof_data, _ = prove(card, 0x06, counter + 1)
            issuer = read_issuer(card)
            heal_body = CardHeal(
                issuer_data=issuer.hex(), transaction_type="06", prove_response=proof_data.hex()
            )
            hold_body = PurchaseAuthorise(
                issuer_data=issuer.hex(),
                initialize_response=forged_initialize(world, card, balance, counter).hex(),
                terminal_id=world.terminal_id,
            )
            outcomes = _together(
                world,
                {
                    "heal": (world.other_terminal_id, lambda ctx, b=heal_body: holds.heal(ctx, b)),
                    "hold": (
                        world.terminal_id,
                        lambda ctx, pid=rehold, b=hold_body: payments.authorise(ctx, pid, b).status,
                    ),
                },
            )
            heal_won = not isinstance(outcomes["heal"], Exception)
            hold_won = outcomes["hold"] == "authorised"
            assert heal_won != hold_won, outcomes
            if hold_won:
                # The service raises the ledger's refusal; the HTTP edge answers it as 409
                # ledger_refused (app.py, idempotency.py), which the re-heal below goes through.
                refused = outcomes["heal"]
                assert isinstance(refused, ledger.LedgerError) or (
                    getattr(refused, "code", None) == "ledger_refused"
                ), outcomes
                seen.append("hold first")
                world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(seconds=1))
                sweep(world)
                body = heal_body.model_dump(mode="json")
                healed = world.other_terminal.post("/v1/heal", body)
                assert healed.status_code == 200, healed.text
            else:
                seen.append("heal first")
            assert get(world, f"/v1/payments/{real}")["status"] == "succeeded"
            assert transfers_of(world, real) == ["purchase_capture"]
            assert transfers_of(world, rehold) == []
        assert card.state.balance == 0
        report = invariants(world, [card])
        row.observed = f"rounds: {seen}; {report.summary()}"
