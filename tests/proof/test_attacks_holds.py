"""Red-team attacks on issue 20's ``payment_holds`` (migration 0018): the open holds moved
out of the payments' status into their own table, written by a ``before_flush`` hook (the
ORM paths) and by the batch's set-based writes (the fast path), and ``awaiting_card``
replacing the status in ``ix_payments_merchant_open``.

The aim of each attack: a card that spends more than its value (a hold row missing, so
``available`` is too high), money stranded (a hold row that never ends, so the card stays
blocked), or hold rows that disagree with the payments while ``webpurse ledger check``
says nothing. Every step is judged by an oracle that does not read the new table: the
open payments by their status, and ``available`` recomputed from them.

Tried as a shopper's agent and a merchant walking every path that changes a payment's
status (authorise, uncertain, resolve both ways, supersede, capture, cancel, expiry of
``requires_card`` and ``authorised``, the hold sweep, an operator's release), a batch
(fast authorise and capture, authorise and capture of one payment in one batch, a fast
path refused late and run again per item, a replayed batch), concurrent batches on one
card (PostgreSQL), code that writes payments around the ORM unit of work (an ORM-enabled
``UPDATE``, ``bulk_update_mappings``), and a database tamperer. Rows go to the
``attacks_holds`` proof table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text, update

from tests.proof.conftest import Proof
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
from webpurse.protocol.commands import InitializeForPurchase
from webpurse.settlement import clearing, expiry, ledger
from webpurse.settlement.db import migrate
from webpurse.settlement.ledger import LedgerError
from webpurse.settlement.models import Account, Card, Payment, PaymentHold
from webpurse.settlement.transactions import OPEN

SUITE = "attacks_holds"


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path) as url, make_world(url) as w:
        yield w


@pytest.fixture
def pg_world(tmp_path: Path) -> Iterator[World]:
    with database_url("postgresql", tmp_path) as url, make_world(url) as w:
        yield w


def backend(world: World) -> str:
    return "PostgreSQL" if world.url.startswith("postgresql") else "SQLite"


def _problems(world: World) -> list[str]:
    with world.factory() as session:
        return list(clearing.ledger_check(session).problems)


def _agree(world: World) -> dict[str, int]:
    """The oracle: hold rows are exactly the open payments (by status), ``awaiting_card``
    exactly ``requires_card``, every card's ``available`` its balance less its open
    payments (summed from the payments, not the hold rows), and ``ledger check`` is silent.
    Returns each card's available value."""
    with world.factory() as session:
        open_payments = {
            row.id: (row.card_id, row.amount)
            for row in session.execute(
                select(Payment.id, Payment.card_id, Payment.amount).where(Payment.status.in_(OPEN))
            )
        }
        rows = {
            row.payment_id: (row.card_id, row.amount)
            for row in session.execute(
                select(PaymentHold.payment_id, PaymentHold.card_id, PaymentHold.amount)
            )
        }
        assert rows == open_payments
        disagree = [
            row.id
            for row in session.execute(select(Payment.id, Payment.status, Payment.awaiting_card))
            if row.awaiting_card is not (row.status == "requires_card")
        ]
        assert disagree == []
        card_ids = list(session.scalars(select(Card.id)))
        found = ledger.available(session, card_ids)
        for card_id in card_ids:
            balance = session.scalar(
                select(Account.balance).where(Account.id == ledger.card_account(card_id))
            )
            held = sum(amount for card, amount in open_payments.values() if card == card_id)
            assert found[card_id].amount == int(balance or 0) - held, card_id
    assert _problems(world) == []
    return {card_id: funds.amount for card_id, funds in found.items()}


def _status(world: World, payment_id: str) -> str:
    with world.factory() as session:
        return str(session.scalar(select(Payment.status).where(Payment.id == payment_id)))


def _authorised(world: World, card: CardApplet, amount: int) -> tuple[str, bytes]:
    payment = world.terminal.create_payment(amount)
    issuer, init = world.terminal.purchase_batch1(card, amount)
    answer = world.terminal.authorise_payment(payment["id"], issuer, init)
    assert answer.status_code == 200, answer.text
    return str(payment["id"]), bytes.fromhex(answer.json()["authorisation"]["debit_apdu"])


