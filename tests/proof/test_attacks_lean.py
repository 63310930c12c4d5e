"""Red-team attacks on issue 20's lean purchase: lean key rows, derived ledger entries, the
deferred credit of the merchant's payable, GET /v1/events' one-query pages.

Tried as a hostile merchant (reused keys, odd keys, another merchant's cursors), a stolen
key, a crashing server (a database error in the batch's last statements, after the
deferred credit's lock), a concurrent client (duplicate batches racing, clearing racing
batches, the key purge racing a replay) and a database tamperer (``webpurse ledger check``
must notice an entry's amount changed, an entry moved in the order, an entry deleted).
Real components: the settlement app (ASGI) on SQLite and PostgreSQL, the simulated cards,
real threads on their own PostgreSQL connections where concurrency is the point. Rows go to
the ``attacks_lean`` proof table.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from tests.proof.conftest import Proof
from tests.proof.invariants import InvariantReport, check_invariants
from tests.settlement.support import BACKENDS, Terminal, World, database_url, make_world, ok
from webpurse.card import CardApplet
from webpurse.settlement import clearing, idempotency, ledger
from webpurse.settlement.db import make_engine, migrate
from webpurse.settlement.models import Account, Entry, IdempotencyRecord, Payment, PaymentHold
from webpurse.settlement.schemas import PaymentCreate

SUITE = "attacks_lean"


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


def invariants(world: World, cards: list[CardApplet]) -> InvariantReport:
    return check_invariants(world.factory, world.url, cards, settled=True)


def _post(
    world: World, key: str | None, path: str, body: dict[str, Any], who: str = ""
) -> httpx.Response:
    headers: dict[str, str | bytes] = {**world.auth(who or world.merchant_key)}
    if key is not None:
        headers["idempotency-key"] = key.encode("latin-1")  # what a header can carry
    return world.client.post(path, json=body, headers=headers)


def _batch(world: World, items: list[dict[str, Any]], who: str = "") -> httpx.Response:
    return world.client.post(
        "/v1/batch", json={"requests": items}, headers=world.auth(who or world.merchant_key)
    )


def _responses(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 200, answer.text
    return list(answer.json()["responses"])


def _captures(
    world: World, n: int, amount: int, funder: Terminal | None = None
) -> tuple[list[CardApplet], list[dict[str, Any]]]:
    """``n`` cards (loaded with 1000 by ``funder``, default the merchant itself), each with
    an authorised purchase of ``amount`` the card has paid: the batch items capturing them."""
    cards: list[CardApplet] = []
    items: list[dict[str, Any]] = []
    for _ in range(n):
        card = world.issue()
        (funder or world.terminal).load(card, 1000)
        payment = world.terminal.create_payment(amount)
        issuer, init = world.terminal.purchase_batch1(card, amount)
        answer = world.terminal.authorise_payment(payment["id"], issuer, init)
        assert answer.status_code == 200, answer.text
        debit = ok(card, bytes.fromhex(answer.json()["authorisation"]["debit_apdu"]))
        cards.append(card)
        items.append(
            {
                "path": f"/v1/payments/{payment['id']}/capture",
                "idempotency_key": f"cap-{payment['id']}",
                "body": {"debit_response": debit.hex()},
            }
        )
    return cards, items


def _payable(world: World, merchant_id: str | None = None) -> tuple[int, int, int]:
    """The merchant's payable: (cached balance, sum of its entries, number of entries)."""
    account = ledger.merchant_account(merchant_id or world.merchant_id)
    with world.factory() as session:
        cached = ledger.balance(session, account)
        total, count = session.execute(
            select(func.coalesce(func.sum(Entry.amount), 0), func.count()).where(
                Entry.account_id == account
            )
        ).one()
        return int(cached), int(total), int(count)


def _ledger_problems(world: World) -> list[str]:
    with world.factory() as session:
        return list(clearing.ledger_check(session).problems)


# --- idempotency keys: reuse, merchants, odd keys -----------------------------------------


