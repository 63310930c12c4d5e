"""Red-team attacks on issue 20's batch fast path as merged (i20-batchfixed, i20-peritem):
the API key and the batch's keys read off the ORM, the fast path without its SAVEPOINT
(a refusal rolls the whole transaction back and reruns per item), the socket-level
liveness check that replaced ``pool_pre_ping``, the flattened NUL and plain-JSON checks,
the kept isoformat text and the kept BCD date and time of the MAC data.

Tried as a stolen/revoked key, another merchant, a hostile merchant (reused keys, odd
Unicode, deep bodies), faults (a refusal after every fast-path write, a backend terminated
mid-batch and in the pool, a server whose sockets are past FD_SETSIZE) and a caller of the
protocol library with times in other zones. Rows go to the ``attacks_fastpath`` table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
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
    Terminal,
    World,
    database_url,
    make_world,
    ok,
)
from webpurse.card import CardApplet
from webpurse.protocol import host
from webpurse.protocol.records import encode_bcd_date, encode_bcd_time
from webpurse.settlement import batch, ledger
from webpurse.settlement.db import make_engine
from webpurse.settlement.models import ApiKey, IdempotencyRecord, Payment, PaymentHold

SUITE = "attacks_fastpath"


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


def _batch(world: World, items: list[dict[str, Any]], who: str = "") -> httpx.Response:
    return world.client.post(
        "/v1/batch", json={"requests": items}, headers=world.auth(who or world.merchant_key)
    )


def _responses(answer: httpx.Response) -> list[dict[str, Any]]:
    assert answer.status_code == 200, answer.text
    return list(answer.json()["responses"])


def _create(amount: int, key: str | None) -> dict[str, Any]:
    return {"path": "/v1/payments", "idempotency_key": key, "body": {"amount": amount}}


def _authorise(
    terminal: Terminal, payment_id: str, card: CardApplet, amount: int, key: str
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


def _counts(world: World) -> tuple[int, int, int]:
    with world.factory() as session:
        return (
            int(session.scalar(select(func.count()).select_from(Payment)) or 0),
            int(session.scalar(select(func.count()).select_from(PaymentHold)) or 0),
            int(session.scalar(select(func.count()).select_from(IdempotencyRecord)) or 0),
        )


# --- keys: revoked, rotated, another merchant's -----------------------------------------------


def test_a_revoked_key_is_refused_at_once_and_a_rotated_one_works(
    world: World, proof: Proof
) -> None:
    from webpurse.settlement.auth import MERCHANT, new_api_key

    with proof.row(
        SUITE,
        f"stolen key: the merchant rotates (a new key) and revokes the old one between two"
        f" batches; the thief replays its batch with the old key (the key lookup is now a Core"
        f" statement built once: any caching?) ({backend(world)})",
        expected="the old key is 401 on the batch and the single endpoint right after the"
        " revocation commits, nothing created; the new key works and replays the old key's"
        " answers (keys are per merchant, not per API key)",
    ) as row:
        items = [_create(11, "rot-1"), _create(12, "rot-2")]
        first = _responses(_batch(world, items))
        assert [a["status"] for a in first] == [201, 201]
        with world.factory() as session, session.begin():
            _, fresh = new_api_key(
                session, MERCHANT, world.clock(), merchant_id=world.merchant_id, name="rotated"
            )
            session.execute(
                update(ApiKey)
                .where(ApiKey.name != "rotated", ApiKey.merchant_id == world.merchant_id)
                .values(revoked_at=world.clock())
            )
        stolen = _batch(world, [_create(13, "rot-3")])
        single = world.client.post(
            "/v1/payments", json={"amount": 13}, headers=world.auth(world.merchant_key)
        )
        replay = _responses(_batch(world, items, fresh))
        assert (stolen.status_code, single.status_code) == (401, 401), stolen.text
        assert [a["replayed"] for a in replay] == [True, True]
        assert [a["body"] for a in replay] == [a["body"] for a in first]
        assert _counts(world)[0] == 2
        row.observed = (
            f"old key: batch {stolen.status_code}, single {single.status_code}; new key"
            f" replays {len(replay)} answers; 2 payments"
        )


def test_another_merchants_key_never_reads_my_keys_through_the_bound_lookup(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"merchant B sends A's idempotency keys with A's bodies in one batch, and one key"
        f" holding U+0000 beside them (the bound lookup falls back to the old statement for"
        f" it) ({backend(world)})",
        expected="B's items create B's own payments (new ids, B's merchant), never A's"
        " stored answers; the NUL key is 400 invalid_idempotency_key; A's replay is still A's",
    ) as row:
        items = [_create(21, "shared-1"), _create(22, 'shared-"2\\{,}')]
        mine = _responses(_batch(world, items))
        theirs = _responses(_batch(world, [*items, _create(23, "nul\x00key")], world.other_key))
        assert [a["status"] for a in theirs] == [201, 201, 400]
        assert theirs[2]["body"]["code"] == "invalid_idempotency_key"
        assert not any(a["replayed"] for a in theirs)
        assert {a["body"]["id"] for a in theirs[:2]}.isdisjoint(a["body"]["id"] for a in mine)
        with world.factory() as session:
            owners = session.scalars(
                select(Payment.merchant_id).where(
                    Payment.id.in_([a["body"]["id"] for a in theirs[:2]])
                )
            ).all()
        assert world.merchant_id not in owners and len(owners) == 2
        again = _responses(_batch(world, items))
        assert [a["body"] for a in again] == [a["body"] for a in mine]
        row.observed = "B: 201, 201 (B's own), 400 invalid_idempotency_key; A replays A's"


# --- the fast path refused after all its writes --------------------------------------------


def test_a_fast_path_refused_after_its_writes_reruns_per_item_with_nothing_left_over(
    world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    with proof.row(
        SUITE,
        f"a batch of creates and authorisations whose fast path is refused after it wrote"
        f" everything (payments, holds, terminal sequence numbers, keys), then replayed, and"
        f" one item replayed on its single endpoint ({backend(world)})",
        expected="the rerun answers every item as the single endpoints would (201s, 200s),"
        " the rolled-back attempt leaves nothing (one payment per create, one hold and one"
        " distinct terminal sequence number per authorisation, one key per item, ledger"
        " balanced); replays are byte for byte the first answers on both paths",
    ) as row:
        n = 4
        cards = [world.funded_card(1_000) for _ in range(n)]
        created = _responses(_batch(world, [_create(100, f"fp-c{i}") for i in range(n)]))
        ids = [a["body"]["id"] for a in created]
        real_write = batch._write
        refused: list[int] = []

        def write_then_refuse(ctx: Any, writes: Any) -> None:
            real_write(ctx, writes)
            ctx.session.flush()
            refused.append(1)
            raise ledger.LedgerError("injected after every fast-path write")

        monkeypatch.setattr(batch, "_write", write_then_refuse)
        items = [
            *[_create(50 + i, f"fp-new{i}") for i in range(2)],
            *[
                _authorise(world.terminal, pid, card, 100, f"fp-a{i}")
                for i, (pid, card) in enumerate(zip(ids, cards, strict=True))
            ],
        ]
        raw = _batch(world, items)
        answers = _responses(raw)
        monkeypatch.undo()
        assert refused == [1]
        assert [a["status"] for a in answers] == [201, 201] + [200] * n, answers
        assert [a["replayed"] for a in answers] == [False] * (n + 2)
        with world.factory() as session:
            seqs = session.scalars(
                select(Payment.terminal_seq).where(Payment.terminal_seq.is_not(None))
            ).all()
            assert ledger.balance(session, ledger.HELD_PURCHASES) == 100 * n
            assert ledger.check(session).ok
        payments, holds, keys = _counts(world)
        assert (payments, holds, keys) == (n + 2, n, 2 * n + 2)
        assert len(seqs) == n and len(set(seqs)) == n
        again = _batch(world, items)
        assert [a["replayed"] for a in _responses(again)] == [True] * (n + 2)
        # byte for byte: the same bodies, only "replayed" differs
        assert again.text.replace('"replayed":true', '"replayed":false') == raw.text
        single = world.client.post(
            f"/v1/payments/{ids[0]}/authorise",
            json=items[2]["body"],
            headers={**world.auth(world.merchant_key), "idempotency-key": "fp-a0"},
        )
        assert single.status_code == 200 and single.headers.get("idempotent-replayed") == "true"
        assert single.json() == answers[2]["body"]
        assert _counts(world) == (payments, holds, keys)
        row.observed = (
            f"refused once; rerun {[a['status'] for a in answers]}; {payments} payments,"
            f" {holds} holds, {len(set(seqs))} distinct terminal seqs, {keys} keys; replays"
            " byte for byte"
        )


# --- PostgreSQL: a backend terminated mid-batch, and in the pool ------------------------------


def _terminate(world: World, pids: list[int]) -> None:
    admin = make_engine(world.url, pool_size=1)
    try:
        with admin.connect() as connection:
            for pid in pids:
                connection.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
            connection.commit()
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_a_backend_terminated_mid_batch_leaves_nothing_and_the_next_batch_works(
    pg_world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "fault: another connection runs pg_terminate_backend on the batch's own backend after"
        " the fast path wrote its payments and holds, before the commit (PostgreSQL)",
        expected="the batch fails (an error, no partial write: no payment, hold or key of"
        " it); the same batch sent again is answered afresh (the pool drops the dead"
        " connection) with one payment per create",
    ) as row:
        real_write = batch._write

        def write_then_die(ctx: Any, writes: Any) -> None:
            real_write(ctx, writes)
            ctx.session.flush()
            pid = ctx.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            _terminate(world, [int(pid)])

        before = _counts(world)
        monkeypatch.setattr(batch, "_write", write_then_die)
        items = [_create(31, "term-1"), _create(32, "term-2")]
        try:
            failed = _batch(world, items).status_code
        except Exception as error:  # the app raised: a client sees a 500
            failed = 500
            row.observed = f"terminated: {type(error).__name__}"
        monkeypatch.undo()
        assert failed >= 500
        assert _counts(world) == before
        answers = _responses(_batch(world, items))
        assert [(a["status"], a["replayed"]) for a in answers] == [(201, False)] * 2
        assert _counts(world)[0] == before[0] + 2
        row.observed = f"{row.observed or 'terminated'} ({failed}), nothing kept; resent: 201, 201"


@pytest.mark.postgres
def test_every_pooled_backend_terminated_between_requests_is_not_a_500(
    pg_world: World, proof: Proof
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "fault: every idle pooled connection's backend is terminated between two batches"
        " (a failover, an idle_session_timeout): the liveness check at checkout replaced"
        " pool_pre_ping (PostgreSQL)",
        expected="the next batch and single request are answered (201), never a 500",
    ) as row:
        assert _responses(_batch(world, [_create(41, "pool-1")]))[0]["status"] == 201
        admin = make_engine(world.url, pool_size=1)
        try:
            with admin.connect() as connection:
                pids = connection.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalars()
                pid_list = [int(p) for p in pids]
        finally:
            admin.dispose()
        _terminate(world, pid_list)
        after = _batch(world, [_create(42, "pool-2")])
        single = world.client.post(
            "/v1/payments", json={"amount": 43}, headers=world.auth(world.merchant_key)
        )
        assert _responses(after)[0]["status"] == 201 and single.status_code == 201
        row.observed = f"{len(pid_list)} backends terminated; batch 201, single 201"


@pytest.mark.postgres
def test_a_pooled_socket_past_fd_setsize_is_checked_out(tmp_path: Path, proof: Proof) -> None:
    """A busy server holds more than 1024 descriptors: ``select.select`` refuses any past
    FD_SETSIZE (ValueError), so a liveness check built on it failed every checkout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("cannot open 1200 descriptors here")
    with proof.row(
        SUITE,
        "fault: a server with more than 1024 open descriptors (many clients): the pooled"
        " PostgreSQL connection's socket is past select()'s FD_SETSIZE at checkout",
        expected="the connection is checked out and used (no ValueError), and one the"
        " server closed is still replaced",
    ) as row:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
        filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        try:
            with database_url("postgresql", tmp_path) as url:
                engine = make_engine(url, pool_size=1, max_overflow=0)
                try:
                    with engine.connect() as connection:
                        fd = connection.connection.dbapi_connection.pgconn.socket  # type: ignore[union-attr]
                        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
                    assert fd > 1024
                    outcome = "ok"
                    try:
                        with engine.connect() as connection:
                            assert connection.execute(text("SELECT 1")).scalar_one() == 1
                    except ValueError as error:
                        outcome = f"ValueError: {error}"
                    row.observed = f"socket fd {fd}: second checkout {outcome}"
                    assert outcome == "ok"
                    admin = make_engine(url, pool_size=1)
                    try:
                        with admin.connect() as other:
                            other.execute(text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid})
                            other.commit()
                    finally:
                        admin.dispose()
                    with engine.connect() as connection:
                        fresh = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
                    assert fresh != pid
                    row.observed += "; a terminated one replaced"
                finally:
                    engine.dispose()
        finally:
            for fd_ in filler:
                os.close(fd_)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- bodies: NUL, odd Unicode, depth ---------------------------------------------------------