def _fresh_init(world: World, card: CardApplet) -> bytes:
    read_issuer(card)
    return ok(card, InitializeForPurchase(1, 0, bytes.fromhex(world.terminal_id)).to_apdu())


def _batch(world: World, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answer = world.client.post(
        "/v1/batch", json={"requests": items}, headers=world.auth(world.merchant_key)
    )
    assert answer.status_code == 200, answer.text
    return list(answer.json()["responses"])


def _authorise_item(world: World, card: CardApplet, payment_id: str, amount: int) -> dict[str, Any]:
    issuer, init = world.terminal.purchase_batch1(card, amount)
    return {
        "path": f"/v1/payments/{payment_id}/authorise",
        "idempotency_key": f"auth-{payment_id}",
        "body": {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": world.terminal_id,
        },
    }


# --- every path that changes a payment's status ------------------------------------------


def test_every_single_path_keeps_the_hold_rows_with_the_status(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"a shopper's agent and a merchant walk every single-endpoint path that changes a"
        f" payment's status: create, authorise, uncertain, resolve (debit never reached:"
        f" released; debit happened: captured from the proof), supersede of an uncertain one"
        f" by a purchase at its counter, capture, cancel of an authorised payment (refused)"
        f" and of a waiting one, an operator's release; the oracle after each step"
        f" ({backend(world)})",
        expected="after every step the hold rows are exactly the open payments, awaiting_card"
        " exactly requires_card, available = balance - open payments, ledger check silent",
    ) as row:
        steps: list[str] = []
        card = world.funded_card(1_000)
        waiting = world.terminal.create_payment(50)
        _agree(world)
        # authorise, uncertain, resolve: the DEBIT never reached the card
        first, _ = _authorised(world, card, 300)
        held = _agree(world)
        assert sorted(held.values()) == [700]
        assert world.terminal.post(f"/v1/payments/{first}/uncertain").json()["status"] == (
            "uncertain"
        )
        assert sorted(_agree(world).values()) == [700]
        resolved = world.terminal.post(
            f"/v1/payments/{first}/resolve", {"initialize_response": _fresh_init(world, card).hex()}
        )
        assert resolved.status_code == 200, resolved.text
        steps.append(f"resolve(never reached) -> {resolved.json()['status']}")
        assert sorted(_agree(world).values()) == [1_000]
        # authorise, DEBIT happened, uncertain, resolve with the card's proof
        second, debit = _authorised(world, card, 200)
        ok(card, debit)
        world.terminal.post(f"/v1/payments/{second}/uncertain")
        proof_data, sw = prove(card, 0x06, card.state.offline_counter)
        assert sw == 0x9000
        resolved = world.terminal.post(
            f"/v1/payments/{second}/resolve",
            {
                "initialize_response": _fresh_init(world, card).hex(),
                "prove_response": proof_data.hex(),
            },
        )
        assert resolved.status_code == 200, resolved.text
        steps.append(f"resolve(proof) -> {resolved.json()['status']}")
        assert sorted(_agree(world).values()) == [800]
        # supersede: an uncertain one at the counter a new purchase takes
        stale, _ = _authorised(world, card, 300)
        world.terminal.post(f"/v1/payments/{stale}/uncertain")
        _agree(world)
        paid = world.terminal.purchase(card, 100)
        steps.append(f"supersede -> new {paid['status']}, old {_status(world, stale)}")
        assert sorted(_agree(world).values()) == [700]
        # cancel an authorised payment and a waiting one
        third, _ = _authorised(world, card, 250)
        canceled = world.terminal.post(f"/v1/payments/{third}/cancel", {})
        assert canceled.status_code == 409, canceled.text  # resolved with the card instead
        steps.append(f"cancel authorised -> {canceled.json()['code']}")
        assert sorted(_agree(world).values()) == [450]
        resolved = world.terminal.post(
            f"/v1/payments/{third}/resolve", {"initialize_response": _fresh_init(world, card).hex()}
        )
        assert resolved.status_code == 200, resolved.text
        steps.append(f"resolve authorised (never reached) -> {resolved.json()['status']}")
        assert sorted(_agree(world).values()) == [700]
        canceled = world.terminal.post(f"/v1/payments/{waiting['id']}/cancel", {})
        steps.append(f"cancel waiting -> {canceled.json()['status']}")
        _agree(world)
        # an operator releases another card's open payment
        other = world.funded_card(500)
        fourth, _ = _authorised(world, other, 400)
        assert sorted(_agree(world).values()) == [100, 700]
        released = world.client.post(
            f"/v1/holds/{fourth}/release",
            json={"reason": "red team"},
            headers=world.auth(world.operator_key),
        )
        assert released.status_code == 200, released.text
        steps.append(f"operator release -> {_status(world, fourth)}")
        assert sorted(_agree(world).values()) == [500, 700]
        assert _status(world, first) == "canceled" and _status(world, second) == "succeeded"
        assert _status(world, stale) == "canceled"
        row.observed = "; ".join(steps) + "; oracle held at every step"


def test_the_sweeps_end_every_hold_they_should_and_no_other(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"time passes: the expiry sweep expires a waiting payment and marks an old authorised"
        f" one uncertain (found by its hold row's authorised_at), the hold sweep releases the"
        f" card it held past the bound; a younger hold and a captured payment are left alone"
        f" ({backend(world)})",
        expected="only the stale rows change; after each sweep the hold rows are the open"
        " payments, available = balance - open payments, ledger check silent",
    ) as row:
        old_card, young_card = world.funded_card(1_000), world.funded_card(1_000)
        waiting = world.terminal.create_payment(10)
        old, _ = _authorised(world, old_card, 600)
        world.terminal.purchase(young_card, 100)
        world.clock.advance(dt.timedelta(minutes=45))
        young, _ = _authorised(world, young_card, 200)
        _agree(world)
        report = expiry.sweep(
            world.factory,
            world.clock(),
            requires_card_ttl=dt.timedelta(minutes=30),
            authorised_ttl=dt.timedelta(minutes=2),
            card_hold_ttl=dt.timedelta(hours=1),
        )
        after_expiry = (_status(world, waiting["id"]), _status(world, old), _status(world, young))
        assert after_expiry == ("expired", "uncertain", "authorised")
        assert sorted(_agree(world).values()) == [400, 700]
        world.clock.advance(dt.timedelta(minutes=30))  # old: 75 min; young: 30 min
        expiry.sweep(
            world.factory,
            world.clock(),
            requires_card_ttl=dt.timedelta(minutes=30),
            authorised_ttl=dt.timedelta(hours=2),
            card_hold_ttl=dt.timedelta(hours=1),
        )
        after_release = (_status(world, old), _status(world, young))
        assert after_release == ("canceled", "authorised")
        assert sorted(_agree(world).values()) == [700, 1_000]
        row.observed = (
            f"first sweep: waiting/old/young {after_expiry} ({report}); hold sweep:"
            f" old/young {after_release}; oracle held"
        )


# --- batches -------------------------------------------------------------------------------


def test_batches_keep_the_hold_rows_fast_per_item_refused_and_replayed(
    world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    with proof.row(
        SUITE,
        f"a merchant's batches: three fast authorisations, then their fast captures; one"
        f" batch that authorises and captures the same payment (the capture runs per item);"
        f" a batch whose fast path is refused at its last statement (after its hold rows"
        f" were written) and runs again item by item; the same batch replayed with its keys"
        f" ({backend(world)})",
        expected="each batch answers as before; after each the hold rows are the open"
        " payments, available = balance - open payments, ledger check silent",
    ) as row:
        cards = [world.funded_card(1_000) for _ in range(3)]
        created = [world.terminal.create_payment(100 * (i + 1)) for i in range(3)]
        items = [
            _authorise_item(world, card, p["id"], p["amount"])
            for card, p in zip(cards, created, strict=True)
        ]
        answers = _batch(world, items)
        assert [(a["status"], a["body"]["status"]) for a in answers] == [(200, "authorised")] * 3
        assert sorted(_agree(world).values()) == [700, 800, 900]
        captures = [
            {
                "path": f"/v1/payments/{p['id']}/capture",
                "idempotency_key": f"cap-{p['id']}",
                "body": {
                    "debit_response": ok(
                        card, bytes.fromhex(a["body"]["authorisation"]["debit_apdu"])
                    ).hex()
                },
            }
            for card, p, a in zip(cards, created, answers, strict=True)
        ]
        assert [a["body"]["status"] for a in _batch(world, captures)] == ["succeeded"] * 3
        assert sorted(_agree(world).values()) == [700, 800, 900]
        # authorise and capture one payment in one batch: the capture's DEBIT answer is
        # not known before the authorisation, so the merchant replays a captured-looking
        # body; the per-item capture is refused, the hold stays and is counted
        payment = world.terminal.create_payment(50)
        same = _batch(
            world,
            [
                _authorise_item(world, cards[0], payment["id"], 50),
                {
                    "path": f"/v1/payments/{payment['id']}/capture",
                    "idempotency_key": f"cap-{payment['id']}",
                    "body": {"debit_response": "00" * 8},
                },
            ],
        )
        same_codes = [(a["status"], a["body"].get("code", a["body"].get("status"))) for a in same]
        assert same_codes[0] == (200, "authorised")
        assert sorted(_agree(world).values()) == [700, 800, 850]
        # refuse the fast path at its very end: its hold rows are rolled back with it
        refused_once: list[str] = []
        real = ledger.post_transfers

        def refuse_once(*args: Any, **kwargs: Any) -> Any:
            if not refused_once:
                refused_once.append("refused")
                raise LedgerError("red team: refused after the fast path's writes")
            return real(*args, **kwargs)

        monkeypatch.setattr(ledger, "post_transfers", refuse_once)
        more = [world.terminal.create_payment(10) for _ in range(2)]
        late = _batch(
            world,
            [
                _authorise_item(world, cards[1], more[0]["id"], 10),
                _authorise_item(world, cards[2], more[1]["id"], 10),
                {
                    "path": f"/v1/payments/{payment['id']}/capture",
                    "idempotency_key": f"cap2-{payment['id']}",
                    "body": {
                        "debit_response": ok(
                            cards[0], bytes.fromhex(same[0]["body"]["authorisation"]["debit_apdu"])
                        ).hex()
                    },
                },
            ],
        )
        monkeypatch.undo()
        assert refused_once == ["refused"]
        late_codes = [(a["status"], a["body"]["status"]) for a in late]
        assert late_codes == [(200, "authorised"), (200, "authorised"), (200, "succeeded")]
        assert sorted(_agree(world).values()) == [690, 790, 850]
        replayed = _batch(world, items)  # the first batch again, same keys and bodies
        assert [a["replayed"] for a in replayed] == [True] * 3
        assert sorted(_agree(world).values()) == [690, 790, 850]
        row.observed = (
            f"fast authorise x3, fast capture x3; authorise+capture one payment: {same_codes};"
            f" fast path refused late then per item: {late_codes}; first batch replayed:"
            f" {[a['status'] for a in replayed]} replayed; oracle held after each"
        )


def test_concurrent_batches_on_one_card_hold_at_most_its_value(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "a shopper's agent races two merchants' batches (one authorisation each, 700 and"
        " 600) on one card of 1000 at the same instant, on their own PostgreSQL connections",
        expected="at most one hold: the card's available never below zero; hold rows ="
        " open payments; ledger check silent",
    ) as row:
        card = world.funded_card(1_000)
        mine = world.terminal.create_payment(700)
        theirs = world.other_terminal.create_payment(600)
        # both read the card's INITIALIZE at the same counter (the shopper's agent replays it)
        issuer, init_mine = world.terminal.purchase_batch1(card, 700)
        _, init_theirs = world.other_terminal.purchase_batch1(card, 600)
        start = threading.Barrier(2)

        def send(key: str, terminal_id: str, payment_id: str, init: bytes) -> httpx.Response:
            start.wait(timeout=60)
            body = {
                "issuer_data": issuer.hex(),
                "initialize_response": init.hex(),
                "terminal_id": terminal_id,
            }
            return world.client.post(
                "/v1/batch",
                json={
                    "requests": [
                        {
                            "path": f"/v1/payments/{payment_id}/authorise",
                            "idempotency_key": f"race-{payment_id}",
                            "body": body,
                        }
                    ]
                },
                headers=world.auth(key),
            )

        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(send, world.merchant_key, world.terminal_id, mine["id"], init_mine),
                pool.submit(
                    send, world.other_key, world.other_terminal_id, theirs["id"], init_theirs
                ),
            ]
            answers = [f.result(timeout=120) for f in futures]
        outcomes = [
            (a.json()["responses"][0]["status"], a.json()["responses"][0]["body"].get("status"))
            for a in answers
        ]
        available = _agree(world)
        with world.factory() as session:
            holds = session.scalar(select(func.count()).select_from(PaymentHold))
        assert holds is not None and holds <= 1
        assert min(available.values()) >= 0
        row.observed = (
            f"answers {outcomes}; {holds} hold row(s); available {sorted(available.values())}"
        )


# --- writes around the unit of work, and a tamperer -----------------------------------------


def test_writes_around_the_flush_hook_are_reported_by_ledger_check(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"code (or a stolen database login) changes payments' status around the ORM unit"
        f" of work, where the before_flush hook does not run: an ORM-enabled UPDATE cancels"
        f" an authorised payment (its hold row stays: money stranded), bulk_update_mappings"
        f" makes a waiting payment authorised on a card (no hold row: spendable twice), raw"
        f" SQL flips awaiting_card ({backend(world)})",
        expected="`ledger check` reports each; after putting them back it is silent",
    ) as row:
        card = world.funded_card(1_000)
        authorised, _ = _authorised(world, card, 300)
        waiting = world.terminal.create_payment(200)
        _agree(world)
        with world.factory() as session:
            card_id = session.scalar(
                select(PaymentHold.card_id).where(PaymentHold.payment_id == authorised)
            )
        found: dict[str, list[str]] = {}
        with world.factory() as session, session.begin():
            session.execute(
                update(Payment).where(Payment.id == authorised).values(status="canceled")
            )
        found["ORM UPDATE"] = _problems(world)
        with world.factory() as session, session.begin():
            session.execute(
                update(Payment).where(Payment.id == authorised).values(status="authorised")
            )
            session.bulk_update_mappings(
                Payment,  # type: ignore[arg-type]
                [
                    {
                        "id": waiting["id"],
                        "status": "authorised",
                        "card_id": card_id,
                        "awaiting_card": False,
                    }
                ],
            )
        found["bulk_update_mappings"] = _problems(world)
        with world.factory() as session, session.begin():
            session.bulk_update_mappings(
                Payment,  # type: ignore[arg-type]
                [
                    {
                        "id": waiting["id"],
                        "status": "requires_card",
                        "card_id": None,
                        "awaiting_card": True,
                    }
                ],
            )
            session.execute(
                text("UPDATE payments SET awaiting_card = :f WHERE id = :p"),
                {"f": False, "p": waiting["id"]},
            )
        found["awaiting_card"] = _problems(world)
        with world.factory() as session, session.begin():
            session.execute(
                text("UPDATE payments SET awaiting_card = :t WHERE id = :p"),
                {"t": True, "p": waiting["id"]},
            )
        _agree(world)
        expected = {
            "ORM UPDATE": f"hold row for payment {authorised}, which is canceled",
            "bulk_update_mappings": f"payment {waiting['id']} is authorised but has no hold row",
            "awaiting_card": (
                f"payment {waiting['id']} is requires_card but its awaiting_card disagrees"
            ),
        }
        for what, message in expected.items():
            assert message in found[what], (what, found[what])
        row.observed = "; ".join(f"{what}: {found[what]}" for what in expected)


def test_ledger_check_notices_a_hold_row_that_would_never_be_swept(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"a database tamperer moves an authorised payment's hold row's authorised_at a year"
        f" ahead: the expiry and hold sweeps read the row's time, so the card would stay"
        f" held for good (money stranded) ({backend(world)})",
        expected="`ledger check` reports the row as differing from its payment",
    ) as row:
        card = world.funded_card(1_000)
        payment, _ = _authorised(world, card, 300)
        _agree(world)
        with world.factory() as session, session.begin():
            at = session.scalar(
                select(PaymentHold.authorised_at).where(PaymentHold.payment_id == payment)
            )
            assert at is not None
            session.execute(
                update(PaymentHold)
                .where(PaymentHold.payment_id == payment)
                .values(authorised_at=at + dt.timedelta(days=365))
            )
        world.clock.advance(dt.timedelta(hours=3))
        expiry.sweep(
            world.factory,
            world.clock(),
            requires_card_ttl=dt.timedelta(minutes=30),
            authorised_ttl=dt.timedelta(minutes=2),
            card_hold_ttl=dt.timedelta(hours=1),
        )
        swept = _status(world, payment)
        problems = _problems(world)
        row.observed = f"after 3 h and a sweep the payment is {swept}; check: {problems}"
        assert swept == "authorised"  # the sweeps trust the row: the tamper strands it
        assert problems == [f"hold row for payment {payment} differs from the payment"]


# --- the open-orders quota counts awaiting_card ---------------------------------------------


def test_the_open_orders_quota_counts_every_waiting_payment_however_made(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"a hostile merchant tries to open more waiting payments than its cap (3) by mixing"
        f" the batch's fast creates (Core rows, awaiting_card set by the batch) with single"
        f" creates, then frees room by authorising, canceling and letting one expire"
        f" ({backend(world)})",
        expected="the 4th waiting payment is refused (429) on both paths; each payment that"
        " stops waiting (authorised, canceled, expired) makes room for exactly one more",
    ) as row:
        client = world.client
        client.app.state.settlement.settings = dataclasses.replace(  # type: ignore[attr-defined]
            world.settings, max_open_orders=3
        )
        create = {"path": "/v1/payments", "body": {"amount": 100}}
        fast = _batch(world, [create, create])
        assert [a["status"] for a in fast] == [201, 201]
        single = world.terminal.create_payment(100)
        over_single = world.terminal.post("/v1/payments", {"amount": 100})
        over_batch = _batch(world, [create])
        codes = [over_single.status_code, over_batch[0]["status"]]
        assert codes == [429, 429]
        card = world.funded_card(1_000)
        batch_item = _authorise_item(world, card, fast[0]["body"]["id"], 100)
        assert _batch(world, [batch_item])[0]["body"]["status"] == "authorised"
        freed = [world.terminal.post("/v1/payments", {"amount": 100}).status_code]
        freed.append(world.terminal.post("/v1/payments", {"amount": 100}).status_code)
        assert freed == [201, 429]
        assert world.terminal.post(f"/v1/payments/{single['id']}/cancel", {}).status_code == 200
        freed.append(world.terminal.post("/v1/payments", {"amount": 100}).status_code)
        world.clock.advance(dt.timedelta(hours=1))
        expiry.sweep(
            world.factory,
            world.clock(),
            requires_card_ttl=dt.timedelta(minutes=30),
            authorised_ttl=dt.timedelta(hours=2),
            card_hold_ttl=dt.timedelta(hours=3),
        )
        after_expiry = [a["status"] for a in _batch(world, [create, create, create, create])]
        assert freed == [201, 429, 201]
        assert after_expiry == [201, 201, 201, 429]
        _agree(world)
        row.observed = (
            f"over the cap: single {codes[0]}, batch {codes[1]}; after an authorisation"
            f" {freed[:2]}, after a cancel {freed[2]}; after the sweep expired all 3 waiting,"
            f" a batch of 4 creates: {after_expiry}"
        )


def test_a_released_purchase_healed_from_its_proof_leaves_no_hold_behind(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"shop A's DEBIT ran but A left the payment uncertain; the hold sweep releases it at"
        f" the bound (its hold row ends); shop B's purchase on the card is asked for the proof,"
        f" heals A's payment (canceled -> succeeded, no hold row may come back) and goes"
        f" through ({backend(world)})",
        expected="the oracle holds after the release, the heal and B's purchase; the card's"
        " available value ends at its real balance",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        stuck, debit = _authorised(world, card, 200)
        ok(card, debit)  # the DEBIT ran; A never captured
        assert world.terminal.post(f"/v1/payments/{stuck}/uncertain").status_code == 200
        assert sorted(_agree(world).values()) == [300]
        world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(seconds=1))
        swept = world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
        assert swept.status_code == 200, swept.text
        released = _status(world, stuck)
        assert sorted(_agree(world).values()) == [500]  # released: the shadow says 500
        payment = world.other_terminal.create_payment(50)
        issuer, init = world.other_terminal.purchase_batch1(card, 50)
        asked = world.other_terminal.authorise_payment(payment["id"], issuer, init)
        assert asked.status_code == 402, asked.text
        recover = asked.json()["recover"]
        assert recover["heal"] is True and recover["transaction_type"] == "06"
        proof_data, sw = prove(card, 0x06, recover["counter"] + 1)
        assert sw == 0x9000
        healed = world.other_terminal.post(
            "/v1/heal",
            {
                "issuer_data": issuer.hex(),
                "transaction_type": "06",
                "prove_response": proof_data.hex(),
            },
        )
        assert healed.status_code == 200, healed.text
        healed_status = _status(world, stuck)
        assert healed_status == "succeeded"
        assert sorted(_agree(world).values()) == [300]
        issuer, init = world.other_terminal.purchase_batch1(card, 50)
        retry = world.other_terminal.authorise_payment(payment["id"], issuer, init)
        assert retry.status_code == 200, retry.text
        assert sorted(_agree(world).values()) == [250]
        row.observed = (
            f"released by the sweep: {released}; B asked to heal ({recover}); healed:"
            f" {healed_status}; B authorised; oracle held (available 300 then 250)"
        )


# --- the migration on a database the app has been writing ------------------------------------


def test_migration_0018_down_and_up_on_live_open_payments_rebuilds_the_same_holds(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"an operator rolls migration 0018 back and forward on a database the app wrote:"
        f" payments waiting, authorised (single and batch fast path), uncertain, captured,"
        f" released ({backend(world)})",
        expected="after down and up the hold rows (card, amount, time) and awaiting_card are"
        " what the app had written; available unchanged; ledger check silent",
    ) as row:
        cards = [world.funded_card(1_000) for _ in range(3)]
        world.terminal.create_payment(30)
        _authorised(world, cards[0], 100)
        fast = world.terminal.create_payment(200)
        assert (
            _batch(world, [_authorise_item(world, cards[1], fast["id"], 200)])[0]["status"] == 200
        )
        uncertain, _ = _authorised(world, cards[2], 300)
        world.terminal.post(f"/v1/payments/{uncertain}/uncertain")
        world.terminal.purchase(world.funded_card(500), 50)
        before = _agree(world)

        def snapshot() -> list[tuple[Any, ...]]:
            with world.factory() as session:
                return [
                    tuple(r)
                    for r in session.execute(
                        select(
                            PaymentHold.payment_id,
                            PaymentHold.card_id,
                            PaymentHold.amount,
                            PaymentHold.authorised_at,
                        ).order_by(PaymentHold.payment_id)
                    )
                ]

        holds = snapshot()
        assert len(holds) == 3
        engine = world.factory.kw["bind"]
        migrate(engine, "0017_i20_hot_payments", downgrade=True)
        migrate(engine)
        assert snapshot() == holds
        assert _agree(world) == before
        row.observed = (
            f"{len(holds)} hold rows rebuilt identical; available {sorted(before.values())}"
        )