def test_a_reused_key_is_refused_on_both_paths_whichever_stored_it(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant reuses keys with another body: a key stored by the batch (its"
        f" digest travels as bytea text) tried on the single endpoint and vice versa, bodies"
        f" that differ by a trailing space or a letter case ({backend(world)})",
        expected="every different body is 422 idempotency_key_reused on both paths and"
        " creates nothing; the same body replays the first answer on both paths",
    ) as row:
        first_batch = _responses(
            _batch(
                world,
                [{"path": "/v1/payments", "idempotency_key": "b-key", "body": {"amount": 7}}],
            )
        )[0]
        assert first_batch["status"] == 201
        first_single = _post(world, "s-key", "/v1/payments", {"amount": 7, "description": "x"})
        assert first_single.status_code == 201
        others: list[tuple[str, dict[str, Any]]] = [
            ("b-key", {"amount": 8}),
            ("b-key", {"amount": 7, "description": "x"}),
            ("s-key", {"amount": 7, "description": "x "}),
            ("s-key", {"amount": 7, "description": "X"}),
            ("s-key", {"amount": 7}),
        ]
        codes: list[tuple[int, str]] = []
        for key, body in others:
            single = _post(world, key, "/v1/payments", body)
            codes.append((single.status_code, single.json().get("code", "")))
            (batched,) = _responses(
                _batch(world, [{"path": "/v1/payments", "idempotency_key": key, "body": body}])
            )
            codes.append((batched["status"], batched["body"].get("code", "")))
        assert set(codes) == {(422, "idempotency_key_reused")}, codes
        again_single = _post(world, "b-key", "/v1/payments", {"amount": 7})
        assert again_single.status_code == 201
        assert again_single.headers.get("idempotent-replayed") == "true"
        assert again_single.json() == first_batch["body"]
        (again_batch,) = _responses(
            _batch(
                world,
                [
                    {
                        "path": "/v1/payments",
                        "idempotency_key": "s-key",
                        "body": {"description": "x", "amount": 7},  # same body, keys reordered
                    }
                ],
            )
        )
        assert again_batch["replayed"] and again_batch["body"] == first_single.json()
        with world.factory() as session:
            assert session.scalar(select(func.count()).select_from(Payment)) == 2
            prints = session.scalars(select(IdempotencyRecord.fingerprint)).all()
        assert all(len(p) == 64 and int(p, 16) >= 0 for p in prints)
        row.observed = (
            f"{len(codes)} different bodies: all 422 idempotency_key_reused; same bodies"
            " replayed across paths; 2 payments"
        )


def test_odd_keys_are_distinct_and_per_merchant(world: World, proof: Proof) -> None:
    nfc = "caf" + unicodedata.normalize("NFC", "é")
    nfd = "caf" + unicodedata.normalize("NFD", "é")
    longest = ("键" * 254) + "x"
    keys = [longest, nfc, nfd, "k", "k ", "K", "😀" * 255]
    with proof.row(
        SUITE,
        f"keys of maximal length (255 characters, multi-byte), NFC vs NFD, trailing space,"
        f" case, emoji; the same keys used by two merchants, in batches ({backend(world)})",
        expected="every key is its own key (one payment each), per merchant (B's keys make"
        " B's own payments, never A's answer); a replay returns each one's first answer;"
        " 256 characters is 422 and creates nothing",
    ) as row:
        items = [
            {"path": "/v1/payments", "idempotency_key": key, "body": {"amount": 10 + i}}
            for i, key in enumerate(keys)
        ]
        mine = _responses(_batch(world, items))
        theirs = _responses(_batch(world, items, world.other_key))
        assert [r["status"] for r in mine + theirs] == [201] * (2 * len(keys))
        ids = {r["body"]["id"] for r in mine + theirs}
        assert len(ids) == 2 * len(keys)
        assert [r["body"]["amount"] for r in mine] == [10 + i for i in range(len(keys))]
        again = _responses(_batch(world, items))
        assert all(r["replayed"] for r in again)
        assert [r["body"] for r in again] == [r["body"] for r in mine]
        again_theirs = _responses(_batch(world, items, world.other_key))
        assert [r["body"]["id"] for r in again_theirs] == [r["body"]["id"] for r in theirs]
        too_long = _batch(
            world, [{"path": "/v1/payments", "idempotency_key": "k" * 256, "body": {"amount": 1}}]
        )
        assert too_long.status_code == 422, too_long.text
        header = _post(world, "é" * 255, "/v1/payments", {"amount": 3})  # latin-1 header
        assert header.status_code == 201, header.text
        header_again = _post(world, "é" * 255, "/v1/payments", {"amount": 3})
        assert header_again.headers.get("idempotent-replayed") == "true"
        assert header_again.json()["id"] == header.json()["id"]
        with world.factory() as session:
            count = session.scalar(select(func.count()).select_from(Payment))
        assert count == 2 * len(keys) + 1
        row.observed = (
            f"{len(keys)} odd keys x 2 merchants: {len(ids)} distinct payments; replays equal;"
            f" 256 chars: {too_long.status_code}; {count} payments"
        )


def test_a_key_with_a_nul_character_is_refused_not_a_crash(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant sends a batch item whose idempotency key holds U+0000 beside a good"
        f" item ({backend(world)})",
        expected="the batch answers (200): the NUL key's item is 400 invalid_idempotency_key"
        " and creates nothing, the good item is created; no 500",
    ) as row:
        answer = _batch(
            world,
            [
                {"path": "/v1/payments", "idempotency_key": "bad\x00key", "body": {"amount": 5}},
                {"path": "/v1/payments", "idempotency_key": "good", "body": {"amount": 6}},
            ],
        )
        row.observed = f"batch {answer.status_code}"
        bad, good = _responses(answer)
        assert (bad["status"], bad["body"]["code"]) == (400, "invalid_idempotency_key")
        assert good["status"] == 201
        again = _responses(
            _batch(
                world,
                [{"path": "/v1/payments", "idempotency_key": "bad\x00key", "body": {"amount": 5}}],
            )
        )
        assert again[0]["status"] == 400 and not again[0]["replayed"]
        with world.factory() as session:
            assert session.scalar(select(func.count()).select_from(Payment)) == 1
        row.observed += f": items {bad['status']} {bad['body']['code']}, {good['status']}"


# --- the purge racing a replay --------------------------------------------------------------


@pytest.mark.postgres
def test_a_purge_between_the_claim_and_the_look_up_is_not_a_crash(
    pg_world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "a client retries a key just older than the 7 days kept while the sweep purges it:"
        " the purge commits after the retry's claim found the key and before it reads the"
        " stored answer (PostgreSQL)",
        expected="the retry is answered (the forgotten key runs afresh: 201), never a 500",
    ) as row:
        first = _post(world, "old-key", "/v1/payments", {"amount": 9})
        assert first.status_code == 201
        world.clock.advance(idempotency.KEEP_FOR + dt.timedelta(minutes=1))
        real_lookup = idempotency.lookup
        purged: list[int] = []

        def purge_first(principal: str, keys: Any, dialect: str = "postgresql") -> Any:
            if not purged:  # the sweep, on its own connection, commits now
                with world.factory() as sweep, sweep.begin():
                    purged.append(idempotency.purge(sweep, world.clock()))
            return real_lookup(principal, keys, dialect)

        monkeypatch.setattr(idempotency, "lookup", purge_first)
        try:
            retry = _post(world, "old-key", "/v1/payments", {"amount": 9})
            status = retry.status_code
        except Exception as error:  # the app raised: what a client sees is a 500
            status, retry = 500, None
            row.observed = f"purged {purged}; retry raised {type(error).__name__}"
        else:
            row.observed = f"purged {purged}; retry {status}"
        assert purged == [1]
        assert status == 201 and retry is not None
        assert retry.json()["id"] != first.json()["id"]


# --- a crash in the batch's last statements ---------------------------------------------------


def _broken(session: Any) -> None:
    """A database error that is not transient (the route does not run the batch again)."""
    session.execute(text("SELECT no_such_column FROM ledger_entries"))


@pytest.mark.parametrize("where", ["after_hot_credits", "before_hot_credits"])
def test_a_database_error_around_the_deferred_credit_rolls_everything_back(
    world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    moment = {
        "after_hot_credits": "after post_hot_credits locked and credited the payable",
        "before_hot_credits": "after the fast path and the keys' insert, before the credit",
    }[where]
    with proof.row(
        SUITE,
        f"the database fails a batch of 3 fast captures {moment} (a crashing server);"
        f" the client retries the batch twice with the same keys ({backend(world)})",
        expected="the failed batch changes nothing (payments authorised, no keys, payable and"
        " cards' accounts as before, ledger check ok); the retry captures each once and"
        " credits the payable once; the second retry replays; card = ledger = shadow",
    ) as row:
        cards, items = _captures(world, 3, 100)
        before = _payable(world)
        from webpurse.settlement import batch

        if where == "after_hot_credits":
            real = ledger.post_hot_credits

            def crash(session: Any, hot: Any) -> None:
                real(session, hot)
                _broken(session)

            monkeypatch.setattr(ledger, "post_hot_credits", crash)
        else:
            real_store = batch._store_answers

            def crash_store(ctx: Any, answered: Any) -> None:
                real_store(ctx, answered)
                _broken(ctx.session)

            monkeypatch.setattr(batch, "_store_answers", crash_store)
        try:
            failed = _batch(world, items).status_code
        except Exception:  # the app raised: the client sees a 500
            failed = 500
        assert failed == 500
        monkeypatch.undo()
        with world.factory() as session:
            statuses = set(session.scalars(select(Payment.status).where(Payment.amount == 100)))
            keys = session.scalar(select(func.count()).select_from(IdempotencyRecord))
        assert statuses == {"authorised"} and keys == 0, (statuses, keys)
        assert _payable(world) == before
        assert _ledger_problems(world) == []
        retried = _responses(_batch(world, items))
        assert [(r["status"], r["body"]["status"], r["replayed"]) for r in retried] == [
            (200, "succeeded", False)
        ] * 3
        after = _payable(world)
        assert after == (before[0] + 300, before[1] + 300, before[2] + 3)
        replayed = _responses(_batch(world, items))
        assert all(r["replayed"] for r in replayed)
        assert [r["body"] for r in replayed] == [r["body"] for r in retried]
        assert _payable(world) == after
        report = invariants(world, cards)
        row.observed = (
            f"failed batch: {failed}, nothing kept; retry: 3 captured, payable"
            f" {before[0]} -> {after[0]} ({after[2] - before[2]} entries); replay: no change;"
            f" {report.summary()}"
        )


# --- concurrent batches, duplicates and clearing on PostgreSQL -------------------------------


@pytest.mark.postgres
def test_concurrent_batches_duplicates_and_clearing_count_each_capture_once(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    groups, per_group, amount = 4, 3, 100
    with proof.row(
        SUITE,
        f"{groups} batches of {per_group} captures each sent three times at once (a client retrying"
        " over a second connection), while clearing runs the day in the middle; then the"
        " next day's clearing (PostgreSQL, threads)",
        expected="each capture posted once (one payable entry each); the two clearing batches"
        " pay out exactly the captured total, none twice, none missed; payable 0 after;"
        " ledger check ok",
    ) as row:
        cards: list[CardApplet] = []
        batches: list[list[dict[str, Any]]] = []
        for _ in range(groups):
            group_cards: list[CardApplet] = []
            group_items: list[dict[str, Any]] = []
            for _ in range(per_group):
                card = world.issue()
                world.other_terminal.load(card, 1000)  # shop B sold the value: A owes no top-up
                payment = world.terminal.create_payment(amount)
                issuer, init = world.terminal.purchase_batch1(card, amount)
                answer = world.terminal.authorise_payment(payment["id"], issuer, init)
                assert answer.status_code == 200, answer.text
                debit = ok(card, bytes.fromhex(answer.json()["authorisation"]["debit_apdu"]))
                group_cards.append(card)
                group_items.append(
                    {
                        "path": f"/v1/payments/{payment['id']}/capture",
                        "idempotency_key": f"cap-{payment['id']}",
                        "body": {"debit_response": debit.hex()},
                    }
                )
            cards += group_cards
            batches.append(group_items)
        _, _, entries_before = _payable(world)
        day = clearing.business_day_of(world.clock())
        end = clearing.business_day_window(day)[1]
        start = threading.Barrier(3 * groups + 1)

        def send(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
            start.wait(timeout=60)
            return _responses(_batch(world, group))

        def clear() -> int:
            start.wait(timeout=60)
            with world.factory() as session, session.begin():
                result = clearing.run_batch(
                    session, world.merchant_id, day, end + dt.timedelta(hours=1)
                )
                return int(result.batch.payout)

        with ThreadPoolExecutor(3 * groups + 1) as pool:
            sent = [pool.submit(send, group) for group in batches for _ in range(3)]
            cleared = pool.submit(clear)
            answers = [future.result(timeout=120) for future in sent]
            first_payout = cleared.result(timeout=120)
        for answer in answers:
            assert [(r["status"], r["body"]["status"]) for r in answer] == [
                (200, "succeeded")
            ] * per_group
        cached, total, count = _payable(world)
        assert count - entries_before == groups * per_group + (1 if first_payout else 0)
        next_day = day + dt.timedelta(days=1)
        next_end = clearing.business_day_window(next_day)[1]
        with world.factory() as session, session.begin():
            second = clearing.run_batch(
                session, world.merchant_id, next_day, next_end + dt.timedelta(hours=1)
            ).batch
            second_payout = int(second.payout)
        assert first_payout + second_payout == groups * per_group * amount
        cached, total, _ = _payable(world)
        assert (cached, total) == (0, 0)
        report = invariants(world, cards)
        row.observed = (
            f"{3 * groups} batches answered, {groups * per_group} captures posted once;"
            f" payouts {first_payout} + {second_payout} = {groups * per_group * amount};"
            f" payable 0; {report.summary()}"
        )


def _blocked_on_a_lock(world: World, pid: int) -> bool:
    with world.factory() as session:
        return bool(
            session.scalar(
                text("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = :pid"),
                {"pid": pid},
            )
        )


@pytest.mark.postgres
def test_clearing_between_the_fast_path_and_the_deferred_credit_misses_nothing(
    pg_world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "clearing runs for day D while batch 2 has written its captures but not yet locked"
        " and credited the payable; then the D+1 clearing starts while batch 3 holds the"
        " payable's lock in its last statements (PostgreSQL, deterministic interleaving)",
        expected="D pays batch 1 only; D+1 waits for batch 3's commit and pays batches 2"
        " and 3; together exactly the captured total; payable 0; ledger check ok",
    ) as row:
        cards: list[CardApplet] = []
        groups: list[list[dict[str, Any]]] = []
        for amount in (100, 20, 3):
            group_cards, items = [], []
            for _ in range(2):
                card = world.issue()
                world.other_terminal.load(card, 1000)  # shop B sold the value
                payment = world.terminal.create_payment(amount)
                issuer, init = world.terminal.purchase_batch1(card, amount)
                answer = world.terminal.authorise_payment(payment["id"], issuer, init)
                assert answer.status_code == 200, answer.text
                debit = ok(card, bytes.fromhex(answer.json()["authorisation"]["debit_apdu"]))
                group_cards.append(card)
                items.append(
                    {
                        "path": f"/v1/payments/{payment['id']}/capture",
                        "idempotency_key": f"cap-{payment['id']}",
                        "body": {"debit_response": debit.hex()},
                    }
                )
            cards += group_cards
            groups.append(items)
        day = clearing.business_day_of(world.clock())
        next_day = day + dt.timedelta(days=1)

        def clear(which: Any) -> int:
            end = clearing.business_day_window(which)[1]
            with world.factory() as session, session.begin():
                pid = session.scalar(text("SELECT pg_backend_pid()"))
                pids.append(int(pid))
                result = clearing.run_batch(
                    session, world.merchant_id, which, end + dt.timedelta(hours=1)
                )
                return int(result.batch.payout)

        pids: list[int] = []
        assert [r["status"] for r in _responses(_batch(world, groups[0]))] == [200, 200]
        real = ledger.post_hot_credits
        payouts: list[int] = []

        def clearing_first(session: Any, hot: Any) -> None:
            payouts.append(clear(day))  # commits on its own connection, before the lock
            real(session, hot)

        monkeypatch.setattr(ledger, "post_hot_credits", clearing_first)
        assert [r["status"] for r in _responses(_batch(world, groups[1]))] == [200, 200]
        pool = ThreadPoolExecutor(1)
        waiting: list[Any] = []

        def clearing_waits(session: Any, hot: Any) -> None:
            real(session, hot)  # the payable is locked now, until the batch commits
            waiting.append(pool.submit(clear, next_day))
            while not (len(pids) == 2 and _blocked_on_a_lock(world, pids[1])):
                assert not waiting[0].done(), "clearing did not wait for the payable's lock"

        monkeypatch.setattr(ledger, "post_hot_credits", clearing_waits)
        assert [r["status"] for r in _responses(_batch(world, groups[2]))] == [200, 200]
        monkeypatch.undo()
        payouts.append(waiting[0].result(timeout=60))
        pool.shutdown()
        assert payouts == [200, 46], payouts
        assert _payable(world)[:2] == (0, 0)
        report = invariants(world, cards)
        row.observed = f"payouts D {payouts[0]}, D+1 {payouts[1]}; payable 0; {report.summary()}"


# --- tampering the ledger: `ledger check` must notice ----------------------------------------


def _tamper(world: World, *statements: tuple[str, dict[str, Any]]) -> list[str]:
    with world.factory() as session, session.begin():
        for sql, params in statements:
            session.execute(text(sql), params)
    return _ledger_problems(world)


def test_ledger_check_notices_an_entry_changed_moved_or_deleted(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"a database tamperer edits derived-order ledger entries: a payable entry's amount"
        f" (cached balance fixed to match), a card's load moved after the purchase it paid for"
        f" (its id renumbered), a purchase's payable entry deleted (cached balance and version"
        f" fixed), an entry moved to another card's account ({backend(world)})",
        expected="`ledger check` reports each tamper; the untouched ledger checks ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        world.terminal.purchase(card, 200)
        world.terminal.purchase(card, 100)
        other = world.issue()
        world.other_terminal.load(other, 50)
        assert _ledger_problems(world) == []
        payable = ledger.merchant_account(world.merchant_id)
        with world.factory() as session:
            card_id = session.scalars(select(Payment.card_id).where(Payment.amount == 200)).one()
            other_id = session.scalars(
                select(Entry.account_id).where(
                    Entry.account_id.like("card:%"), Entry.account_id != f"card:{card_id}"
                )
            ).first()
            pay_entries = session.scalars(
                select(Entry).where(Entry.account_id == payable).order_by(Entry.id)
            ).all()
            card_entries = session.scalars(
                select(Entry).where(Entry.account_id == f"card:{card_id}").order_by(Entry.id)
            ).all()
            top = int(session.scalar(select(func.max(Entry.id))) or 0)
        first_pay = pay_entries[0]
        load, spend = card_entries[0], card_entries[1]
        assert load.amount == 500 and spend.amount == -200
        found: dict[str, list[str]] = {}
        # Each tamper is undone before the next one (a savepoint-free undo by hand).
        found["amount"] = _tamper(
            world,
            ("UPDATE ledger_entries SET amount = amount + 50 WHERE id = :id", {"id": first_pay.id}),
            (
                "UPDATE ledger_accounts SET balance = balance + 50 WHERE id = :a",
                {"a": payable},
            ),
        )
        _tamper(
            world,
            ("UPDATE ledger_entries SET amount = amount - 50 WHERE id = :id", {"id": first_pay.id}),
            (
                "UPDATE ledger_accounts SET balance = balance - 50 WHERE id = :a",
                {"a": payable},
            ),
        )
        found["moved"] = _tamper(
            world,
            (
                "UPDATE ledger_entries SET id = :new WHERE id = :id",
                {"id": load.id, "new": top + 10},
            ),
        )
        _tamper(
            world,
            (
                "UPDATE ledger_entries SET id = :old WHERE id = :id",
                {"id": top + 10, "old": load.id},
            ),
        )
        assert _ledger_problems(world) == []
        saved = {
            "id": first_pay.id,
            "transfer_id": first_pay.transfer_id,
            "account_id": payable,
            "amount": first_pay.amount,
        }
        found["deleted"] = _tamper(
            world,
            ("DELETE FROM ledger_entries WHERE id = :id", {"id": first_pay.id}),
            (
                "UPDATE ledger_accounts SET balance = balance - :amount, version = version - 1"
                " WHERE id = :a",
                {"a": payable, "amount": first_pay.amount},
            ),
        )
        _tamper(
            world,
            (
                "INSERT INTO ledger_entries (id, transfer_id, account_id, amount)"
                " VALUES (:id, :transfer_id, :account_id, :amount)",
                saved,
            ),
            (
                "UPDATE ledger_accounts SET balance = balance + :amount, version = version + 1"
                " WHERE id = :a",
                {"a": payable, "amount": first_pay.amount},
            ),
        )
        assert _ledger_problems(world) == []
        assert other_id is not None
        found["other account"] = _tamper(
            world,
            (
                "UPDATE ledger_entries SET account_id = :other WHERE id = :id",
                {"id": spend.id, "other": other_id},
            ),
            (
                "UPDATE ledger_accounts SET balance = balance + 200, version = version - 1"
                " WHERE id = :a",
                {"a": f"card:{card_id}"},
            ),
            (
                "UPDATE ledger_accounts SET balance = balance - 200, version = version + 1"
                " WHERE id = :a",
                {"a": other_id},
            ),
        )
        assert all(found.values()), found
        row.observed = "; ".join(f"{what}: {problems[0]}" for what, problems in found.items())


def test_ledger_check_notices_a_hold_row_deleted_or_added(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"a database tamperer edits payment_holds, the index of the open holds that"
        f" `available` and the sweeps read (migration 0018): an authorised payment's hold row"
        f" deleted (the card could spend the held value again), a hold row added for a"
        f" captured payment, a hold row's amount lowered ({backend(world)})",
        expected="`ledger check` reports each tamper; the untouched ledger checks ok",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 500)
        world.terminal.purchase(card, 100)
        payment = world.terminal.create_payment(200)
        issuer, init = world.terminal.purchase_batch1(card, 200)
        answer = world.terminal.authorise_payment(payment["id"], issuer, init)
        assert answer.status_code == 200, answer.text
        assert _ledger_problems(world) == []
        with world.factory() as session:
            held = session.execute(
                select(PaymentHold.card_id, PaymentHold.amount, PaymentHold.authorised_at).where(
                    PaymentHold.payment_id == payment["id"]
                )
            ).one()
            captured = session.scalars(select(Payment.id).where(Payment.amount == 100)).one()
            assert ledger.available(session, [held.card_id])[held.card_id].amount == 200
        saved = {
            "p": payment["id"],
            "c": held.card_id,
            "a": held.amount,
            "t": held.authorised_at,
        }
        insert_hold = (
            "INSERT INTO payment_holds (payment_id, card_id, amount, authorised_at)"
            " VALUES (:p, :c, :a, :t)"
        )
        found: dict[str, list[str]] = {}
        found["deleted"] = _tamper(
            world, ("DELETE FROM payment_holds WHERE payment_id = :p", {"p": payment["id"]})
        )
        with world.factory() as session:  # what the tamper would let the card spend
            spendable = ledger.available(session, [held.card_id])[held.card_id].amount
        _tamper(world, (insert_hold, saved))
        assert _ledger_problems(world) == []
        found["added"] = _tamper(world, (insert_hold, {**saved, "p": captured, "a": 100}))
        _tamper(world, ("DELETE FROM payment_holds WHERE payment_id = :p", {"p": captured}))
        found["lowered"] = _tamper(
            world,
            ("UPDATE payment_holds SET amount = 1 WHERE payment_id = :p", {"p": payment["id"]}),
        )
        _tamper(
            world,
            ("UPDATE payment_holds SET amount = :a WHERE payment_id = :p", saved),
        )
        assert _ledger_problems(world) == []
        assert spendable == 400
        assert found["deleted"] == [f"payment {payment['id']} is authorised but has no hold row"]
        assert found["added"] == [f"hold row for payment {captured}, which is succeeded"]
        assert found["lowered"] == [
            f"hold row for payment {payment['id']} differs from the payment"
        ]
        row.observed = "; ".join(f"{what}: {problems[0]}" for what, problems in found.items())


# --- GET /v1/events: one query per page, still only the merchant's --------------------------


def test_event_pages_with_equal_timestamps_hold_only_the_merchants_own(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"two merchants' body-less payment.succeeded events interleave with one timestamp"
        f" (a frozen clock); A pages through GET /v1/events 2 at a time, B passes A's"
        f" cursor, A passes B's ({backend(world)})",
        expected="A's pages hold each of A's events once, each rendering A's own payment;"
        " never one of B's; a cursor of the other merchant is 404",
    ) as row:
        mine: list[str] = []
        theirs: list[str] = []
        for _ in range(3):
            card = world.issue()
            world.other_terminal.load(card, 1000)
            mine.append(world.terminal.purchase(card, 11)["id"])
            theirs.append(world.other_terminal.purchase(card, 13)["id"])
        seen: list[dict[str, Any]] = []
        cursor = ""
        pages = 0
        while True:
            page = world.client.get(
                f"/v1/events?type=payment.succeeded&limit=2{cursor}",
                headers=world.auth(world.merchant_key),
            )
            assert page.status_code == 200, page.text
            pages += 1
            seen += page.json()["data"]
            if not page.json()["has_more"]:
                break
            cursor = f"&starting_after={page.json()['data'][-1]['id']}"
        shown = [event["data"]["object"]["id"] for event in seen]
        assert sorted(shown) == sorted(mine), (shown, mine)
        assert all(event["data"]["object"]["amount"] == 11 for event in seen)
        b_events = world.client.get(
            "/v1/events?type=payment.succeeded", headers=world.auth(world.other_key)
        ).json()["data"]
        assert sorted(e["data"]["object"]["id"] for e in b_events) == sorted(theirs)
        cross = [
            world.client.get(
                f"/v1/events?starting_after={seen[0]['id']}", headers=world.auth(world.other_key)
            ).status_code,
            world.client.get(
                f"/v1/events?starting_after={b_events[0]['id']}",
                headers=world.auth(world.merchant_key),
            ).status_code,
        ]
        assert cross == [404, 404]
        assert not set(theirs) & set(json.dumps(seen).split('"'))
        row.observed = (
            f"A: {len(seen)} events in {pages} pages, all A's; B: {len(b_events)}, all B's;"
            f" cross cursors {cross}"
        )


def test_ledger_check_notices_payable_entries_swapped_across_a_clearing_mark(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"a database tamperer swaps the ids of a cleared purchase's payable entry (100) and"
        f" a later, not yet cleared one (300): nothing else to fix, the sums hold"
        f" ({backend(world)})",
        expected="`ledger check` reports the payable's history no longer matching the"
        " cleared batch (else the next payout is 100, not 300, and 200 stays unpaid)",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 1000)  # shop B sold the value
        world.terminal.purchase(card, 100)
        day = clearing.business_day_of(world.clock())
        end = clearing.business_day_window(day)[1]
        with world.factory() as session, session.begin():
            first = clearing.run_batch(session, world.merchant_id, day, end).batch
            assert first.payout == 100
        world.terminal.purchase(card, 300)
        payable = ledger.merchant_account(world.merchant_id)
        with world.factory() as session:
            credits = session.scalars(
                select(Entry.id).where(Entry.account_id == payable, Entry.amount > 0)
            ).all()
        low, high = sorted(credits)
        problems = _tamper(
            world,
            ("UPDATE ledger_entries SET id = -1 WHERE id = :id", {"id": low}),
            ("UPDATE ledger_entries SET id = :low WHERE id = :high", {"low": low, "high": high}),
            ("UPDATE ledger_entries SET id = :high WHERE id = -1", {"high": high}),
        )
        next_day = day + dt.timedelta(days=1)
        with world.factory() as session, session.begin():
            second = clearing.run_batch(
                session, world.merchant_id, next_day, clearing.business_day_window(next_day)[1]
            ).batch
            left = ledger.balance(session, payable)
        row.observed = (
            f"ledger check: {problems or 'ok'}; next payout {second.payout}, payable left {left}"
        )
        assert problems, row.observed


# --- the migrations with messy live data ------------------------------------------------------

BEFORE_LEAN = "0014_i20_one_transfer_purchase"  # before 0016, 0015 and 0017


def test_down_and_up_across_the_lean_migrations_with_live_data(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"migrations 0017, 0015, 0016 down to 0014 and up again on a live ledger: a cleared"
        f" day (its marks), a purchase after it not yet cleared, keys of both paths, and an"
        f" in_flight key row an older version left while it was down ({backend(world)})",
        expected="up again: the next clearing pays exactly the uncleared purchase; keys"
        " replay; the in_flight key is 409 until abandoned (then runs once), with another"
        " body 422; ledger check ok, card = ledger = shadow",
    ) as row:
        card = world.issue()
        world.other_terminal.load(card, 1000)  # shop B sold the value: A's payout is purchases
        world.terminal.purchase(card, 100)
        cards, items = _captures(world, 2, 30, funder=world.other_terminal)
        captured = _responses(_batch(world, items))
        assert [r["status"] for r in captured] == [200, 200]
        day = clearing.business_day_of(world.clock())
        end = clearing.business_day_window(day)[1]
        with world.factory() as session, session.begin():
            assert clearing.run_batch(session, world.merchant_id, day, end).batch.payout == 160
        world.terminal.purchase(card, 50)
        keyed = _post(world, "k-live", "/v1/payments", {"amount": 4})
        assert keyed.status_code == 201
        flight_body = {"amount": 6}
        engine = make_engine(world.url, pool_size=1, max_overflow=0)
        try:
            migrate(engine, BEFORE_LEAN, downgrade=True)
            with engine.begin() as connection:
                connection.execute(
                    text(
                        "INSERT INTO idempotency_keys (principal, key, fingerprint, state,"
                        " created_at) VALUES (:p, 'k-flight', :f, 'in_flight', :t)"
                    ),
                    {
                        "p": world.merchant_id,
                        "f": idempotency.fingerprint(
                            "POST",
                            "/v1/payments",
                            PaymentCreate.model_validate(flight_body).model_dump(mode="json"),
                        ),
                        "t": world.clock(),
                    },
                )
            migrate(engine)
        finally:
            engine.dispose()
        again = _post(world, "k-live", "/v1/payments", {"amount": 4})
        assert (again.status_code, again.content) == (201, keyed.content)
        busy = _post(world, "k-flight", "/v1/payments", flight_body)
        other = _post(world, "k-flight", "/v1/payments", {"amount": 7})
        assert (busy.status_code, busy.json()["code"]) == (409, "idempotency_in_flight")
        assert (other.status_code, other.json()["code"]) == (422, "idempotency_key_reused")
        world.clock.advance(idempotency.ABANDONED_AFTER + dt.timedelta(seconds=1))
        ran = _post(world, "k-flight", "/v1/payments", flight_body)
        assert ran.status_code == 201, ran.text
        replay = _post(world, "k-flight", "/v1/payments", flight_body)
        assert replay.headers.get("idempotent-replayed") == "true"
        next_day = day + dt.timedelta(days=1)
        with world.factory() as session, session.begin():
            second = clearing.run_batch(
                session, world.merchant_id, next_day, clearing.business_day_window(next_day)[1]
            ).batch
        assert second.payout == 50
        assert _payable(world)[:2] == (0, 0)
        report = invariants(world, [card, *cards])
        row.observed = (
            f"next payout {second.payout}; in_flight key {busy.status_code}, other body"
            f" {other.status_code}, abandoned {ran.status_code} then replayed; {report.summary()}"
        )


def test_a_batch_mixing_fast_and_per_item_credits_to_the_payable_keeps_the_history(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"one batch captures two authorised payments (fast path, the payable's credit"
        f" deferred) around an uncertain one (per-item path: it locks and credits the payable"
        f" in the middle of the batch); then the batch is resent ({backend(world)})",
        expected="3 succeeded, the payable credited once each (cached balance = entries,"
        " version = count); the resend replays; ledger check ok; card = ledger = shadow",
    ) as row:
        cards, items = _captures(world, 3, 70, funder=world.other_terminal)
        unsure = items[1]["path"].split("/")[3]
        marked = _post(world, None, f"/v1/payments/{unsure}/uncertain", {})
        assert marked.status_code == 200 and marked.json()["status"] == "uncertain"
        before = _payable(world)
        answers = _responses(_batch(world, items))
        assert [(r["status"], r["body"]["status"]) for r in answers] == [(200, "succeeded")] * 3
        after = _payable(world)
        assert after == (before[0] + 210, before[1] + 210, before[2] + 3)
        with world.factory() as session:
            account = session.get(Account, ledger.merchant_account(world.merchant_id))
            assert account is not None and account.version == after[2]
        again = _responses(_batch(world, items))
        assert all(r["replayed"] for r in again) and _payable(world) == after
        report = invariants(world, cards)
        row.observed = (
            f"3 succeeded; payable {before[0]} -> {after[0]}, {after[2]} entries = version;"
            f" resend replayed; {report.summary()}"
        )


# --- the merchant's batching client: coalesced calls, an answer lost --------------------------


class _LosesFirstBatchAnswer(httpx.AsyncBaseTransport):
    """Forwards to the app; the first /v1/batch is done by settlement but its answer is lost."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.sizes: list[int] = []
        self.lost = 0
        self.lost_size = 0  # the items of the batch whose answer was lost

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        size = 0
        if request.url.path == "/v1/batch":
            size = len(json.loads(request.content)["requests"])
            self.sizes.append(size)
        response = await self.inner.handle_async_request(request)
        # The first answer to come back is lost: with two batches in flight either may be
        # first (the first sent is not always the first answered).
        if request.url.path == "/v1/batch" and not self.lost:
            self.lost += 1
            self.lost_size = size
            await response.aread()
            raise httpx.ReadError("connection reset after settlement answered")
        return response


async def test_a_coalesced_batch_whose_answer_is_lost_is_resent_and_replayed(
    tmp_path: Path, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    from webpurse.merchant.settlement import BatchingSettlementClient, Kind

    monkeypatch.setattr("webpurse.merchant.settlement.RETRY_PAUSES", (0.0, 0.0))
    callers = 10
    with (
        proof.row(
            SUITE,
            f"{callers} shoppers create payments at once through the merchant's batching client"
            " (max_batch 4, 2 in flight; calls of one loop turn coalesce); the connection"
            " breaks after settlement committed the first batch (SQLite)",
            expected="the lost batch is resent with the same keys and replayed: each caller"
            f" gets its own payment, {callers} payments exist, none twice",
        ) as row,
        database_url("sqlite", tmp_path, migrated=True) as url,
        make_world(url) as world,
    ):
        transport = _LosesFirstBatchAnswer(httpx.ASGITransport(app=world.client.app))
        async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
            client = BatchingSettlementClient(
                http, world.merchant_key, max_batch=4, max_in_flight=2
            )
            made = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        client.create(Kind.PAYMENT, 10 + i, description="tea", reference=f"o{i}")
                        for i in range(callers)
                    )
                ),
                timeout=60,
            )
        ids = [payment.id for payment in made]
        with world.factory() as session:
            stored = dict(session.execute(select(Payment.id, Payment.amount)).all())
        assert len(set(ids)) == callers and set(ids) == set(stored)
        assert [stored[i] for i in ids] == [10 + i for i in range(callers)]
        assert transport.lost == 1 and sum(transport.sizes) == callers + transport.lost_size
        row.observed = (
            f"batches of {transport.sizes} (the one of {transport.lost_size} resent);"
            f" {len(stored)} payments,"
            " each caller its own"
        )


@pytest.mark.postgres
def test_two_sweeps_purging_at_once_forget_each_old_key_once_and_no_young_one(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    old, young, chunk = 120, 30, 25
    with proof.row(
        SUITE,
        f"two sweeps purge keys by ctid at once in chunks of {chunk} ({old} keys older than"
        f" the 7 days kept, {young} younger; PostgreSQL, threads)",
        expected=f"the two sweeps forget {old} keys between them, each once, no error; every"
        " young key is kept",
    ) as row:
        now = world.clock()
        digest = idempotency.fingerprint("POST", "/v1/payments", {"amount": 1})
        with world.factory() as session, session.begin():
            for i in range(old + young):
                stamp = now - idempotency.KEEP_FOR - dt.timedelta(hours=1, seconds=i)
                session.add(
                    IdempotencyRecord(
                        principal=world.merchant_id,
                        key=f"old-{i}" if i < old else f"young-{i}",
                        fingerprint=digest,
                        state="done",
                        response_status=200,
                        response_body="{}",
                        created_at=stamp if i < old else now,
                    )
                )
        start = threading.Barrier(2)

        def sweep() -> int:
            start.wait(timeout=60)
            total = 0
            while True:
                with world.factory() as session, session.begin():
                    done = idempotency.purge(session, now, limit=chunk)
                total += done
                if done < chunk:
                    return total

        with ThreadPoolExecutor(2) as pool:
            sweeps = [pool.submit(sweep), pool.submit(sweep)]
            forgotten = [future.result(timeout=120) for future in sweeps]
        with world.factory() as session:
            left = set(session.scalars(select(IdempotencyRecord.key)))
        assert sum(forgotten) == old, forgotten
        assert left == {f"young-{i}" for i in range(old, old + young)}
        row.observed = f"sweeps forgot {forgotten} (= {old}); {len(left)} young keys left"


@pytest.mark.postgres
def test_a_description_with_a_nul_character_is_refused_not_a_crash(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    body = {"amount": 5, "description": "tea\x00"}
    with proof.row(
        SUITE,
        "hostile merchant creates a payment whose description holds U+0000, on the single"
        " endpoint and in a batch (PostgreSQL)",
        expected="422 validation_error on both, nothing created; no 500",
    ) as row:
        try:
            single = _post(world, "nul-body", "/v1/payments", body).status_code
        except Exception:  # the app raised: the client sees a 500
            single = 500
        (item,) = _responses(
            _batch(world, [{"path": "/v1/payments", "idempotency_key": "nul-b", "body": body}])
        )
        row.observed = f"single {single}, batch item {item['status']}"
        assert (single, item["status"]) == (422, 422), row.observed


@pytest.mark.postgres
def test_batches_refunds_and_clearing_racing_keep_the_payable_history_whole(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "at once: 3 batches of 2 captures (payable credited last), 4 refunds of 10 of earlier"
        " purchases (payable debited under its lock) and clearing of the day; then the next"
        " day's clearing (PostgreSQL, threads)",
        expected="every request answered (a refund finding the payable paid out: 409"
        " insufficient_merchant_balance); the payable never below zero in id order (ledger"
        " check ok); the two payouts are the captures less the refunds made; payable 0 after",
    ) as row:
        earlier: list[str] = []
        cards: list[CardApplet] = []
        for _ in range(4):
            card = world.issue()
            world.other_terminal.load(card, 1000)  # shop B sold the value
            earlier.append(world.terminal.purchase(card, 40)["id"])
            cards.append(card)
        groups = []
        for _ in range(3):
            group_cards, items = _captures(world, 2, 25, funder=world.other_terminal)
            cards += group_cards
            groups.append(items)
        day = clearing.business_day_of(world.clock())
        end = clearing.business_day_window(day)[1]
        start = threading.Barrier(3 + 4 + 1)

        def send(items: list[dict[str, Any]]) -> list[int]:
            start.wait(timeout=60)
            return [r["status"] for r in _responses(_batch(world, items))]

        def refund(payment_id: str) -> list[int]:
            start.wait(timeout=60)
            answer = _post(
                world, f"ref-{payment_id}", "/v1/refunds", {"payment": payment_id, "amount": 10}
            )
            return [answer.status_code, answer.json().get("code", "")]

        def clear() -> list[int]:
            start.wait(timeout=60)
            with world.factory() as session, session.begin():
                batch = clearing.run_batch(
                    session, world.merchant_id, day, end + dt.timedelta(hours=1)
                ).batch
                return [int(batch.payout)]

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(send, items) for items in groups]
            futures += [pool.submit(refund, payment_id) for payment_id in earlier]
            cleared = pool.submit(clear)
            statuses = [future.result(timeout=120) for future in futures]
            first = cleared.result(timeout=120)[0]
        assert statuses[:3] == [[200, 200]] * 3, statuses
        # A refund that commits after clearing paid the payable out and before the batches'
        # credits finds nothing to draw on: refused, a specific 409 that changes nothing.
        refused = [[409, "insufficient_merchant_balance"]]
        assert all(s in ([201, ""], *refused) for s in statuses[3:]), statuses
        refunded = 10 * sum(1 for s in statuses[3:] if s[0] == 201)
        assert _ledger_problems(world) == []
        next_day = day + dt.timedelta(days=1)
        with world.factory() as session, session.begin():
            second = int(
                clearing.run_batch(
                    session, world.merchant_id, next_day, clearing.business_day_window(next_day)[1]
                ).batch.payout
            )
        assert first + second == 4 * 40 + 6 * 25 - refunded, (first, second, refunded)
        assert _payable(world)[:2] == (0, 0)
        assert _ledger_problems(world) == []
        row.observed = (
            f"batches {statuses[:3]}, refunds {[s[0] for s in statuses[3:]]};"
            f" payouts {first} + {second} = {first + second}; payable 0; ledger check ok"
        )


@pytest.mark.postgres
def test_the_same_keys_in_opposite_orders_at_once_create_each_payment_once(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    rounds, size = 5, 6
    with proof.row(
        SUITE,
        f"a client resends a batch of {size} keyed creates with its items in the opposite"
        f" order over a second connection, both at once ({rounds} rounds; the keys' plain"
        " INSERTs may wait on each other in opposite orders; PostgreSQL, threads)",
        expected="both batches answered 200 every round, each key one payment, both batches"
        " showing the same payment for a key; no 500",
    ) as row:
        made = 0
        for r in range(rounds):
            items = [
                {"path": "/v1/payments", "idempotency_key": f"r{r}-k{i}", "body": {"amount": i + 1}}
                for i in range(size)
            ]
            start = threading.Barrier(2)

            def send(order: list[dict[str, Any]], start: threading.Barrier = start) -> Any:
                start.wait(timeout=60)
                return _batch(world, order)

            with ThreadPoolExecutor(2) as pool:
                forward = pool.submit(send, items)
                backward = pool.submit(send, items[::-1])
                answers = (forward.result(timeout=120), backward.result(timeout=120))
            one, two = (_responses(answer) for answer in answers)
            assert [r["status"] for r in one + two] == [201] * (2 * size)
            assert [r["body"]["id"] for r in one] == [r["body"]["id"] for r in two[::-1]]
            made += size
        with world.factory() as session:
            count = session.scalar(select(func.count()).select_from(Payment))
        assert count == made
        row.observed = f"{rounds} rounds: all 200, {count} payments for {made} keys"