def test_nul_and_odd_unicode_in_nested_bodies_are_refused_per_item(
    world: World, proof: Proof
) -> None:
    deep: Any = "x\x00"
    for _ in range(60):
        deep = {"k": [deep]}
    with proof.row(
        SUITE,
        f"hostile merchant: U+0000 in a metadata key, a metadata value, an unknown member"
        f" nested 60 levels deep (objects in lists), beside items with U+FFFF, U+2028, RTL"
        f" marks, combining marks and astral characters in metadata ({backend(world)})",
        expected="each NUL item is refused (4xx) and creates nothing, the batch answers 200;"
        " the odd-Unicode items are created and replay byte for byte",
    ) as row:
        odd = {"\u202e\u2028k": "\uffff\u0301😀\u200f", "é": "\U0010fffd"}
        items = [
            {"path": "/v1/payments", "body": {"amount": 1, "metadata": {"a\x00": "v"}}},
            {"path": "/v1/payments", "body": {"amount": 1, "metadata": {"a": "v\x00"}}},
            {"path": "/v1/payments", "body": {"amount": 1, "extra": deep}},
            {
                "path": "/v1/payments",
                "idempotency_key": "odd-\u2028",
                "body": {"amount": 2, "metadata": odd},
            },
        ]
        first = _batch(world, items)
        answers = _responses(first)
        statuses = [a["status"] for a in answers]
        assert all(400 <= s < 500 for s in statuses[:3]), answers
        assert statuses[3] == 201 and answers[3]["body"]["metadata"] == odd
        again = _responses(_batch(world, items[3:]))
        assert again[0]["replayed"] and again[0]["body"] == answers[3]["body"]
        assert _counts(world)[0] == 1
        row.observed = f"items {statuses}; odd metadata stored and replayed as sent"


