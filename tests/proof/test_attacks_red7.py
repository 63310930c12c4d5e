"""Red-team attacks on issue 20 session 7's merged changes (i20-rows, i20-decide, i20-answers,
i20-edge: 143572e..83deb3f).

Tried as an anonymous visitor, a stolen, revoked or operator key and another merchant
against ``POST /v1/batch``'s one-pass body parsing and its key check inside the route; as
a hostile merchant against the batch response encoded once (stored bodies replayed as
``orjson.Fragment``), against answers stored by reference under odd clocks (``_Isoformat``
reused by equality) and against the fast path's order shortcut (``_none_before``); and
against the row-id pool, the kept CBC-MAC chains, the cached BCD dates, the shared plain
approval and the fingerprint's ``plain`` shortcut. Real components: the settlement app
(ASGI) on SQLite and PostgreSQL, the card applet, the software security module. Rows go to
the ``attacks_red7`` proof table.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import multiprocessing
import random as pyrandom
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import func, select, update

from tests.proof.conftest import Proof
from tests.settlement.support import (
    BACKENDS,
    START,
    FakeClock,
    World,
    database_url,
    fingerprint_formula,
    make_world,
    ok,
)
from webpurse.protocol import crypto
from webpurse.protocol.cipher import DES_SUITE
from webpurse.protocol.errors import ProtocolError
from webpurse.protocol.records import decode_bcd_date
from webpurse.settlement import batch, db, decisions, idempotency
from webpurse.settlement.auth import hash_key
from webpurse.settlement.models import ApiKey, Entry, IdempotencyRecord, Payment, PaymentHold
from webpurse.settlement.schemas import BatchIn
from webpurse.settlement.security import SoftwareSecurityModule

SUITE = "attacks_red7"


def backend(world: World) -> str:
    return "PostgreSQL" if world.url.startswith("postgresql") else "SQLite"


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def _counts(world: World) -> tuple[int, ...]:
    with world.factory() as session:
        return tuple(
            int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Payment, Entry, PaymentHold, IdempotencyRecord)
        )


def _create_items(n: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "path": "/v1/payments",
            "idempotency_key": f"{prefix}-{i}",
            "body": {"amount": 5 + i, "description": "d"},
        }
        for i in range(n)
    ]


# --- 1. the batch body parsed in one pass; the key checked inside the route ---------------


def test_batch_callers_are_refused_before_anything_runs(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"anonymous, wrong-scheme, unknown, operator and revoked keys POST /v1/batch with a"
        f" valid body (parsed in one pass, key checked in the route), a schema-invalid one"
        f" (0 or 1001 items, extra members), malformed JSON, an empty body, U+0000, a BOM,"
        f" UTF-16, nesting past 200 levels and duplicate keys, under no content type,"
        f" text/plain, application/json; charset=utf-8, APPLICATION/JSON and"
        f" application/x+json; a body past the batch limit; a merchant key revoked"
        f" between two batches ({backend(world)})",
        expected="every non-merchant caller gets the same 401/403 problem (status, body,"
        " WWW-Authenticate) for a valid body as for a schema-invalid one; malformed JSON"
        " is answered as on the single route (/v1/payments); nothing is stored for any of"
        " them; past the limit 413 for anyone; the revoked key is refused on its very next batch",
    ) as row:
        revoked_key = world.merchant_key
        valid = json.dumps({"requests": _create_items(2, "anon")}).encode()
        bodies: dict[str, bytes] = {
            "valid": valid,
            "valid+bom": b"\xef\xbb\xbf" + valid,
            "valid-utf16": valid.decode().encode("utf-16"),
            "valid-dup-keys": valid[:-1] + b',"requests":' + valid[13:],
            "valid-nul": json.dumps(
                {"requests": [{"path": "/v1/payments", "body": {"amount": 1, "d": "\x00"}}]}
            ).encode(),
            "valid-deep": json.dumps(
                {"requests": [{"path": "/v1/payments", "body": {"a": [[[[[[0]]]]]] * 2}}]}
            )
            .replace("[[[[[[0]]]]]]", "[" * 250 + "]" * 250)
            .encode(),
            "none-items": b'{"requests": []}',
            "too-many-items": json.dumps({"requests": _create_items(1001, "many")}).encode(),
            "extra-member": b'{"requests": [{"path": "/v1/payments"}], "x": 1}',
            "malformed": b'{"requests": [',
            "empty": b"",
        }
        with world.factory() as session:
            from webpurse.settlement.auth import OPERATOR, new_api_key

            with session.begin():
                _, second_key = new_api_key(
                    session, "merchant", world.clock(), world.merchant_id, "second"
                )
        assert OPERATOR
        callers: dict[str, dict[str, str]] = {
            "anonymous": {},
            "basic": {"authorization": "Basic " + world.merchant_key},
            "bearer-empty": {"authorization": "Bearer "},
            "unknown": {"authorization": "Bearer sk_mer_" + "A" * 43},
            "operator": world.auth(world.operator_key),
            "revoked": world.auth(revoked_key),
        }
        types = [
            None,
            "text/plain",
            "application/json; charset=utf-8",
            "APPLICATION/JSON",
            "application/x+json",
        ]
        # the merchant's key works, then is revoked: refused on its very next batch
        first = world.client.post(
            "/v1/batch",
            content=valid,
            headers={**world.auth(revoked_key), "content-type": "application/json"},
        )
        assert first.status_code == 200, first.text
        with world.factory() as session, session.begin():
            session.execute(
                update(ApiKey)
                .where(ApiKey.key_hash == hash_key(revoked_key))
                .values(revoked_at=world.clock())
            )
        before = _counts(world)
        seen: dict[tuple[str, str | None], set[tuple[int, str, str | None]]] = {}
        answers = 0
        for caller, auth in callers.items():
            for content_type in types:
                headers = dict(auth)
                if content_type is not None:
                    headers["content-type"] = content_type
                for name, body in bodies.items():
                    answer = world.client.post("/v1/batch", content=body, headers=headers)
                    answers += 1
                    assert answer.status_code < 500, (caller, content_type, name, answer.text)
                    if name in ("malformed",) and content_type not in ("text/plain",):
                        single = world.client.post("/v1/payments", content=body, headers=headers)
                        assert answer.status_code == single.status_code, (caller, content_type)
                        continue
                    assert answer.status_code in (401, 403), (caller, content_type, name)
                    key = (caller, content_type)
                    seen.setdefault(key, set()).add(
                        (
                            answer.status_code,
                            re.sub(r'"request_id":"req_[0-9a-f]+"', "", answer.text),
                            answer.headers.get("www-authenticate"),
                        )
                    )
        # past the batch's body limit: 413 before routing and authentication, for anyone
        huge = b'{"requests": [' + b" " * world.settings.max_batch_body_bytes + b"]}"
        for auth in (callers["anonymous"], world.auth(second_key)):
            answer = world.client.post(
                "/v1/batch", content=huge, headers={**auth, "content-type": "application/json"}
            )
            assert answer.status_code == 413, answer.text[:200]
        assert _counts(world) == before
        differing = {key: v for key, v in seen.items() if len(v) != 1}
        assert differing == {}, differing
        assert {next(iter(v))[0] for k, v in seen.items() if k[0] == "operator"} == {403}
        # another merchant key of the same merchant still works after the revocation
        still = world.client.post(
            "/v1/batch",
            content=json.dumps({"requests": _create_items(1, "second")}).encode(),
            headers={"authorization": f"Bearer {second_key}", "content-type": "application/json"},
        )
        assert still.status_code == 200, still.text
        row.observed = (
            f"{answers} requests of {len(callers)} callers x {len(types)} content types x"
            f" {len(bodies)} bodies: one answer per caller whatever the body (operator 403,"
            " others 401), malformed JSON as on /v1/payments; nothing stored; the revoked"
            " key refused on its next batch, the merchant's other key still served"
        )


def test_the_one_pass_parser_accepts_what_the_standard_library_accepts(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "batch bodies where pydantic's JSON parser and json.loads could differ: NaN,"
        " ±Infinity, 1e999, integers of 20/4301/5000 digits, -0, 1.0, 1E2, 0.1 with 40"
        " digits, 4.9e-325, raw control characters and tab, duplicate keys (inner, item,"
        " outer), a BOM, UTF-16, invalid and overlong UTF-8, UTF-8-encoded surrogates, lone"
        " and paired \\u surrogates, leading zeros, +1, .5, 5., 0x10, trailing commas and"
        " text, \\v \\f and U+00A0 as whitespace, nesting of 250 and 2000 levels",
        expected="where the one-pass parser accepts a body, json.loads + validation accepts"
        " it too with the identical BatchIn (values and float bits alike); everything else"
        " falls back to the standard library's way, as before",
    ) as row:
        adapter: TypeAdapter[BatchIn] = TypeAdapter(BatchIn)

        def item(body: bytes) -> bytes:
            head = b'{"requests":[{"path":"/v1/payments","idempotency_key":"k","body":'
            return head + body + b"}]}"

        raw = [
            b"NaN", b"Infinity", b"-Infinity", b"1e999", b"9" * 20, b"9" * 4301, b"9" * 5000,
            b"-0", b"1.0", b"1E2", b"0.1000000000000000055511151231257827", b"4.9e-325",
            b"123456789012345678901234567890.5", b"01", b"+1", b".5", b"5.", b"0x10", b"-",
            b'"a\x01b"', b'"a\tb"', b'"a\x00b"', b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"',
            b'"\\ud800"', b'"\\ud83d\\ude00"', b'"\\x41"', b'"\\/"', b'"\x7f"', b"True",
            "\"\u2028\uffff\"".encode(), b"[" * 250 + b"]" * 250, b"[" * 2000 + b"]" * 2000,
        ]  # fmt: skip
        cases = [item(b'{"v":' + value + b"}") for value in raw]
        cases += [
            item(b'{"amount":1,"amount":2}'),
            item(b'{"\\udfff":1}'),
            item(b'{"a":1,}'),
            item(b"{}") + b"x",
            item(b"{}") + b" \n\t\r",
            item(b"{}") + b"\x0b",
            item(b"{}") + b"\x0c",
            item(b"{}") + b"\xc2\xa0",
            b"\xef\xbb\xbf" + item(b"{}"),
            item(b'{"d":"x"}').decode().encode("utf-16"),
            b'{"requests":[{"path":"/x","idempotency_key":"a","idempotency_key":"b"}]}',
            b'{"requests":[],"requests":[{"path":"/v1/payments","body":{"amount":1}}]}',
            b'{"requests":[{"path":5}]}',
            b'{"requests":[{"path":"/v1/payments","idempotency_key":5}]}',
            b"",
        ]
        one_pass = 0
        for case in cases:
            try:
                parsed = adapter.validate_json(case)
            except ValidationError:
                continue  # the route parses it the old way (json.loads)
            one_pass += 1
            old = adapter.validate_python(json.loads(case))
            assert repr(parsed.model_dump()) == repr(old.model_dump()), case[:80]
        row.observed = (
            f"{len(cases)} bodies: {one_pass} parsed in one pass, each the same BatchIn as"
            f" json.loads gives; {len(cases) - one_pass} go the standard library's way"
        )


# --- 2. the response encoded once: replays byte for byte -----------------------------------


def _swap_replayed(content: bytes) -> bytes:
    return content.replace(b'"replayed":false', b'"replayed":true')


def test_replayed_batches_are_byte_identical(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant's batch mixing creates with non-ASCII descriptions and metadata"
        f" (CJK, astral, U+2028, DEL, quotes, backslashes, </script>), a 2^32-1 amount,"
        f" refusals (404 unknown payment, a cancel of a canceled payment, 422 wrong"
        f" amount type, 422 a 64-bit-overflowing amount, a 402 decline of 100 on a card"
        f" of 50), a duplicate key in the batch and a cancel; then the same batch again, its"
        f" keys' answers on the single routes, and the batch again with new items between"
        f" the replayed ones ({backend(world)})",
        expected="the replayed batch is byte-identical to the first (replayed: true aside);"
        " each key's answer on the single route is the batch's body; new items beside"
        " replays are answered, replays are unchanged bytes",
    ) as row:
        terminal = world.terminal
        card = world.funded_card(50)
        pid = terminal.create_payment(100)["id"]
        issuer, init = terminal.purchase_batch1(card, 40)  # 100 on a card of 50: declined
        canceled = terminal.create_payment(7)["id"]
        assert terminal.post(f"/v1/payments/{canceled}/cancel").status_code == 200
        odd = 'caf\u00e9 \u952e \U0001f600 \u2028 \x7f " \\ </script>'
        items: list[dict[str, Any]] = [
            {
                "path": "/v1/payments",
                "idempotency_key": "r-0",
                "body": {
                    "amount": 0xFFFFFFFF,
                    "description": odd,
                    "metadata": {"\u952e": odd, "k": "\\u0000"},
                },
            },
            {"path": "/v1/payments/pay_nope/cancel", "idempotency_key": "r-1", "body": {}},
            {"path": f"/v1/payments/{canceled}/cancel", "idempotency_key": "r-2", "body": {}},
            {"path": "/v1/payments", "idempotency_key": "r-3", "body": {"amount": "5"}},
            {"path": "/v1/payments", "idempotency_key": "r-4", "body": {"amount": 2**64}},
            {
                "path": f"/v1/payments/{pid}/authorise",
                "idempotency_key": "r-5",
                "body": {
                    "issuer_data": issuer.hex(),
                    "initialize_response": init.hex(),
                    "terminal_id": world.terminal_id,
                },
            },
            {"path": "/v1/payments", "idempotency_key": "r-0", "body": items_0_body()},
            {"path": "/v1/payments", "idempotency_key": "r-7", "body": {"amount": 9}},
        ]
        headers = {**world.auth(world.merchant_key), "content-type": "application/json"}
        first = world.client.post(
            "/v1/batch", content=json.dumps({"requests": items}), headers=headers
        )
        assert first.status_code == 200, first.text
        statuses = [r["status"] for r in first.json()["responses"]]
        assert statuses[:2] == [201, 404] and statuses[3:6] == [422, 422, 402], statuses
        again = world.client.post(
            "/v1/batch", content=json.dumps({"requests": items}), headers=headers
        )
        replayed = [r["replayed"] for r in again.json()["responses"]]
        stored = [i for i, r in enumerate(first.json()["responses"]) if r["status"] != 422]
        assert all(replayed[i] for i in stored), replayed
        # byte for byte: each stored answer's body as first sent; the rest (refused by the
        # schema, stored nowhere: run again) alike but for their request ids
        want, got = first.json()["responses"], again.json()["responses"]
        first_bytes = re.findall(rb'"body":(\{.*?\}),"replayed"', first.content)
        again_bytes = re.findall(rb'"body":(\{.*?\}),"replayed"', again.content)
        assert len(first_bytes) == len(again_bytes) == len(items)
        for index in stored:
            assert first_bytes[index] == again_bytes[index], index
        assert [(a["status"], a["body"].get("code")) for a in want] == [
            (b["status"], b["body"].get("code")) for b in got
        ]

        def bare(content: bytes) -> bytes:
            content = re.sub(rb'"request_id":"req_[0-9a-f]+"', b"", content)
            return re.sub(rb'"replayed":(true|false)', b"", content)

        assert bare(again.content) == bare(first.content)
        # the same keys on the single routes answer the batch's bodies
        for index in stored:
            item = items[index]
            if index == 6:
                continue
            single = world.client.post(
                item["path"],
                content=json.dumps(item["body"]),
                headers={**headers, "idempotency-key": item["idempotency_key"]},
            )
            assert single.status_code == want[index]["status"], (index, single.text)
            assert single.json() == want[index]["body"], index
        # replays mixed with new items and a refusal, in any order
        mixed = [items[7], *_create_items(2, "new"), items[0], items[1], items[5]]
        third = world.client.post(
            "/v1/batch", content=json.dumps({"requests": mixed}), headers=headers
        )
        answers = third.json()["responses"]
        assert [a["replayed"] for a in answers] == [True, False, False, True, True, True]
        for at, index in ((0, 7), (3, 0), (4, 1), (5, 5)):
            assert answers[at]["body"] == want[index]["body"]
            assert json.dumps(answers[at]["body"]) == json.dumps(want[index]["body"])
        row.observed = (
            f"statuses {statuses}; the replayed batch byte-identical to the first"
            f" ({len(first.content)} bytes); {len(stored) - 1} keys answer alike on the"
            " single routes; a mixed batch of replays and new items answered each right"
        )


def items_0_body() -> dict[str, Any]:
    odd = 'caf\u00e9 \u952e \U0001f600 \u2028 \x7f " \\ </script>'
    return {"amount": 0xFFFFFFFF, "description": odd, "metadata": {"\u952e": odd, "k": "\\u0000"}}


# --- 3. answers stored by reference under odd clocks ----------------------------------------

_CLOCKS: dict[str, dt.datetime] = {
    "utc-us0": START,
    "utc-us1": START.replace(microsecond=1),
    "utc-fold1": START.replace(fold=1, microsecond=500_000),
    "plus8": START.astimezone(dt.timezone(dt.timedelta(hours=8))),
    "minus0030-us": START.astimezone(dt.timezone(dt.timedelta(minutes=-30))).replace(
        microsecond=999_999
    ),
    "zoneinfo-utc": START.replace(tzinfo=ZoneInfo("UTC")),
    "timezone-0": START.replace(tzinfo=dt.timezone(dt.timedelta(0))),
    "shanghai": START.astimezone(ZoneInfo("Asia/Shanghai")).replace(microsecond=10),
    # the fall-back hour of Chisinau: 02:30 is 23:30 UTC (fold 0) or 00:30 UTC (fold 1)
    "chisinau-fold0": dt.datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo("Europe/Chisinau")),
    "chisinau-fold1": dt.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=ZoneInfo("Europe/Chisinau")),
}


@pytest.mark.parametrize("clock_name", list(_CLOCKS))
def test_answers_stored_by_reference_replay_as_first_given(
    clock_name: str, tmp_path: Path, proof: Proof
) -> None:
    start = _CLOCKS[clock_name]
    with proof.row(
        SUITE,
        f"a purchase in three batches (create, authorise, capture, each beside a second"
        f" create and a cancel) under a clock {clock_name} ({start.isoformat()}), moved on"
        f" by 0, 1 µs and 999999 µs between batches so equal instants meet other"
        f" microseconds' texts; then every batch sent again (SQLite)",
        expected="every replay of every batch byte-identical to the first answer (the"
        " answers stored by reference re-render the created_at/updated_at text first"
        " given)",
    ) as row:
        clock = FakeClock(now=START.replace(day=1, month=10))  # the card issued before
        with (
            database_url("sqlite", tmp_path, migrated=True) as url,
            make_world(url, clock=clock) as w,
        ):
            card = w.funded_card(1000)
            clock.now = start
            headers = {**w.auth(w.merchant_key), "content-type": "application/json"}
            sent: list[tuple[bytes, bytes]] = []

            def run(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
                body = json.dumps({"requests": items}).encode()
                answer = w.client.post("/v1/batch", content=body, headers=headers)
                assert answer.status_code == 200, answer.text
                sent.append((body, answer.content))
                return list(answer.json()["responses"])

            created = run(
                [
                    {"path": "/v1/payments", "idempotency_key": "c1", "body": {"amount": 40}},
                    {"path": "/v1/payments", "idempotency_key": "c2", "body": {"amount": 41}},
                ]
            )
            pid, other = created[0]["body"]["id"], created[1]["body"]["id"]
            clock.advance(dt.timedelta(microseconds=1))
            issuer, init = w.terminal.purchase_batch1(card, 40)
            authorised = run(
                [
                    {
                        "path": f"/v1/payments/{pid}/authorise",
                        "idempotency_key": "a1",
                        "body": {
                            "issuer_data": issuer.hex(),
                            "initialize_response": init.hex(),
                            "terminal_id": w.terminal_id,
                        },
                    },
                    {"path": "/v1/payments", "idempotency_key": "c3", "body": {"amount": 42}},
                    {"path": f"/v1/payments/{other}/cancel", "idempotency_key": "x1", "body": {}},
                ]
            )
            assert authorised[0]["status"] == 200, authorised
            debit = ok(card, bytes.fromhex(authorised[0]["body"]["authorisation"]["debit_apdu"]))
            clock.advance(dt.timedelta(microseconds=999_999))
            captured = run(
                [
                    {
                        "path": f"/v1/payments/{pid}/capture",
                        "idempotency_key": "p1",
                        "body": {"debit_response": debit.hex()},
                    },
                    {"path": "/v1/payments", "idempotency_key": "c4", "body": {"amount": 43}},
                ]
            )
            assert captured[0]["status"] == 200, captured
            for step in (dt.timedelta(0), dt.timedelta(microseconds=1)):
                clock.advance(step)
                for body, content in list(sent[:3]):
                    again = w.client.post("/v1/batch", content=body, headers=headers)
                    assert again.content == _swap_replayed(content), (clock_name, body[:60])
            with w.factory() as session:
                refs = session.scalar(
                    select(func.count())
                    .select_from(IdempotencyRecord)
                    .where(IdempotencyRecord.response_body.is_(None))
                )
        row.observed = (
            f"3 batches replayed twice each, byte-identical; {refs} answers stored by reference"
        )


# --- 4. the fast path's order shortcut ----------------------------------------------------


_ORDERS: list[tuple[str, ...]] = [
    ("authorise P", "authorise Q", "cancel P"),
    ("cancel P", "authorise Q", "authorise P"),
    ("uncertain P", "authorise Q"),
    ("authorise Q", "uncertain P", "authorise P"),
    ("create", "authorise P", "create", "uncertain Q", "authorise Q"),
    ("authorise P", "authorise P"),
    ("authorise Q", "authorise P", "create", "cancel Q"),
    ("resolve P", "authorise P", "authorise Q"),
    ("create", "create", "authorise P", "authorise Q"),
    ("cancel Q", "cancel Q", "authorise Q"),
]


def test_batches_mixing_fast_and_per_item_calls_answer_as_one_by_one(
    world: World, proof: Proof
) -> None:
    from tests.settlement.test_batch_order import compare

    with proof.row(
        SUITE,
        f"batches mixing cancel, uncertain, resolve (refused), repeated authorises and"
        f" cancels of one payment, and creates, before and after fast authorises of two"
        f" payments on the same card: {len(_ORDERS)} chosen orders and 12 random ones of 2-6"
        f" calls ({backend(world)})",
        expected="each batch's answers are what the same calls one by one give (status,"
        " object and its status, or the problem's code and decline code)",
    ) as row:
        rng = pyrandom.Random(7)
        ops = ["cancel P", "authorise P", "authorise Q", "uncertain P", "cancel Q", "create",
               "resolve P", "uncertain Q"]  # fmt: skip
        orders = [*_ORDERS] + [
            tuple(rng.choice(ops) for _ in range(rng.randrange(2, 7))) for _ in range(12)
        ]
        differ = []
        for order in orders:
            singles, batches = compare(world, order)
            if singles != batches:
                differ.append((order, singles, batches))
        assert differ == []
        row.observed = f"{len(orders)} orders: every batch answered as one by one"


# --- 5. row ids ------------------------------------------------------------------------------


def _child_ids(queue: Any) -> None:
    queue.put([db.new_row_id("pay") for _ in range(600)])


def test_row_ids_never_repeat_across_threads_and_forks(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "row ids drawn 256 at a time: 8 threads drawing 12500 each with a 1 µs switch"
        " interval; 3 children of multiprocessing's fork start method (and one forked"
        " again) drawing from the parent's half-used pool",
        expected="100000 ids all distinct, each prefix_ and 24 hex digits; no child's id"
        " is the parent's or another child's",
    ) as row:
        drawn: list[str] = []
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:

            def draw() -> None:
                mine = [db.new_row_id("x") for _ in range(12_500)]
                drawn.extend(mine)

            threads = [threading.Thread(target=draw) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            sys.setswitchinterval(interval)
        assert len(drawn) == len(set(drawn)) == 100_000
        assert all(re.fullmatch(r"x_[0-9a-f]{24}", i) for i in drawn)
        db.new_row_id("pay")  # the pool holds ids drawn ahead
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        children = [context.Process(target=_child_ids, args=(queue,)) for _ in range(3)]
        for child in children:
            child.start()
        got = [queue.get(timeout=60) for _ in children]
        for child in children:
            child.join()
        parent = {db.new_row_id("pay") for _ in range(600)}
        every = [i for ids in got for i in ids]
        assert len(set(every)) == len(every) == 1800 and not set(every) & parent
        row.observed = (
            "100000 ids of 8 racing threads distinct; 3 forked children's 1800 ids distinct"
            " from each other and from the parent's"
        )


# --- 6. the kept CBC-MAC chains --------------------------------------------------------------


def test_kept_cbc_chains_are_the_protocol_s_macs(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "the security module's kept CBC encryptors: 6 threads interleave MAC1/MAC2 (dpk,"
        " dlk) and TAC computations of 0..40-byte messages over 12 cards and 5 sessions each"
        " with CARD_KEY_CACHE 3 (constant eviction); a message whose last block encrypts to"
        " all zeros is forced through a chain; a forged MAC2/TAC after a valid one",
        expected="every MAC equals protocol.crypto.mac under the diversified session/TAC"
        " key; a forged MAC2 or TAC right after a valid one is refused; no key in repr",
    ) as row:
        master = bytes(range(16))
        keyset = dataclasses.make_dataclass("K", ["dpk", "dlk", "dtk"])(
            master, bytes(range(16, 32)), bytes(range(32, 48))
        )
        module = SoftwareSecurityModule({1: keyset}, 1)  # type: ignore[dict-item]
        module.CARD_KEY_CACHE = 3  # type: ignore[misc]
        serials = [bytes([n]) * 10 for n in range(12)]
        blocks = [bytes([n, 1, 2, 3, 4, 5, 6, n]) for n in range(5)]
        masters = {"dpk": keyset.dpk, "dlk": keyset.dlk, "dtk": keyset.dtk}

        def expected(kind: str, serial: bytes, block: bytes | None, data: bytes) -> bytes:
            card_key = crypto.diversify(masters[kind], serial)
            if block is None:
                return crypto.mac(crypto.tac_key(card_key), data)
            session = DES_SUITE.key_cipher.encrypt_ecb(card_key, block)
            return crypto.mac(session, data)

        wrong: list[Any] = []
        checked = [0]

        def work(seed: int) -> None:
            rng = pyrandom.Random(seed)
            for _ in range(1500):
                serial, block = rng.choice(serials), rng.choice(blocks)
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(41)))
                kind = rng.choice(["dpk", "dlk", "tac"])
                if kind == "tac":
                    got = module._tac(serial, 1, data)
                    want = expected("dtk", serial, None, data)
                else:
                    got = module._session_mac(kind, serial, 1, block, data)
                    want = expected(kind, serial, block, data)
                if got != want:
                    wrong.append((kind, serial.hex(), block.hex(), data.hex()))
                checked[0] += 1

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wrong == []
        # a MAC whose last ciphertext block is all zeros (the chain left at 0): a first
        # block P1 is tried until D(0) ^ E(P1) ends in 80, the padding of 7 bytes more
        serial = serials[0]
        tac = crypto.tac_key(crypto.diversify(keyset.dtk, serial))
        from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
        from cryptography.hazmat.primitives.ciphers import Cipher, modes

        des = Cipher(TripleDES(tac * 3), modes.ECB())
        zero_in = des.decryptor().update(bytes(8))
        encrypt = des.encryptor().update
        message = b""
        for n in range(1 << 16):
            first = n.to_bytes(8, "big")
            last = bytes(a ^ b for a, b in zip(zero_in, encrypt(first), strict=True))
            if last[7] == 0x80:
                message = first + last[:7]
                break
        assert message and expected("dtk", serial, None, message) == bytes(4)
        assert module._tac(serial, 1, message) == bytes(4)
        for data in (b"", b"x" * 7, b"y" * 8, b"z" * 23):
            assert module._tac(serial, 1, data) == expected("dtk", serial, None, data)
        # forged MAC2/TAC right after valid ones, through the module's check
        block = blocks[0]
        data2 = b"\x00" * 14
        mac2 = module._session_mac("dpk", serial, 1, block, data2)
        assert mac2 == expected("dpk", serial, block, data2)
        forged = bytes([mac2[0] ^ 1]) + mac2[1:]
        assert not crypto.macs_equal(module._session_mac("dpk", serial, 1, block, data2), forged)
        assert module._session_mac("dpk", serial, 1, block, data2) == mac2
        for text in (repr(module), str(module)):
            assert master.hex() not in text and tac.hex() not in text
        row.observed = (
            f"{checked[0]} MACs from 6 threads under constant eviction: each the protocol's;"
            " a MAC of an all-zero last block forced, and"
            " the next MACs still right; a forged MAC2 refused after a valid one"
        )


# --- 7. caches and the fingerprint's plain shortcut --------------------------------------


def test_caches_and_the_plain_fingerprint(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "the plain fingerprint of every batch item schema (_NATIVE) over odd field values"
        " (every BMP char class sample, astral, DEL, NUL escapes, U+2028, lone surrogates,"
        " 2^32-1 amounts, metadata of 50 odd keys); cached BCD dates fed bad then good"
        " bytes (bytearray and memoryview too); the shared plain approval mutated",
        expected="each digest equals sha256 of json.dumps(sort_keys, compact, ASCII); a bad"
        " BCD date raises every time and never poisons the good one; the shared approval"
        " refuses mutation and approve(supersedes=...) is a new object",
    ) as row:
        samples = [
            "", "a", "caf\u00e9", "\u952e", "\U0001f600", "\x7f", "\u2028", "\ud800",
            "a\udfffb", "\\u0000", "\t\n\r\x01", '"', "\\", "</script>", "x" * 500,
        ]  # fmt: skip
        checked = 0
        for schema in batch._NATIVE:
            fields = schema.model_fields
            for text in samples:
                payload: dict[str, Any] = {}
                for name, field in fields.items():
                    annotation = str(field.annotation)
                    if "dict" in annotation:
                        payload[name] = {text + str(n): text for n in range(50)}
                    elif "int" in annotation:
                        payload[name] = 0xFFFFFFFF
                    elif "bool" in annotation:
                        payload[name] = True
                    else:
                        payload[name] = text
                got = idempotency.fingerprint("POST", "/v1/payments", payload, plain=True)
                assert got == fingerprint_formula("POST", "/v1/payments", payload), (schema, text)
                checked += 1
        for big in (2**63, 2**64 - 1, 2**64, -(2**63) - 1):
            payload = {"amount": big}
            assert idempotency.fingerprint(
                "POST", "/p", payload, plain=True
            ) == fingerprint_formula("POST", "/p", payload)
        good = bytes.fromhex("20261206")
        for bad in (b"\x20\x26\x13\x01", b"\x20\x26\x02\x30", b"\x2a\x26\x01\x01", b"\x20\x26"):
            for _ in range(3):
                with pytest.raises(ProtocolError):
                    decode_bcd_date(bad)
            assert decode_bcd_date(good) == dt.date(2026, 12, 6)
            assert decode_bcd_date(bytearray(good)) == dt.date(2026, 12, 6)
            assert decode_bcd_date(memoryview(good)) == dt.date(2026, 12, 6)
        approval = decisions.Decision.approve()
        with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
            approval.approved = False  # type: ignore[misc]
        assert decisions.Decision.approve().approved is True
        assert decisions.Decision.approve() == decisions.Decision(True)
        row.observed = (
            f"{checked} plain fingerprints of {len(batch._NATIVE)} schemas equal the formula;"
            " bad BCD dates raise every time, good ones decode; the shared approval is frozen"
        )


def test_the_kept_utc_day_is_the_instant_s_across_a_daylight_saving_fold(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "a clock in a zone whose fall-back hour straddles UTC midnight (Europe/Chisinau,"
        " 2026-10-25 02:30: fold 0 is 10-24 23:30 UTC, fold 1 is 10-25 00:30 UTC; Python"
        " calls the two equal and hashes them alike): the UTC day kept by decisions._utc_day"
        " for the expiry check, asked for fold 0 then fold 1 and the other way round",
        expected="each time's UTC day is its own instant's (10-24 for fold 0, 10-25 for"
        " fold 1), so a card expiring 10-24 is expired at fold 1 whatever was asked first",
    ) as row:
        zone = ZoneInfo("Europe/Chisinau")
        fold0 = dt.datetime(2026, 10, 25, 2, 30, tzinfo=zone)
        fold1 = fold0.replace(fold=1)
        assert fold0 == fold1 and hash(fold0) == hash(fold1)  # Python's view
        days = []
        for order in ((fold0, fold1), (fold1, fold0)):
            for now in order:
                days.append((now.fold, decisions._utc_day(now)))
                assert decisions._utc_day(now) == now.astimezone(dt.UTC).date(), now.fold
        row.observed = f"UTC days (fold, day): {[(f, d.isoformat()) for f, d in days]}"


def test_a_card_expired_in_the_utc_day_is_declined_after_a_fold(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "two cards expiring 2026-10-24 (UTC days) under a clock in Europe/Chisinau: card A"
        " authorised at 02:30 fold 0 (10-24 23:30 UTC, still valid), then card B at 02:30"
        " fold 1 (10-25 00:30 UTC, the day after its expiry), each a batch (SQLite)",
        expected="A approved; B declined card_expired, as the same authorise with no day"
        " kept before it is",
    ) as row:
        zone = ZoneInfo("Europe/Chisinau")
        clock = FakeClock(now=dt.datetime(2026, 10, 1, 12, tzinfo=dt.UTC))
        with (
            database_url("sqlite", tmp_path, migrated=True) as url,
            make_world(url, clock=clock) as w,
        ):
            cards = []
            for _ in range(2):
                applet = w.issue(expiry=dt.date(2026, 10, 24))
                w.terminal.load(applet, 500)
                cards.append(applet)
            headers = {**w.auth(w.merchant_key), "content-type": "application/json"}
            answers = []
            for applet, fold in zip(cards, (0, 1), strict=True):
                clock.now = dt.datetime(2026, 10, 24, 12, tzinfo=dt.UTC)
                pid = w.terminal.create_payment(50)["id"]
                issuer, init = w.terminal.purchase_batch1(applet, 50)
                clock.now = dt.datetime(2026, 10, 25, 2, 30, fold=fold, tzinfo=zone)
                item = {
                    "path": f"/v1/payments/{pid}/authorise",
                    "idempotency_key": f"fold-{fold}",
                    "body": {
                        "issuer_data": issuer.hex(),
                        "initialize_response": init.hex(),
                        "terminal_id": w.terminal_id,
                    },
                }
                answer = w.client.post(
                    "/v1/batch", content=json.dumps({"requests": [item]}), headers=headers
                )
                assert answer.status_code == 200, answer.text
                (one,) = answer.json()["responses"]
                answers.append((one["status"], one["body"].get("decline_code")))
        assert answers[0] == (200, None), answers
        assert answers[1] == (402, "card_expired"), answers
        row.observed = f"A {answers[0]}, B {answers[1]}"


_HOSTILE: list[Any] = [
    "\ud800", "a\udfffb", 2**64, -(2**70), 10**40, 1.5, 1e308, True, None, [],
    {"x": {"\ud800": 1}}, "x" * 20_000, "é\u2028\x7f", {"\ud800": "\ud800"},
]  # fmt: skip


def test_unkeyed_items_answers_encode_after_the_commit_without_a_5xx(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant's batch items without an idempotency key (their answers are"
        f" encoded only in the one response, after the commit) and with one, holding lone"
        f" surrogates, 64-bit-overflowing ints, floats, 20000-character text and odd"
        f" nested keys in every field of every payment route, and paths naming a lone"
        f" surrogate, é and a 180-character id ({backend(world)})",
        expected="never a 5xx, for the batch or any item: every answer is encodable, so"
        " nothing is committed under a response that then fails to encode",
    ) as row:
        headers = {**world.auth(world.merchant_key), "content-type": "application/json"}
        pid = world.terminal.create_payment(10)["id"]
        bases: dict[str, dict[str, Any]] = {
            "/v1/payments": {"amount": 5, "description": "d", "metadata": {"k": "v"}},
            f"/v1/payments/{pid}/authorise": {
                "issuer_data": "00" * 30,
                "initialize_response": "00" * 15,
                "terminal_id": world.terminal_id,
            },
            f"/v1/payments/{pid}/capture": {"debit_response": "00" * 8},
            f"/v1/payments/{pid}/cancel": {"card_status_word": "9303"},
            f"/v1/payments/{pid}/resolve": {"initialize_response": "00" * 15},
            f"/v1/payments/{pid}/uncertain": {},
            "/v1/payments/\ud800/cancel": {},
            "/v1/payments/pay_\u00e9/capture": {"debit_response": "00" * 8},
            "/v1/payments/" + "x" * 180 + "/cancel": {},
        }
        sent, bad = 0, []
        for path, base in bases.items():
            for name in [*base, "extra"]:
                for value in _HOSTILE:
                    item: dict[str, Any] = {"path": path, "body": {**base, name: value}}
                    for key in (None, f"u{sent}"):
                        sent += 1
                        with_key = item if key is None else {**item, "idempotency_key": key}
                        answer = world.client.post(
                            "/v1/batch",
                            content=json.dumps({"requests": [with_key]}).encode(),
                            headers=headers,
                        )
                        inner = answer.json().get("responses", []) if answer.is_success else []
                        if answer.status_code >= 500 or any(r["status"] >= 500 for r in inner):
                            bad.append((path[:30], name, repr(value)[:20], key, answer.text[:200]))
        assert bad == []
        row.observed = f"{sent} batches, keyed and not: no 5xx anywhere"


def _mutated(rng: pyrandom.Random, issuer: bytes, init: bytes) -> tuple[bytes, bytes, str]:
    """Card answers as a hostile shopper's agent relays them: bad or odd BCD dates, another
    key version or algorithm, other counters and balances, or left as they are."""
    issuer, init = bytearray(issuer), bytearray(init)
    kind = rng.choice(["start", "expiry", "bcd", "version", "alg", "counter", "balance", "same"])
    if kind == "start":
        issuer[20:24] = rng.choice([b"\x20\x26\x12\x31", b"\x20\x99\x01\x01", b"\x19\x99\x01\x01"])
    elif kind == "expiry":
        issuer[24:28] = rng.choice([b"\x20\x26\x01\x01", b"\x20\x20\x02\x29", b"\x20\x21\x02\x29"])
    elif kind == "bcd":
        at = rng.choice([20, 24])
        issuer[at : at + 4] = rng.choice([b"\x20\x26\x13\x01", b"\x2a\x26\x01\x01", b"\xff" * 4])
    elif kind == "version":
        init[9] = rng.randrange(256)
    elif kind == "alg":
        init[10] = rng.choice([1, 2, 0xFF])
    elif kind == "counter":
        init[4:6] = rng.randrange(65536).to_bytes(2, "big")
    elif kind == "balance":
        init[0:4] = rng.choice([0, 1, 2**32 - 1]).to_bytes(4, "big")
    return bytes(issuer), bytes(init), kind


def test_odd_card_answers_batched_answer_as_the_single_route(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"hostile shopper's agent relays odd card answers for an authorise: invalid BCD"
        f" dates (month 13, A-nibbles, FF), a leap day of a non-leap year, start dates in"
        f" the future, expiry in the past, other key versions and algorithms, counters and"
        f" balances; each sent twice (the kept BCD dates and issuer ids see bad ones first),"
        f" on the single route and as a batch item, each on its own twin card ({backend(world)})",
        expected="the batch item's answer is the single route's (status and code or"
        " decline code) every time; a bad date is refused each time it comes",
    ) as row:
        from tests.settlement.test_batch_order import _shape

        headers = {**world.auth(world.merchant_key), "content-type": "application/json"}
        kinds: dict[str, set[tuple[Any, ...]]] = {}
        for n in range(24):
            cards = {"single": world.funded_card(5_000), "batch": world.funded_card(5_000)}
            for attempt in range(2):
                shapes: dict[str, tuple[Any, ...]] = {}
                kind = ""
                for way, card in cards.items():  # the same history on twin cards
                    issuer, init = world.terminal.purchase_batch1(card, 10)
                    odd_issuer, odd_init, kind = _mutated(pyrandom.Random(n), issuer, init)
                    body = {
                        "issuer_data": odd_issuer.hex(),
                        "initialize_response": odd_init.hex(),
                        "terminal_id": world.terminal_id,
                    }
                    pid = world.terminal.create_payment(10)["id"]
                    path = f"/v1/payments/{pid}/authorise"
                    if way == "single":
                        single = world.client.post(path, json=body, headers=headers)
                        status, answer = single.status_code, single.json()
                    else:
                        item = {"path": path, "idempotency_key": f"odd-{n}-{attempt}", "body": body}
                        batched = world.client.post(
                            "/v1/batch", content=json.dumps({"requests": [item]}), headers=headers
                        )
                        assert batched.status_code == 200, batched.text
                        (one,) = batched.json()["responses"]
                        status, answer = one["status"], one["body"]
                    if status == 200:  # approved: let the card go on (cancel it)
                        world.terminal.post(f"/v1/payments/{pid}/cancel")
                    shapes[way] = _shape(status, answer)
                assert shapes["batch"] == shapes["single"], (kind, n, attempt)
                kinds.setdefault(kind, set()).add(shapes["single"])
        row.observed = "; ".join(
            f"{kind}: {sorted(map(str, shapes))}" for kind, shapes in sorted(kinds.items())
        )


def test_duplicate_keys_beside_fast_items_answer_as_one_by_one(world: World, proof: Proof) -> None:
    from tests.settlement.test_batch_order import _request, _setup, _shape

    with proof.row(
        SUITE,
        f"one batch repeating idempotency keys beside fast items on one card: authorise P"
        f" twice under one key, cancel P, authorise Q twice under one key, a create twice"
        f" under one key, uncertain Q; the same calls one by one with the same keys"
        f" ({backend(world)})",
        expected="each answer (status and object status or problem code) is the one by one"
        " call's; a repeated key answers as its first item, marked replayed as the single"
        " route's replay is",
    ) as row:
        plan = ["authorise P", "=", "cancel P", "authorise Q", "=", "create", "=", "uncertain Q"]
        shapes: dict[str, list[tuple[Any, ...]]] = {}
        for way in ("single", "batch"):
            setup = _setup(world)
            requests: list[dict[str, Any]] = []
            for n, op in enumerate(plan):
                if op == "=":
                    requests.append(dict(requests[-1]))
                else:
                    requests.append({**_request(world, setup, op), "idempotency_key": f"{way}-{n}"})
            if way == "single":
                out = []
                for request in requests:
                    answer = world.client.post(
                        request["path"],
                        json=request["body"] or {},
                        headers={
                            **world.auth(world.merchant_key),
                            "idempotency-key": request["idempotency_key"],
                        },
                    )
                    replayed = answer.headers.get("idempotent-replayed") == "true"
                    out.append((*_shape(answer.status_code, answer.json()), replayed))
                shapes[way] = out
            else:
                answer = world.client.post(
                    "/v1/batch", json={"requests": requests}, headers=world.auth(world.merchant_key)
                )
                assert answer.status_code == 200, answer.text
                shapes[way] = [
                    (*_shape(r["status"], r["body"]), r["replayed"])
                    for r in answer.json()["responses"]
                ]
        statuses = [s[:2] for s in shapes["single"]]
        assert shapes["batch"] == shapes["single"], shapes
        flags = [s[3] for s in shapes["batch"]]
        row.observed = f"answers and replayed flags alike: {statuses}; replayed {flags}"
