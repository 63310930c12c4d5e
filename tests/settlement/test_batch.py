"""POST /v1/batch: many payment requests, one transaction, each answered as on its own.

SQLite and PostgreSQL, through the HTTP API, with the real card emulator.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import make_transient

from tests.settlement.support import (
    Terminal,
    World,
    database_url,
    live_server,
    make_world,
    ok,
)
from webpurse.card import CardApplet
from webpurse.settlement import batch, ledger
from webpurse.settlement.models import Account, Card, Entry, IdempotencyRecord, Payment


def _run(world: World, items: list[dict[str, Any]], key: str | None = None) -> list[dict[str, Any]]:
    answer = world.client.post(
        "/v1/batch", json={"requests": items}, headers=world.auth(key or world.merchant_key)
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "batch" and len(body["responses"]) == len(items)
    return list(body["responses"])


def _create(amount: int, key: str | None = None) -> dict[str, Any]:
    body = {"amount": amount, "description": "test"}
    return {"path": "/v1/payments", "idempotency_key": key, "body": body}


def _authorise(
    terminal: Terminal, payment_id: str, card: CardApplet, amount: int, key: str | None = None
) -> dict[str, Any]:
    issuer, init = terminal.purchase_batch1(card, amount)
    return {
        "path": f"/v1/payments/{payment_id}/authorise",
        "idempotency_key": key,
        "body": {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": terminal.terminal_id,
        },
    }


def _capture(payment_id: str, debit_response: bytes, key: str | None = None) -> dict[str, Any]:
    return {
        "path": f"/v1/payments/{payment_id}/capture",
        "idempotency_key": key,
        "body": {"debit_response": debit_response.hex()},
    }


def _purchases(world: World, cards: list[CardApplet], amount: int) -> list[dict[str, Any]]:
    """Whole purchases, one per card, three batches: create, authorise, capture."""
    created = _run(world, [_create(amount, f"c{i}") for i in range(len(cards))])
    assert [a["status"] for a in created] == [201] * len(cards)
    ids = [a["body"]["id"] for a in created]
    authorised = _run(
        world,
        [
            _authorise(world.terminal, pid, card, amount, f"a{i}")
            for i, (pid, card) in enumerate(zip(ids, cards, strict=True))
        ],
    )
    assert [a["status"] for a in authorised] == [200] * len(cards), authorised
    debits = [
        ok(card, bytes.fromhex(a["body"]["authorisation"]["debit_apdu"]))
        for card, a in zip(cards, authorised, strict=True)
    ]
    captured = _run(
        world,
        [_capture(pid, d, f"k{i}") for i, (pid, d) in enumerate(zip(ids, debits, strict=True))],
    )
    return captured


def test_a_batch_of_purchases_settles_each_once_in_one_ledger_history(world: World) -> None:
    cards = [world.funded_card(1_000) for _ in range(5)]
    captured = _purchases(world, cards, 120)
    assert [a["status"] for a in captured] == [200] * 5
    assert {a["body"]["status"] for a in captured} == {"succeeded"}
    assert all(card.state.balance == 880 for card in cards)
    with world.factory() as session:
        for card in cards:
            row = session.scalars(
                select(Card).where(Card.card_number == card.state.issuer.card_number)
            ).one()
            assert (row.shadow_balance, row.offline_counter, row.open_transaction) == (880, 1, None)
            assert ledger.balance(session, ledger.card_account(row.id)) == 880
        assert ledger.balance(session, ledger.merchant_account(world.merchant_id)) == 600
        assert ledger.balance(session, ledger.HELD_PURCHASES) == 0
        seqs = sorted(p.terminal_seq for p in session.scalars(select(Payment)) if p.terminal_seq)
        assert len(set(seqs)) == len(seqs) == 5  # each DEBIT got its own sequence number
        # One transfer per purchase, card to merchant: nothing on the held account, and the
        # merchant's hot payable locked once per batch, yet every entry has its own version.
        assert (
            session.scalars(select(Entry).where(Entry.account_id == ledger.HELD_PURCHASES)).all()
            == []
        )
        payable = ledger.history(session, ledger.merchant_account(world.merchant_id))
        assert [line.version for line in payable] == list(range(1, 6))
        assert [line.balance_after for line in payable] == [120, 240, 360, 480, 600]
        assert ledger.check(session).ok


def test_batch_answers_match_the_single_endpoints(world: World) -> None:
    single_card, batch_card = world.funded_card(500), world.funded_card(500)
    single = world.terminal.purchase(single_card, 70)
    batched = _purchases(world, [batch_card], 70)[0]["body"]
    assert set(batched) == set(single)
    different = {"id", "created_at", "updated_at", "card_number", "tac", "authorisation"}
    assert {k: v for k, v in batched.items() if k not in different} == {
        k: v for k, v in single.items() if k not in different
    }
    assert set(batched["authorisation"]) == set(single["authorisation"])


def test_refusals_in_a_batch_refuse_only_their_item(world: World) -> None:
    rich, other, third = (world.funded_card(1_000) for _ in range(3))
    ids = [a["body"]["id"] for a in _run(world, [_create(100), _create(100), _create(100)])]
    elsewhere = _authorise(world.terminal, ids[1], other, 100)
    elsewhere["body"]["terminal_id"] = world.other_terminal_id
    items = [
        _authorise(world.terminal, ids[0], rich, 100),
        elsewhere,
        {"path": "/v1/loads", "body": {"amount": 1}},
        {"path": f"/v1/payments/{ids[2]}/authorise", "body": {"issuer_data": "zz"}},
        _authorise(world.terminal, ids[2], third, 100),
    ]
    answers = _run(world, items)
    assert answers[0]["status"] == 200 and answers[0]["body"]["status"] == "authorised"
    assert answers[1]["status"] == 402
    assert answers[1]["body"]["decline_code"] == "terminal_mismatch"
    assert answers[2]["status"] == 404
    assert answers[2]["body"]["code"] == "batch_path_not_supported"
    assert answers[3]["status"] == 422 and answers[3]["body"]["code"] == "validation_error"
    assert answers[4]["status"] == 200
    # A forged DEBIT answer is refused and logged; the honest one beside it is captured.
    forged = ok(rich, bytes.fromhex(answers[0]["body"]["authorisation"]["debit_apdu"]))
    forged = forged[:4] + bytes(4)
    honest = ok(third, bytes.fromhex(answers[4]["body"]["authorisation"]["debit_apdu"]))
    captured = _run(world, [_capture(ids[0], forged), _capture(ids[2], honest)])
    assert captured[0]["status"] == 402
    assert captured[0]["body"]["code"] == "verification_failed"
    assert captured[1]["status"] == 200 and captured[1]["body"]["status"] == "succeeded"
    status = world.client.get(f"/v1/payments/{ids[0]}", headers=world.auth(world.merchant_key))
    assert status.json()["status"] == "authorised"  # still open: the card's proof decides
    with world.factory() as session:
        assert ledger.balance(session, ledger.HELD_PURCHASES) == 100
        assert ledger.check(session).ok


def test_the_same_card_twice_in_one_batch_is_one_transaction_at_a_time(world: World) -> None:
    card = world.funded_card(1_000)
    ids = [a["body"]["id"] for a in _run(world, [_create(100), _create(200)])]
    first = _authorise(world.terminal, ids[0], card, 100)
    second = _authorise(world.terminal, ids[1], card, 200)
    answers = _run(world, [first, second])
    assert answers[0]["status"] == 200
    assert answers[1]["status"] == 402
    assert answers[1]["body"]["decline_code"] == "recovery_required"


def test_a_retried_batch_replays_every_answer_and_moves_no_money(world: World) -> None:
    cards = [world.funded_card(1_000) for _ in range(3)]
    captured = _purchases(world, cards, 50)
    ids = [a["body"]["id"] for a in captured]
    with world.factory() as session:
        entries = session.scalar(select(func.count()).select_from(Entry))
    again = _run(world, [_capture(pid, bytes(8), f"k{i}") for i, pid in enumerate(ids)])
    # Same keys, different bodies: refused as reuse, not run.
    assert {a["status"] for a in again} == {422}
    assert {a["body"]["code"] for a in again} == {"idempotency_key_reused"}
    created = _run(world, [_create(50, f"c{i}") for i in range(3)])
    assert all(a["replayed"] and a["status"] == 201 for a in created)
    with world.factory() as session:
        assert session.scalar(select(func.count()).select_from(Entry)) == entries
        assert session.scalar(select(func.count()).select_from(Payment)) == 3
        assert ledger.check(session).ok


def test_a_key_used_twice_in_one_batch_runs_once(world: World) -> None:
    answers = _run(world, [_create(10, "same"), _create(10, "same"), _create(11, "same")])
    assert answers[0]["status"] == 201 and not answers[0]["replayed"]
    assert answers[1] == {**answers[0], "replayed": True}
    assert answers[2]["status"] == 422
    with world.factory() as session:
        assert session.scalar(select(func.count()).select_from(Payment)) == 1
        stored = session.scalars(select(IdempotencyRecord)).one()
        assert stored.state == "done" and stored.response_status == 201


@pytest.mark.parametrize(
    "surprise",
    [
        ledger.LedgerError("injected"),
        DBAPIError("INSERT", {}, psycopg.errors.UniqueViolation("injected")),
    ],
    ids=["ledger refusal", "constraint"],
)
def test_a_surprise_in_the_fast_path_falls_back_to_the_per_item_path(
    world: World, monkeypatch: pytest.MonkeyPatch, surprise: Exception
) -> None:
    cards = [world.funded_card(1_000) for _ in range(2)]
    real = ledger.post_transfers
    calls: list[int] = []

    def refuse_once(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise surprise
        real(*args, **kwargs)

    monkeypatch.setattr(ledger, "post_transfers", refuse_once)
    ids = [a["body"]["id"] for a in _run(world, [_create(100), _create(100)])]
    answers = _run(
        world, [_authorise(world.terminal, pid, c, 100) for pid, c in zip(ids, cards, strict=True)]
    )
    assert calls and [a["status"] for a in answers] == [200, 200]
    with world.factory() as session:
        assert ledger.balance(session, ledger.HELD_PURCHASES) == 200
        assert ledger.check(session).ok


def test_a_card_whose_account_cannot_cover_the_hold_is_refused_as_one_by_one(
    world: World,
) -> None:
    """Authorise posts nothing, yet the card's account must cover the hold: the fast path
    refuses as the single endpoint does (same builder), and only that item is refused."""
    cards = [world.funded_card(1_000) for _ in range(2)]
    number = cards[1].state.issuer.card_number
    with world.factory() as session, session.begin():  # the card's account says less
        card_id = session.scalars(select(Card.id).where(Card.card_number == number)).one()
        session.execute(
            update(Account).where(Account.id == ledger.card_account(card_id)).values(balance=50)
        )
    ids = [a["body"]["id"] for a in _run(world, [_create(100), _create(100)])]
    answers = _run(
        world, [_authorise(world.terminal, pid, c, 100) for pid, c in zip(ids, cards, strict=True)]
    )
    assert [a["status"] for a in answers] == [200, 409]
    assert answers[1]["body"]["code"] == "ledger_refused"
    assert f"card:{card_id} holds 50 fen, cannot transfer 100 fen" in answers[1]["body"]["detail"]
    with world.factory() as session:
        assert ledger.balance(session, ledger.HELD_PURCHASES) == 100
        assert session.get(Payment, ids[1]).status == "requires_card"  # type: ignore[union-attr]


def test_batches_need_a_merchant_key_and_a_bounded_size(world: World) -> None:
    unauthenticated = world.client.post("/v1/batch", json={"requests": [_create(1)]})
    assert unauthenticated.status_code == 401
    operator = world.client.post(
        "/v1/batch", json={"requests": [_create(1)]}, headers=world.auth(world.operator_key)
    )
    assert operator.status_code == 403
    too_many = world.client.post(
        "/v1/batch",
        json={"requests": [_create(1)] * (batch.MAX_ITEMS + 1)},
        headers=world.auth(world.merchant_key),
    )
    assert too_many.status_code == 422
    with world.factory() as session:
        assert session.scalar(select(func.count()).select_from(Payment)) == 0


def test_another_merchants_payment_is_not_found_in_a_batch(world: World) -> None:
    card = world.funded_card(1_000)
    theirs = world.other_terminal.create_payment(100)
    answers = _run(world, [_authorise(world.terminal, theirs["id"], card, 100)])
    assert answers[0]["status"] == 404


def test_a_batch_the_database_aborts_for_a_deadlock_runs_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batch.run
    attempts: list[int] = []

    def deadlock_once(*args: Any, **kwargs: Any) -> batch.Outcome:
        attempts.append(1)
        outcome = real(*args, **kwargs)  # the work is done, then the database aborts it
        if len(attempts) == 1:
            raise DBAPIError("COMMIT", {}, psycopg.errors.DeadlockDetected("deadlock"))
        return outcome

    monkeypatch.setattr(batch, "run", deadlock_once)
    answers = _run(world, [_create(10, "once")])
    assert len(attempts) == 2 and answers[0]["status"] == 201 and not answers[0]["replayed"]
    with world.factory() as session:
        assert session.scalar(select(func.count()).select_from(Payment)) == 1


@pytest.mark.postgres
def test_concurrent_batches_and_single_calls_share_the_hot_rows_without_loss(
    tmp_path: Path,
) -> None:
    """Four merchant-side batchers and two single-call clients at once, on a real uvicorn
    with two workers over PostgreSQL: every purchase settles once, the hot accounts (held,
    the merchant's payable) and the terminal sequence hold, no deadlock ends a request."""
    with (
        database_url("postgresql", tmp_path, migrated=True) as url,
        live_server(url, tmp_path, workers=2) as live,
    ):
        limits = httpx.Limits(max_connections=16)
        with httpx.Client(base_url=live.base_url, timeout=60, limits=limits) as http:
            terminal = Terminal(http, live.merchant_key, live.terminal_id)
            groups = [[live.issue() for _ in range(4)] for _ in range(6)]
            for card in (card for group in groups for card in group):
                terminal.load(card, 5_000)
            start = threading.Barrier(len(groups))

            def batcher(cards: list[CardApplet]) -> int:
                start.wait()
                done = 0
                for _ in range(3):
                    for answer in _purchases_over(http, terminal, cards, 10):
                        assert answer["status"] == 200, answer
                        done += 1
                return done

            def single(cards: list[CardApplet]) -> int:
                start.wait()
                for _ in range(3):
                    for card in cards:
                        assert terminal.purchase(card, 10)["status"] == "succeeded"
                return 3 * len(cards)

            with ThreadPoolExecutor(len(groups)) as pool:
                jobs = [pool.submit(batcher, g) for g in groups[:4]]
                jobs += [pool.submit(single, g) for g in groups[4:]]
                total = sum(job.result() for job in jobs)
        assert total == 6 * 4 * 3
        with live.factory() as session:
            merchant_id = session.scalars(select(Payment.merchant_id)).first()
            assert merchant_id is not None
            assert ledger.balance(session, ledger.merchant_account(merchant_id)) == total * 10
            assert ledger.balance(session, ledger.HELD_PURCHASES) == 0
            seqs = [p.terminal_seq for p in session.scalars(select(Payment))]
            assert len(seqs) == len(set(seqs)) == total
            assert ledger.check(session).ok


def _purchases_over(
    http: httpx.Client, terminal: Terminal, cards: list[CardApplet], amount: int
) -> list[dict[str, Any]]:
    def post(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answer = http.post("/v1/batch", json={"requests": items}, headers=terminal.headers())
        assert answer.status_code == 200, answer.text
        return list(answer.json()["responses"])

    created = post([_create(amount) for _ in cards])
    ids = [a["body"]["id"] for a in created]
    authorised = post(
        [_authorise(terminal, pid, card, amount) for pid, card in zip(ids, cards, strict=True)]
    )
    debits = [
        ok(card, bytes.fromhex(a["body"]["authorisation"]["debit_apdu"]))
        for card, a in zip(cards, authorised, strict=True)
    ]
    return post([_capture(pid, d) for pid, d in zip(ids, debits, strict=True)])


@pytest.mark.postgres
def test_a_key_stored_meanwhile_by_a_duplicate_replays_its_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A duplicate request stores the key between this batch's look-up and its store: this
    batch's work is rolled back and the batch runs again, replaying the duplicate's answer."""
    with database_url("postgresql", tmp_path, migrated=True) as url, make_world(url) as world:
        first = world.terminal.post("/v1/payments", {"amount": 10}, key="elsewhere")
        assert first.status_code == 201
        with world.factory() as session:
            stored = session.scalars(select(IdempotencyRecord)).one()
            session.delete(stored)  # hidden from the look-up, put back just before the store
            session.commit()
            make_transient(stored)
        real = batch._store_answers
        raced: list[int] = []

        def duplicate_first(ctx: Any, items: Any) -> None:
            if not raced:
                raced.append(1)
                with world.factory() as other:
                    other.add(stored)
                    other.commit()
            real(ctx, items)

        monkeypatch.setattr(batch, "_store_answers", duplicate_first)
        answers = _run(
            world,
            [{"path": "/v1/payments", "idempotency_key": "elsewhere", "body": {"amount": 10}}],
        )
        assert raced and answers[0]["replayed"] and answers[0]["status"] == 201
        assert answers[0]["body"]["id"] == first.json()["id"]
        with world.factory() as session:
            assert session.scalar(select(func.count()).select_from(Payment)) == 1


def test_the_merchants_payable_is_locked_and_credited_last_before_the_commit(
    world: World,
) -> None:
    """Every capture of a batch credits the merchant's payable, the one row concurrent
    batches of that merchant share: it is locked by the last statements before the commit
    (after the keys, events and answers are written), so a concurrent batch waits on it
    for the commit only. Nothing else of the ledger changes."""
    cards = [world.funded_card(1_000) for _ in range(3)]
    payable = ledger.merchant_account(world.merchant_id)
    engine = world.factory.kw["bind"]
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(" ".join(str(args[2]).replace('"', "").split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        captured = _purchases(world, cards, 50)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert [a["body"]["status"] for a in captured] == ["succeeded"] * 3
    capture_batch = statements[max(i for i, s in enumerate(statements) if "FROM payments" in s) :]
    ledger_statements = [
        (i, s)
        for i, s in enumerate(capture_batch)
        if "ledger_accounts" in s or "ledger_entries" in s
    ]
    keys = max(
        i for i, s in enumerate(capture_batch) if s.startswith("INSERT INTO idempotency_keys")
    )
    last_three = [s.split(" ")[0] for _, s in ledger_statements[-3:]]
    assert last_three == ["SELECT", "UPDATE", "INSERT"]
    # The payable's lock comes after the keys; nothing follows its entries.
    assert ledger_statements[-3][0] > keys
    assert ledger_statements[-1][0] == len(capture_batch) - 1
    with world.factory() as session:
        history = ledger.history(session, payable)
        assert [line.balance_after for line in history] == [50, 100, 150]
        report = ledger.check(session)
        assert report.ok, report.problems


def test_the_key_is_checked_before_the_body_whatever_its_parser(world: World) -> None:
    """The batch body is parsed by pydantic's parser first and, if it refuses, by the
    standard library's (routes_batch): the key is still checked before the body's
    validation (JSON that does not parse is refused first, as ever), and a body only the
    standard library reads is still served."""
    valid = b'{"requests":[{"path":"/v1/payments","body":{"amount":1}}]}'
    for content_type in ("application/json", "text/plain", None):
        for body in (valid, b'{"requests":[]}', b"\xef\xbb\xbf" + valid):
            headers = {"content-type": content_type} if content_type else {}
            refused = world.client.post("/v1/batch", content=body, headers=headers)
            assert refused.status_code == 401, (content_type, body, refused.text)
            operator = world.client.post(
                "/v1/batch", content=body, headers=headers | world.auth(world.operator_key)
            )
            assert operator.status_code == 403, (content_type, body, operator.text)
    merchant = world.auth(world.merchant_key) | {"content-type": "application/json"}
    for body in (
        b"\xef\xbb\xbf" + valid,  # a BOM: the standard library's parser only
        '{"requests":[{"path":"/v1/payments","body":{"amount":2}}]}'.encode("utf-16"),
        b'{"requests":[{"path":"/v1/payments","body":{"amount":3,"description":"\\ud800"}}]}',
    ):
        answer = world.client.post("/v1/batch", content=body, headers=merchant)
        assert answer.status_code == 200, answer.text
        assert answer.json()["responses"][0]["status"] in (201, 422), answer.text
    not_json = world.client.post(
        "/v1/batch",
        content=valid,
        headers=world.auth(world.merchant_key) | {"content-type": "text/plain"},
    )
    assert not_json.status_code == 422 and not_json.json()["code"] == "validation_error"