def test_a_body_nested_deeper_than_the_recursion_limit_is_not_a_500(
    world: World, proof: Proof
) -> None:
    """JSON lets ~1000 levels in; the NUL check walked lists two frames a level (a
    generator each), so lists 400 deep were a RecursionError: a 500 on every endpoint."""
    with proof.row(
        SUITE,
        f"hostile merchant: a body whose unknown member nests lists (or objects) 400, 950 and"
        f" 5000 levels deep, with and without a U+0000 at the bottom, keyed, on the batch and"
        f" the single endpoint (past Python's recursion limit for the NUL check)"
        f" ({backend(world)})",
        expected="a 4xx answer every time (the item 422, or the whole request 400), never a"
        " 500; nothing created",
    ) as row:
        seen: dict[str, int] = {}
        for depth in (400, 950, 5000):
            for opening, closing in (("[", "]"), ('{"a":', "}")):
                for bottom in ('"\\u0000"', '"x"'):
                    nested = opening * depth + bottom + closing * depth
                    body = '{"amount":1,"extra":' + nested + "}"
                    key = f"deep-{depth}-{opening[0]}-{len(bottom)}"
                    sent = {
                        "/v1/batch": '{"requests":[{"path":"/v1/payments","idempotency_key":"'
                        + key
                        + '","body":'
                        + body
                        + "}]}",
                        "/v1/payments": body,
                    }
                    for path, content in sent.items():
                        headers = {
                            **world.auth(world.merchant_key),
                            "content-type": "application/json",
                            "idempotency-key": key,
                        }
                        try:
                            answer = world.client.post(path, content=content, headers=headers)
                            status = answer.status_code
                            if status == 200:
                                (status,) = (r["status"] for r in answer.json()["responses"])
                        except RecursionError:
                            status = 500
                        seen[f"{path} {depth}{opening[0]}"] = status
        row.observed = ", ".join(sorted({f"{k}: {v}" for k, v in seen.items()}))
        assert all(400 <= status < 500 for status in seen.values()), seen
        assert _counts(world)[0] == 0


# --- the kept isoformat text and the kept BCD date and time ----------------------------------


def test_mac_date_and_time_equal_to_a_kept_one_in_another_zone_encode_their_own_digits(
    proof: Proof,
) -> None:
    plus_one = dt.timezone(dt.timedelta(hours=1))
    day = dt.date(2026, 12, 6)
    noon_paris = dt.time(12, 0, 0, tzinfo=plus_one)
    eleven_utc = dt.time(11, 0, 0, tzinfo=dt.UTC)  # == noon_paris, same hash
    late = dt.datetime(2026, 12, 6, 23, 30, tzinfo=dt.UTC)  # a datetime is a date
    early = dt.datetime(2026, 12, 7, 0, 30, tzinfo=plus_one)  # == late
    terminal = bytes.fromhex("112233445566")
    with proof.row(
        SUITE,
        "a caller of the protocol library (a terminal, another card's purchase) computes MAC"
        " data with a time equal to a kept one but in another zone (12:00+01:00 after"
        " 11:00Z), and a date given as an aware datetime equal to one of the day before",
        expected="each MAC data holds its own value's BCD digits, whatever came before (as"
        " encode_bcd_date/encode_bcd_time give them)",
    ) as row:
        got: list[str] = []
        want: list[str] = []
        for date, time in [
            (day, noon_paris),
            (day, eleven_utc),
            (late, dt.time(1, 2, 3)),
            (early, dt.time(1, 2, 3)),
        ]:
            data = host.purchase_mac1_data(amount=5, terminal_id=terminal, date=date, time=time)
            got.append(data[-7:].hex())
            want.append((encode_bcd_date(date) + encode_bcd_time(time)).hex())
        row.observed = f"date+time BCD {got}"
        assert got == want


def test_answers_of_one_batch_show_times_in_utc_and_replay_them_exactly(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"a batch's answers share one time object (kept isoformat text): creates in one"
        f" batch, then authorisations in the next at another instant, then replays of both"
        f" ({backend(world)})",
        expected="each answer's created_at is its batch's instant and updated_at its own"
        " step's, in UTC (+00:00); replays give the same text",
    ) as row:
        card = world.funded_card(1_000)
        created = _responses(_batch(world, [_create(100, "iso-c")]))
        t0 = world.clock()
        world.clock.advance(dt.timedelta(seconds=1, microseconds=7))
        pid = created[0]["body"]["id"]
        authorised = _responses(
            _batch(world, [_authorise(world.terminal, pid, card, 100, "iso-a")])
        )
        t1 = world.clock()
        body = authorised[0]["body"]
        assert created[0]["body"]["created_at"] == t0.astimezone(dt.UTC).isoformat()
        assert body["created_at"] == created[0]["body"]["created_at"]
        assert body["updated_at"] == t1.astimezone(dt.UTC).isoformat() != body["created_at"]
        replay = _responses(_batch(world, [_create(100, "iso-c")]))
        assert replay[0]["body"] == created[0]["body"]
        row.observed = f"created {body['created_at']}, updated {body['updated_at']}; replay equal"


# --- more keys: array-literal characters, duplicates under a refused fast path, forged keys ---


def test_keys_made_of_array_literal_syntax_read_back_as_themselves(
    world: World, proof: Proof
) -> None:
    keys = ["NULL", "null", "\\", '"', "{}", "{", "a,b", " ", " lead", "trail ", '\\"', "}{\\"]
    with proof.row(
        SUITE,
        f"hostile merchant: idempotency keys that are PostgreSQL array syntax (NULL, quotes,"
        f" backslashes, braces, commas, blanks) in one batch: the bound lookup sends them as"
        f" one array literal ({backend(world)})",
        expected="each key is its own (one payment each); the batch sent again replays every"
        " answer byte for byte; no key matches another's row",
    ) as row:
        items = [_create(60 + i, key) for i, key in enumerate(keys)]
        first = _batch(world, items)
        answers = _responses(first)
        assert [a["status"] for a in answers] == [201] * len(keys)
        assert [a["body"]["amount"] for a in answers] == [60 + i for i in range(len(keys))]
        again = _batch(world, items)
        assert [a["replayed"] for a in _responses(again)] == [True] * len(keys)
        assert again.text.replace('"replayed":true', '"replayed":false') == first.text
        assert _counts(world)[0] == len(keys)
        row.observed = f"{len(keys)} keys: {len(keys)} payments, all replayed byte for byte"


def test_duplicate_keys_in_a_refused_fast_path_and_reuse_across_endpoints(
    world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant: one batch holds the same key twice with the same body and once"
        f" more with another body (authorisations, fast path refused after its writes and"
        f" rerun), then the key is tried with another body on the single endpoint"
        f" ({backend(world)})",
        expected="the first is authorised, the repeat replays it, the other body is 422"
        " idempotency_key_reused (in the batch and on the single endpoint); one hold",
    ) as row:
        card, other = world.funded_card(1_000), world.funded_card(1_000)
        ids = [a["body"]["id"] for a in _responses(_batch(world, [_create(100, "dup-c1")]))]
        ids += [a["body"]["id"] for a in _responses(_batch(world, [_create(100, "dup-c2")]))]
        real_write = batch._write
        refused: list[int] = []

        def write_then_refuse(ctx: Any, writes: Any) -> None:
            real_write(ctx, writes)
            ctx.session.flush()
            refused.append(1)
            raise ledger.LedgerError("injected")

        monkeypatch.setattr(batch, "_write", write_then_refuse)
        first = _authorise(world.terminal, ids[0], card, 100, "dup-a")
        different = _authorise(world.terminal, ids[1], other, 100, "dup-a")
        answers = _responses(_batch(world, [first, first, different]))
        monkeypatch.undo()
        assert refused == [1]
        statuses = [(a["status"], a["replayed"]) for a in answers]
        assert statuses[:2] == [(200, False), (200, True)], answers
        assert answers[1]["body"] == answers[0]["body"]
        assert (answers[2]["status"], answers[2]["body"]["code"]) == (
            422,
            "idempotency_key_reused",
        )
        single = world.client.post(
            f"/v1/payments/{ids[1]}/authorise",
            json=different["body"],
            headers={**world.auth(world.merchant_key), "idempotency-key": "dup-a"},
        )
        assert (single.status_code, single.json()["code"]) == (422, "idempotency_key_reused")
        assert _counts(world)[1] == 1
        row.observed = (
            f"batch {[s for s, _ in statuses]} (the repeat replayed); single"
            f" {single.status_code} {single.json()['code']}; 1 hold"
        )


def test_forged_and_wrong_role_keys_are_refused_on_the_batch(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"anonymous visitor and stolen keys on POST /v1/batch: none, another scheme, a forged"
        f" sk_mer_ key, a real key in another case or with a trailing space, a NUL in it, the"
        f" operator's key ({backend(world)})",
        expected="401 for each forged/unknown key, 403 for the operator's (not a merchant);"
        " nothing created",
    ) as row:
        body = {"requests": [_create(70, "forged")]}
        real = world.merchant_key
        tried: dict[str, dict[str, str]] = {
            "none": {},
            "basic": {"authorization": f"Basic {real}"},
            "forged": {"authorization": "Bearer sk_mer_" + "0" * 48},
            "upper": {"authorization": f"Bearer {real.upper()}"},
            "space": {"authorization": f"Bearer {real} x"},
            "nul": {"authorization": f"Bearer {real[:-1]}\x00"},
            "operator": world.auth(world.operator_key),
        }
        seen: dict[str, int] = {}
        for name, headers in tried.items():
            try:
                seen[name] = world.client.post("/v1/batch", json=body, headers=headers).status_code
            except (httpx.LocalProtocolError, ValueError):
                seen[name] = 0  # the client refuses to send such a header
        row.observed = str(seen)
        assert seen.pop("operator") == 403
        assert set(seen.values()) <= {401, 0} and 401 in seen.values()
        assert _counts(world)[0] == 0


@pytest.mark.postgres
def test_a_backend_terminated_between_the_refusal_and_the_rerun_leaves_nothing(
    pg_world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pg_world
    with proof.row(
        SUITE,
        "fault: the fast path is refused after its writes, the transaction rolled back, and"
        " the backend is terminated before the per-item rerun's first statement (PostgreSQL)",
        expected="the batch fails (an error), nothing of either attempt is kept; sent again"
        " it is answered afresh, one payment per create and one hold per authorisation",
    ) as row:
        card = world.funded_card(1_000)
        pid = _responses(_batch(world, [_create(100, "rr-c")]))[0]["body"]["id"]
        real_write, real_run = batch._write, batch._run
        events: list[str] = []

        def write_then_refuse(ctx: Any, writes: Any) -> None:
            real_write(ctx, writes)
            ctx.session.flush()
            events.append("refused")
            raise ledger.LedgerError("injected")

        def die_before_rerun(ctx: Any, raw: Any, request_id: Any, *, fast: bool) -> Any:
            if not fast:
                backend_pid = ctx.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
                _terminate(world, [int(backend_pid)])
                events.append("terminated")
            return real_run(ctx, raw, request_id, fast=fast)

        monkeypatch.setattr(batch, "_write", write_then_refuse)
        monkeypatch.setattr(batch, "_run", die_before_rerun)
        items = [_create(81, "rr-new"), _authorise(world.terminal, pid, card, 100, "rr-a")]
        before = _counts(world)
        try:
            failed = _batch(world, items).status_code
        except Exception as error:  # the app raised: a client sees a 500
            failed, row.observed = 500, type(error).__name__
        monkeypatch.undo()
        assert events == ["refused", "terminated"] and failed >= 500
        assert _counts(world) == before
        answers = _responses(_batch(world, items))
        assert [(a["status"], a["replayed"]) for a in answers] == [(201, False), (200, False)]
        after = _counts(world)
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
        row.observed = f"{events}: {row.observed} ({failed}), nothing kept; resent: 201, 200"


@pytest.mark.postgres
def test_identical_batches_racing_with_every_fast_path_refused_answer_once(
    pg_world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = pg_world
    n, copies = 3, 3
    with proof.row(
        SUITE,
        f"concurrent client: {copies} copies of one batch of {n} authorisations (same keys,"
        f" same bodies) sent at once, every fast path refused after its writes (each batch"
        f" rolls back and reruns per item while the others run) (PostgreSQL)",
        expected="each authorisation happens once (one hold, one terminal sequence number"
        " each, ledger balanced); every copy answers each item with the same body (the"
        " others replayed), or 409 idempotency_in_flight for a whole copy; no 500",
    ) as row:
        cards = [world.funded_card(1_000) for _ in range(n)]
        created = _responses(_batch(world, [_create(100, f"race-c{i}") for i in range(n)]))
        ids = [a["body"]["id"] for a in created]
        items = [
            _authorise(world.terminal, pid, card, 100, f"race-a{i}")
            for i, (pid, card) in enumerate(zip(ids, cards, strict=True))
        ]
        real_write = batch._write
        refusals: list[int] = []

        def write_then_refuse(ctx: Any, writes: Any) -> None:
            real_write(ctx, writes)
            ctx.session.flush()
            refusals.append(1)
            raise ledger.LedgerError("injected")

        monkeypatch.setattr(batch, "_write", write_then_refuse)
        start = threading.Barrier(copies)

        def send() -> httpx.Response:
            start.wait(timeout=60)
            return _batch(world, items)

        with ThreadPoolExecutor(copies) as pool:
            sent = [pool.submit(send) for _ in range(copies)]
            answers = [future.result(timeout=120) for future in sent]
        monkeypatch.undo()
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {200, 409}, [a.text for a in answers]
        bodies: list[list[Any]] = [
            [r["body"] for r in a.json()["responses"]] for a in answers if a.status_code == 200
        ]
        assert bodies and all(b == bodies[0] for b in bodies)
        assert all(r["status"] == 200 for r in answers[statuses.index(200)].json()["responses"])
        with world.factory() as session:
            seqs = session.scalars(
                select(Payment.terminal_seq).where(Payment.terminal_seq.is_not(None))
            ).all()
            assert ledger.balance(session, ledger.HELD_PURCHASES) == 100 * n
            assert ledger.check(session).ok
        assert _counts(world)[1] == n and len(seqs) == n == len(set(seqs))
        row.observed = (
            f"copies answered {statuses}, {len(refusals)} fast paths refused; {n} holds,"
            f" {len(set(seqs))} distinct terminal seqs; bodies equal across copies"
        )


def test_replays_after_the_payment_moved_on_are_the_first_answers_byte_for_byte(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"a shopper's agent retries every step of a purchase after the payment moved on"
        f" (created and authorised in batches, captured on its endpoint, a second between"
        f" steps), each on the other path too: the answers are re-rendered as of their step"
        f" (renders_as_of, kept isoformat text) ({backend(world)})",
        expected="every replay is byte for byte the first answer of its step (status,"
        " updated_at, authorisation, tac as they were then), on the batch and on the"
        " single endpoint",
    ) as row:
        card = world.funded_card(1_000)
        create = _create(100, "rp-c")
        first_create = _responses(_batch(world, [create]))[0]["body"]
        pid = first_create["id"]
        world.clock.advance(dt.timedelta(seconds=1, microseconds=3))
        authorise = _authorise(world.terminal, pid, card, 100, "rp-a")
        first_authorise = _responses(_batch(world, [authorise]))[0]["body"]
        debit = ok(card, bytes.fromhex(first_authorise["authorisation"]["debit_apdu"]))
        world.clock.advance(dt.timedelta(seconds=1))
        capture = {
            "path": f"/v1/payments/{pid}/capture",
            "idempotency_key": "rp-cap",
            "body": {"debit_response": debit.hex()},
        }
        headers = {**world.auth(world.merchant_key), "idempotency-key": "rp-cap"}
        first_capture = world.client.post(capture["path"], json=capture["body"], headers=headers)
        assert first_capture.status_code == 200, first_capture.text
        world.clock.advance(dt.timedelta(seconds=1))
        firsts = [first_create, first_authorise, first_capture.json()]
        assert [f["status"] for f in firsts] == ["requires_card", "authorised", "succeeded"]
        replays = _responses(_batch(world, [create, authorise, capture]))
        assert [r["replayed"] for r in replays] == [True] * 3
        assert [r["body"] for r in replays] == firsts
        singles = []
        for item in (create, authorise, capture):
            answer = world.client.post(
                str(item["path"]),
                json=item["body"],
                headers={
                    **world.auth(world.merchant_key),
                    "idempotency-key": item["idempotency_key"],
                },
            )
            assert answer.headers.get("idempotent-replayed") == "true"
            singles.append(answer.content)
        assert singles[2] == first_capture.content
        assert [json.loads(s) for s in singles] == firsts
        row.observed = "create, authorise, capture replayed on both paths: " + ", ".join(
            f"{f['status']}@{f['updated_at']}" for f in firsts
        )


def test_a_refused_fast_path_of_captures_leaves_no_event_or_delivery_of_its_own(
    world: World, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    from webpurse.settlement.webhooks.tables import WebhookEvent, WebhookMessage

    with proof.row(
        SUITE,
        f"a merchant with a webhook endpoint captures purchases in one batch whose fast path"
        f" is refused after it wrote the captures, their ledger entries and their"
        f" payment.succeeded events and deliveries ({backend(world)})",
        expected="exactly one payment.succeeded event and one pending delivery per capture"
        " (none from the rolled-back attempt); every capture 200 succeeded; ledger balanced",
    ) as row:
        hook = world.client.post(
            "/v1/webhook_endpoints",
            json={"url": "https://shop.example/hook", "events": ["*"]},
            headers=world.auth(world.merchant_key),
        )
        assert hook.status_code == 201, hook.text
        n = 3
        items: list[dict[str, Any]] = []
        for i in range(n):
            card = world.funded_card(1_000)
            payment = world.terminal.create_payment(100)
            issuer, init = world.terminal.purchase_batch1(card, 100)
            answer = world.terminal.authorise_payment(payment["id"], issuer, init)
            assert answer.status_code == 200, answer.text
            debit = ok(card, bytes.fromhex(answer.json()["authorisation"]["debit_apdu"]))
            items.append(
                {
                    "path": f"/v1/payments/{payment['id']}/capture",
                    "idempotency_key": f"ev-cap{i}",
                    "body": {"debit_response": debit.hex()},
                }
            )
        with world.factory() as session:
            events_before = session.scalar(select(func.count()).select_from(WebhookEvent)) or 0
            messages_before = session.scalar(select(func.count()).select_from(WebhookMessage)) or 0
        real_write = batch._write
        refused: list[int] = []

        def write_then_refuse(ctx: Any, writes: Any) -> None:
            real_write(ctx, writes)
            ctx.session.flush()
            refused.append(1)
            raise ledger.LedgerError("injected")

        monkeypatch.setattr(batch, "_write", write_then_refuse)
        answers = _responses(_batch(world, items))
        monkeypatch.undo()
        assert refused == [1]
        assert [(a["status"], a["body"]["status"]) for a in answers] == [(200, "succeeded")] * n
        with world.factory() as session:
            succeeded = session.scalar(
                select(func.count())
                .select_from(WebhookEvent)
                .where(WebhookEvent.type == "payment.succeeded")
            )
            events = (session.scalar(select(func.count()).select_from(WebhookEvent)) or 0) - (
                events_before
            )
            messages = (session.scalar(select(func.count()).select_from(WebhookMessage)) or 0) - (
                messages_before
            )
            assert ledger.check(session).ok
        assert succeeded == events == messages == n
        row.observed = f"refused once; {events} new events ({succeeded} payment.succeeded),"
        row.observed += f" {messages} deliveries"
