"""Attacks on answers rendered from the payment row (issue 20's lean purchase), each refused.

A purchase's idempotency answers (create 201, authorise 200, capture 200) are stored as a
reference (the payment and the step) and re-rendered as of that step; its
``payment.succeeded`` event names the payment and is rendered at delivery; the card's
purchase history is its payments. Tried here as a hostile merchant (another merchant's
keys, events, cards), with reused and in-flight keys, against payments that moved on
after their answer (expiry, a release at the bound, a heal, refunds), with declines, and
across a migration downgrade and upgrade. Real components: the settlement app (ASGI) on
SQLite and PostgreSQL, the simulated card. Rows go to the ``attacks_replay`` proof table.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select, text

from tests.proof.conftest import Proof
from tests.settlement.support import BACKENDS, World, database_url, make_world, ok, prove
from webpurse.card import CardApplet
from webpurse.settlement.db import make_engine, migrate
from webpurse.settlement.models import IdempotencyRecord, Payment
from webpurse.settlement.routes_webhooks import secret_box_for
from webpurse.settlement.webhooks import WebhookEvent, _claim_due, event_bytes

SUITE = "attacks_replay"
BEFORE = "0012_i20_terminal_seq_sequence"


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


def backend(world: World) -> str:
    return "PostgreSQL" if world.url.startswith("postgresql") else "SQLite"


def _post(world: World, key: str, path: str, body: dict[str, Any], who: str = "") -> httpx.Response:
    headers = {**world.auth(who or world.merchant_key), "idempotency-key": key}
    return world.client.post(path, json=body, headers=headers)


def _batch(world: World, items: list[dict[str, Any]], who: str = "") -> httpx.Response:
    answer = world.client.post(
        "/v1/batch", json={"requests": items}, headers=world.auth(who or world.merchant_key)
    )
    assert answer.status_code == 200, answer.text
    return answer


def _key(world: World, principal: str, key: str) -> IdempotencyRecord:
    with world.factory() as session:
        row = session.scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.principal == principal, IdempotencyRecord.key == key
            )
        ).one()
        session.expunge(row)
        return row


def _merchant_of(world: World, key: str) -> str:
    me = world.client.get("/v1/payments", headers=world.auth(key))
    assert me.status_code == 200, me.text
    with world.factory() as session:
        from webpurse.settlement.auth import hash_key
        from webpurse.settlement.models import ApiKey

        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(key))).one()
        return str(row.merchant_id)


def _authorise_body(world: World, card: CardApplet, amount: int) -> dict[str, Any]:
    issuer, init = world.terminal.purchase_batch1(card, amount)
    return {
        "issuer_data": issuer.hex(),
        "initialize_response": init.hex(),
        "terminal_id": world.terminal_id,
    }


CREATE = {"amount": 120, "description": "tea", "metadata": {"z": "1", "a": "é"}}


# --- another merchant's key, and a key reused ---------------------------------------------


def test_another_merchants_key_never_renders_its_payment(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"hostile merchant B replays merchant A's Idempotency-Key (same path, same body; and"
        f" on A's authorise path) to have A's referenced payment rendered ({backend(world)})",
        expected="keys are per merchant: B's create makes B's own payment, B's authorise of"
        " A's payment is 404; A's key still replays A's first answer byte for byte",
    ) as row:
        first = _post(world, "shared-key", "/v1/payments", CREATE)
        assert first.status_code == 201
        theirs = first.json()["id"]
        a = _merchant_of(world, world.merchant_key)
        assert _key(world, a, "shared-key").step == "create"  # a reference, not a body
        mine = _post(world, "shared-key", "/v1/payments", CREATE, world.other_key)
        assert mine.status_code == 201 and mine.headers.get("idempotent-replayed") is None
        assert mine.json()["id"] != theirs
        card = world.funded_card(500)
        path = f"/v1/payments/{theirs}/authorise"
        stolen = _post(world, "shared-auth", path, _authorise_body(world, card, 120))
        assert stolen.status_code == 200  # A authorises its own payment
        hijack = _post(
            world, "shared-auth", path, _authorise_body(world, card, 120), world.other_key
        )
        assert hijack.status_code == 404 and theirs not in hijack.text
        batched = _batch(
            world,
            [
                {"path": "/v1/payments", "idempotency_key": "shared-key", "body": CREATE},
                {"path": path, "idempotency_key": "shared-auth", "body": {}},
            ],
            world.other_key,
        ).json()["responses"]
        # B's own keys: its create replays B's payment, its authorise key B's own refusal.
        assert batched[0]["replayed"] and batched[0]["body"]["id"] == mine.json()["id"]
        assert batched[1]["status"] == 422 and theirs not in json.dumps(batched)
        again = _post(world, "shared-key", "/v1/payments", CREATE)
        assert (again.status_code, again.content) == (201, first.content)
        row.observed = (
            f"B's create: own payment; B's authorise of A's: {hijack.status_code};"
            f" B's batch: {[r['status'] for r in batched]}, nothing of A's; A replays its bytes"
        )


def test_a_referenced_key_with_other_parameters_is_still_refused(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"a key stored as a reference reused with other parameters: another amount, another"
        f" payment's path, on the single endpoint and in a batch, and a batch's key on the"
        f" single endpoint ({backend(world)})",
        expected="422 idempotency_key_reused every time; nothing created, nothing rendered",
    ) as row:
        first = _post(world, "k-create", "/v1/payments", CREATE)
        assert first.status_code == 201
        other = world.terminal.create_payment(50)
        card = world.funded_card(500)
        body = _authorise_body(world, card, 120)
        auth_path = f"/v1/payments/{first.json()['id']}/authorise"
        assert _post(world, "k-auth", auth_path, body).status_code == 200
        batch_first = _batch(
            world, [{"path": "/v1/payments", "idempotency_key": "k-batch", "body": {"amount": 7}}]
        ).json()["responses"][0]
        assert batch_first["status"] == 201
        refusals = [
            _post(world, "k-create", "/v1/payments", {**CREATE, "amount": 121}),
            _post(world, "k-auth", f"/v1/payments/{other['id']}/authorise", body),
            _post(world, "k-auth", auth_path, {**body, "terminal_id": "00" * 6}),
            _post(world, "k-batch", "/v1/payments", {"amount": 8}),
        ]
        codes = [(r.status_code, r.json()["code"]) for r in refusals]
        batched = _batch(
            world,
            [
                {"path": "/v1/payments", "idempotency_key": "k-create", "body": {"amount": 1}},
                {
                    "path": f"/v1/payments/{other['id']}/authorise",
                    "idempotency_key": "k-auth",
                    "body": body,
                },
            ],
        ).json()["responses"]
        codes += [(r["status"], r["body"]["code"]) for r in batched]
        assert codes == [(422, "idempotency_key_reused")] * 6
        assert all(first.json()["id"] not in r.text for r in refusals)
        with world.factory() as session:
            count = session.scalar(text("SELECT count(*) FROM payments"))
        assert count == 3  # the two created, the batch's one: the refusals created nothing
        row.observed = f"{len(codes)} × 422 idempotency_key_reused; 3 payments, as created"


def test_a_key_answered_on_one_endpoint_replays_on_the_other(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"a purchase's keys answered on the single endpoints replayed in a batch, and a"
        f" batch's keys replayed on the single endpoints, after a refund ({backend(world)})",
        expected="each replay is the first answer (same JSON, same member order), marked"
        " replayed; the payment itself shows the refund",
    ) as row:
        card = world.funded_card(1_000)
        created = _post(world, "x-create", "/v1/payments", CREATE)
        pid = created.json()["id"]
        auth_path = f"/v1/payments/{pid}/authorise"
        body = _authorise_body(world, card, 120)
        world.clock.advance(dt.timedelta(seconds=2))
        authorised = _post(world, "x-auth", auth_path, body)
        debit = ok(card, bytes.fromhex(authorised.json()["authorisation"]["debit_apdu"]))
        world.clock.advance(dt.timedelta(seconds=2))
        capture_path = f"/v1/payments/{pid}/capture"
        capture_body = {"debit_response": debit.hex()}
        captured = _batch(
            world, [{"path": capture_path, "idempotency_key": "x-cap", "body": capture_body}]
        ).json()["responses"][0]
        assert captured["body"]["status"] == "succeeded"
        world.clock.advance(dt.timedelta(minutes=1))
        assert _post(world, "x-refund", "/v1/refunds", {"payment": pid, "amount": 20}).is_success
        replays = _batch(
            world,
            [
                {"path": "/v1/payments", "idempotency_key": "x-create", "body": CREATE},
                {"path": auth_path, "idempotency_key": "x-auth", "body": body},
            ],
        ).json()["responses"]
        assert [r["replayed"] for r in replays] == [True, True]
        for replay, first in zip(replays, (created, authorised), strict=True):
            assert replay["status"] == first.status_code
            assert list(replay["body"].items()) == list(first.json().items())
        single = _post(world, "x-cap", capture_path, capture_body)
        assert single.headers.get("idempotent-replayed") == "true"
        assert list(single.json().items()) == list(captured["body"].items())
        now = world.client.get(f"/v1/payments/{pid}", headers=world.auth(world.merchant_key))
        assert now.json()["amount_refunded"] == 20 and single.json()["amount_refunded"] == 0
        row.observed = "single→batch and batch→single replays equal the first answers"


# --- a key still in flight ----------------------------------------------------------------


def test_a_key_in_flight_or_without_an_answer_is_409(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"a key still in flight (a row an older version committed before its work), and a"
        f" done row with neither body nor reference, on the single endpoint and in a batch"
        f" ({backend(world)})",
        expected="409 idempotency_in_flight on both endpoints; nothing runs, nothing renders",
    ) as row:
        a = _merchant_of(world, world.merchant_key)
        print_ = _post(world, "probe", "/v1/payments", CREATE).status_code
        assert print_ == 201
        fingerprint = _key(world, a, "probe").fingerprint  # the same request's fingerprint
        with world.factory() as session, session.begin():
            for key, state in (("flight", "in_flight"), ("hollow", "done")):
                session.add(
                    IdempotencyRecord(
                        principal=a,
                        key=key,
                        fingerprint=fingerprint,
                        state=state,
                        created_at=world.clock(),
                    )
                )
        answers = [_post(world, key, "/v1/payments", CREATE) for key in ("flight", "hollow")]
        codes = [(r.status_code, r.json()["code"]) for r in answers]
        batched = _batch(
            world,
            [
                {"path": "/v1/payments", "idempotency_key": key, "body": CREATE}
                for key in ("flight", "hollow")
            ],
        ).json()["responses"]
        codes += [(r["status"], r["body"]["code"]) for r in batched]
        assert codes == [(409, "idempotency_in_flight")] * 4
        with world.factory() as session:
            assert session.scalar(text("SELECT count(*) FROM payments")) == 1
        row.observed = "4 × 409 idempotency_in_flight; no payment created"


# --- the payment moves on after its answer ------------------------------------------------


def _sweep(world: World) -> None:
    swept = world.client.post("/v1/maintenance/sweep", headers=world.auth(world.operator_key))
    assert swept.status_code == 200, swept.text


def test_a_referenced_answer_stays_what_was_answered(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"make a referenced answer render another state: expire a created payment; release"
        f" an authorised one at the bound after the card debited, heal it from the card's"
        f" proof, refund it; then replay every key and read the payment.succeeded event"
        f" ({backend(world)})",
        expected="every replay is its first answer byte for byte (requires_card, authorised);"
        " the payments show expired / succeeded with the refund; the event body is the"
        " payment as the heal captured it, on the list, the event and the delivery",
    ) as row:
        hook = world.client.post(
            "/v1/webhook_endpoints",
            json={"url": "https://hooks.example.invalid/in", "events": ["payment.*"]},
            headers=world.auth(world.merchant_key),
        )
        assert hook.status_code == 201, hook.text
        waiting = _post(world, "m-wait", "/v1/payments", {"amount": 5})
        card = world.funded_card(1_000)
        created = _post(world, "m-create", "/v1/payments", CREATE)
        pid = created.json()["id"]
        world.clock.advance(dt.timedelta(seconds=1))
        authorised = _post(
            world, "m-auth", f"/v1/payments/{pid}/authorise", _authorise_body(world, card, 120)
        )
        assert authorised.status_code == 200
        ok(card, bytes.fromhex(authorised.json()["authorisation"]["debit_apdu"]))  # it ran
        world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(minutes=31))
        _sweep(world)  # the created one expires, the authorised one is released at the bound
        mine = world.auth(world.merchant_key)
        expired = world.client.get(f"/v1/payments/{waiting.json()['id']}", headers=mine).json()
        released = world.client.get(f"/v1/payments/{pid}", headers=mine).json()
        assert expired["status"] == "expired"
        assert (released["status"], released["decline_code"]) == ("canceled", "hold_expired")
        replays = [
            _post(world, "m-wait", "/v1/payments", {"amount": 5}),
            _post(world, "m-create", "/v1/payments", CREATE),
        ]
        with world.factory() as session:
            payment = session.get(Payment, pid)
            assert payment is not None and payment.counter is not None
            counter = payment.counter
        world.clock.advance(dt.timedelta(seconds=5))
        proof_data, sw = prove(card, 0x06, counter + 1)
        assert sw == 0x9000
        issuer = bytes.fromhex(_authorise_body(world, card, 1)["issuer_data"])
        healed = world.client.post(
            "/v1/heal",
            json={
                "issuer_data": issuer.hex(),
                "transaction_type": "06",
                "prove_response": proof_data.hex(),
            },
            headers=mine,
        )
        assert healed.status_code == 200, healed.text
        at_heal = world.client.get(f"/v1/payments/{pid}", headers=mine).json()
        assert at_heal["status"] == "succeeded"
        world.clock.advance(dt.timedelta(minutes=1))
        assert _post(world, "m-refund", "/v1/refunds", {"payment": pid, "amount": 30}).is_success
        replays += [
            _post(
                world, "m-auth", f"/v1/payments/{pid}/authorise", _authorise_body(world, card, 120)
            )
        ]
        # The authorise key's body is not the same request any more (a fresh INITIALIZE):
        # a key reused with other parameters. Replay with the first body instead.
        assert replays[-1].status_code == 422
        replays[-1] = world.client.post(
            f"/v1/payments/{pid}/authorise",
            content=authorised.request.content,
            headers={**mine, "idempotency-key": "m-auth", "content-type": "application/json"},
        )
        firsts = [waiting, created, authorised]
        assert [(r.status_code, r.content) for r in replays] == [
            (r.status_code, r.content) for r in firsts
        ]
        assert all(r.headers.get("idempotent-replayed") == "true" for r in replays)
        now = world.client.get(f"/v1/payments/{pid}", headers=mine).json()
        assert (now["status"], now["amount_refunded"]) == ("succeeded", 30)
        listed = world.client.get("/v1/events?type=payment.succeeded", headers=mine).json()
        (event,) = listed["data"]
        assert event["data"] == {"object": at_heal}
        one = world.client.get(f"/v1/events/{event['id']}", headers=mine).json()
        assert one["data"] == {"object": at_heal}
        with world.factory() as session:
            stored = session.get(WebhookEvent, event["id"])
            assert stored is not None and stored.body is None
            body = json.loads(event_bytes(session, stored))
        assert body["data"] == {"object": at_heal}
        row.observed = (
            "expired, released (hold_expired), healed, refunded 30: 3 replays byte-identical;"
            " payment.succeeded = the payment at the heal (list, event, delivery body)"
        )


def test_a_declined_answer_is_stored_as_the_refusal(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"a declined authorisation (a blocked card) and a capture refused for a bad"
        f" MAC2, keyed, on the single endpoint and in a batch; then the payment succeeds"
        f" ({backend(world)})",
        expected="each key keeps its refusal as a body (never a reference to the payment):"
        " the replay is the refusal, not the payment's later state",
    ) as row:
        card, blocked = world.funded_card(100), world.funded_card(1_000)
        number = blocked.state.issuer.card_number
        block = world.client.post(
            f"/v1/cards/{number}/status",
            json={"status": "blocked"},
            headers=world.auth(world.operator_key),
        )
        assert block.status_code == 200, block.text
        single = world.terminal.create_payment(500)
        batched = world.terminal.create_payment(400)
        path = f"/v1/payments/{single['id']}/authorise"
        declined = _post(world, "d-single", path, _authorise_body(world, blocked, 500))
        assert declined.status_code == 402, declined.text
        bpath = f"/v1/payments/{batched['id']}/authorise"
        bbody = _authorise_body(world, blocked, 400)
        bdeclined = _batch(world, [{"path": bpath, "idempotency_key": "d-batch", "body": bbody}])
        first_b = bdeclined.json()["responses"][0]
        assert first_b["status"] == 402
        good = world.terminal.create_payment(60)
        gpath = f"/v1/payments/{good['id']}/authorise"
        assert _post(world, "d-auth", gpath, _authorise_body(world, card, 60)).status_code == 200
        bad = _post(
            world, "d-cap", f"/v1/payments/{good['id']}/capture", {"debit_response": "00" * 8}
        )
        assert bad.status_code >= 400
        a = _merchant_of(world, world.merchant_key)
        rows = [_key(world, a, k) for k in ("d-single", "d-batch", "d-cap")]
        assert all(r.response_body is not None and r.step is None for r in rows)
        again = _post(world, "d-single", path, json.loads(declined.request.content))
        assert (again.status_code, again.json()) == (402, declined.json())
        bagain = _batch(world, [{"path": bpath, "idempotency_key": "d-batch", "body": bbody}])
        assert bagain.json()["responses"][0]["body"] == first_b["body"]
        cagain = _post(
            world, "d-cap", f"/v1/payments/{good['id']}/capture", {"debit_response": "00" * 8}
        )
        assert (cagain.status_code, cagain.json()) == (bad.status_code, bad.json())
        row.observed = (
            f"402 / 402 (batch) / {bad.status_code} stored as bodies; replays are the refusals"
        )


# --- events and card history of another merchant ------------------------------------------


def test_another_merchants_events_and_card_history_stay_closed(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"merchant B (or an anonymous visitor) reads A's body-less payment.succeeded event:"
        f" GET /v1/events, /v1/events/{{id}}, POST redeliver, a starting_after cursor; and"
        f" GET /v1/cards/{{number}}/events of the card A charged ({backend(world)})",
        expected="B: 404 for A's event, B's list holds none of A's; cards' history is the"
        " operator's (B 403, anonymous 401); the operator sees the purchase; A's own"
        " redelivery sends the rendered body",
    ) as row:
        hook = world.client.post(
            "/v1/webhook_endpoints",
            json={"url": "https://hooks.example.invalid/in", "events": ["payment.succeeded"]},
            headers=world.auth(world.merchant_key),
        )
        assert hook.status_code == 201, hook.text
        card = world.funded_card(500)
        captured = world.terminal.purchase(card, 70)
        a_events = world.client.get(
            "/v1/events?type=payment.succeeded", headers=world.auth(world.merchant_key)
        ).json()["data"]
        (event,) = [e for e in a_events if e["data"]["object"]["id"] == captured["id"]]
        b = world.auth(world.other_key)
        codes = {
            "get": world.client.get(f"/v1/events/{event['id']}", headers=b).status_code,
            "redeliver": world.client.post(
                f"/v1/events/{event['id']}/redeliver", headers=b
            ).status_code,
            "cursor": world.client.get(
                f"/v1/events?starting_after={event['id']}", headers=b
            ).status_code,
            "anonymous": world.client.get(f"/v1/events/{event['id']}").status_code,
        }
        b_list = world.client.get("/v1/events", headers=b).json()["data"]
        assert captured["id"] not in json.dumps(b_list)
        number = card.state.issuer.card_number
        history = f"/v1/cards/{number}/events"
        codes["card_b"] = world.client.get(history, headers=b).status_code
        codes["card_a"] = world.client.get(
            history, headers=world.auth(world.merchant_key)
        ).status_code
        codes["card_anonymous"] = world.client.get(history).status_code
        assert codes == {
            "get": 404,
            "redeliver": 404,
            "cursor": 404,
            "anonymous": 401,
            "card_b": 403,
            "card_a": 403,
            "card_anonymous": 401,
        }
        operator = world.client.get(history, headers=world.auth(world.operator_key)).json()
        assert [
            e["detail"].get("payment") for e in operator["data"] if e["kind"] == "purchase"
        ] == [captured["id"]]
        # A's own redelivery sends (and signs) the rendered body, the one A's list shows.
        again = world.client.post(
            f"/v1/events/{event['id']}/redeliver", headers=world.auth(world.merchant_key)
        )
        assert again.status_code == 200 and again.json()["data"] == event["data"]
        jobs, _ = _claim_due(
            world.factory,
            world.clock(),
            secret_box_for(world.settings),
            50,
            dt.timedelta(minutes=2),
        )
        (job,) = [j for j in jobs if j.event_id == event["id"]]
        assert json.loads(job.body)["data"] == event["data"]
        row.observed = f"{codes}; operator sees the purchase; A's redelivery sends its body"


# --- a migration downgrade and upgrade ----------------------------------------------------


def _keyed_batch_purchase(
    world: World, card: CardApplet, amount: int
) -> list[tuple[dict[str, Any], str]]:
    """A purchase in three keyed batches: (item, the first answer's body as sent) per step."""
    steps: list[tuple[dict[str, Any], str]] = []

    def run(item: dict[str, Any]) -> dict[str, Any]:
        answer = _batch(world, [item]).json()["responses"][0]
        assert answer["status"] in (200, 201), answer
        # The batch sends each body as orjson encoded it (and as the key stored it).
        steps.append((item, orjson.dumps(answer["body"]).decode()))
        return dict(answer["body"])

    created = run(
        {"path": "/v1/payments", "idempotency_key": "b-create", "body": CREATE | {"amount": amount}}
    )
    world.clock.advance(dt.timedelta(seconds=1))
    body = _authorise_body(world, card, amount)
    authorised = run(
        {
            "path": f"/v1/payments/{created['id']}/authorise",
            "idempotency_key": "b-auth",
            "body": body,
        }
    )
    debit = ok(card, bytes.fromhex(authorised["authorisation"]["debit_apdu"]))
    world.clock.advance(dt.timedelta(seconds=1))
    run(
        {
            "path": f"/v1/payments/{created['id']}/capture",
            "idempotency_key": "b-cap",
            "body": {"debit_response": debit.hex()},
        }
    )
    return steps


def test_a_downgrade_and_upgrade_keep_every_answer_event_and_history(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"migration 0013b down to 0012 and up again with referenced answers (single endpoint"
        f" and batch), body-less payment.succeeded events and a card whose history goes on"
        f" after its purchase ({backend(world)})",
        expected="down: each key holds the body its endpoint would have stored, byte for byte;"
        " each event the bytes it was delivered with; card_events in the order the history"
        " showed; up again: replays, events and history as before",
    ) as row:
        mine = world.auth(world.merchant_key)
        operator = world.auth(world.operator_key)
        hook = world.client.post(
            "/v1/webhook_endpoints",
            json={"url": "https://hooks.example.invalid/in", "events": ["*"]},
            headers=mine,
        )
        assert hook.status_code == 201
        card = world.funded_card(1_000)
        singles: list[tuple[str, str, dict[str, Any], httpx.Response]] = []
        created = _post(world, "s-create", "/v1/payments", CREATE)
        singles.append(("s-create", "/v1/payments", CREATE, created))
        pid = created.json()["id"]
        world.clock.advance(dt.timedelta(seconds=1))
        auth_body = _authorise_body(world, card, 120)
        authorised = _post(world, "s-auth", f"/v1/payments/{pid}/authorise", auth_body)
        singles.append(("s-auth", f"/v1/payments/{pid}/authorise", auth_body, authorised))
        debit = ok(card, bytes.fromhex(authorised.json()["authorisation"]["debit_apdu"]))
        world.clock.advance(dt.timedelta(seconds=1))
        cap_body = {"debit_response": debit.hex()}
        captured = _post(world, "s-cap", f"/v1/payments/{pid}/capture", cap_body)
        singles.append(("s-cap", f"/v1/payments/{pid}/capture", cap_body, captured))
        world.clock.advance(dt.timedelta(seconds=1))
        batched = _keyed_batch_purchase(world, card, 80)
        world.clock.advance(dt.timedelta(seconds=1))
        refund = _post(world, "s-refund", "/v1/refunds", {"payment": pid, "amount": 10})
        assert refund.is_success
        number = card.state.issuer.card_number
        world.clock.advance(dt.timedelta(seconds=1))
        blocked = world.client.post(
            f"/v1/cards/{number}/status", json={"status": "blocked"}, headers=operator
        )
        assert blocked.status_code == 200
        history = world.client.get(f"/v1/cards/{number}/events", headers=operator).json()["data"]
        assert [e["kind"] for e in history][-3:] == ["purchase", "purchase", "status"]
        a = _merchant_of(world, world.merchant_key)
        with world.factory() as session:
            events = {e.id: event_bytes(session, e) for e in session.scalars(select(WebhookEvent))}
            kept = {
                r.key: r.response_body
                for r in session.scalars(select(IdempotencyRecord))
                if r.response_body is not None
            }
        engine = make_engine(world.url, pool_size=1, max_overflow=0)
        try:
            migrate(engine, BEFORE, downgrade=True)
            with engine.connect() as connection:
                keys = dict(
                    connection.execute(
                        text(
                            "SELECT key, response_body FROM idempotency_keys WHERE principal = :p"
                        ),
                        {"p": a},
                    ).all()
                )
                bodies = dict(connection.execute(text("SELECT id, body FROM webhook_events")).all())
                card_rows = connection.execute(
                    text(
                        "SELECT e.kind, e.detail, e.created_at FROM card_events e"
                        " JOIN cards c ON c.id = e.card_id WHERE c.card_number = :n ORDER BY e.id"
                    ),
                    {"n": number},
                ).all()
            # The batch's own text (0012's batch sends it again as is on a replay; its
            # single endpoint replays any encoding of the same JSON the same).
            expected_keys = {
                key: orjson.dumps(first.json()).decode() for key, _, _, first in singles
            }
            expected_keys |= {item["idempotency_key"]: sent for item, sent in batched}
            assert {k: keys[k] for k in expected_keys} == expected_keys
            assert {k: keys[k] for k in kept} == kept  # bodies stored as such: untouched
            assert {k: v.encode() for k, v in bodies.items()} == events
            old_history = [
                (kind, detail if isinstance(detail, dict) else json.loads(detail))
                for kind, detail, _ in card_rows
            ]
            assert old_history == [(e["kind"], e["detail"]) for e in history]
            migrate(engine)
        finally:
            engine.dispose()
        for key, path, body, first in singles:
            again = _post(world, key, path, body)
            assert (again.status_code, again.content) == (first.status_code, first.content)
        for item, sent in batched:
            again = _batch(world, [item]).json()["responses"][0]
            assert again["replayed"] and orjson.dumps(again["body"]).decode() == sent
        after = world.client.get(f"/v1/cards/{number}/events", headers=operator).json()["data"]
        assert after == history
        with world.factory() as session:
            assert {
                e.id: event_bytes(session, e) for e in session.scalars(select(WebhookEvent))
            } == events
        row.observed = (
            f"{len(expected_keys)} referenced answers and {len(events)} events byte-identical"
            f" down and up; history of {len(history)} events in order"
        )


def test_an_existing_database_with_deliveries_upgrades_and_downgrades(
    tmp_path: Path, proof: Proof
) -> None:
    """A server that ran before 0013b has events with deliveries (webhook_messages name
    them) and payments with refunds (refunds name them); 0013b rebuilds webhook_events and
    payments on SQLite (batch mode), which must not trip the foreign keys naming them."""
    with proof.row(
        SUITE,
        "migration 0013b on an existing SQLite database: events with deliveries, a payment"
        " with a refund (rows other tables' foreign keys name), upgrade then downgrade",
        expected="both directions succeed and keep every row and body",
    ) as row:
        url = f"sqlite:///{tmp_path / 'old.db'}"
        engine = make_engine(url, pool_size=1, max_overflow=0)
        now = "2026-12-06 09:00:00.000000+00:00"
        try:
            migrate(engine, BEFORE)
            with engine.begin() as connection:
                for statement in (
                    "INSERT INTO merchants (id, name, terminal_id, terminal_seq, created_at)"
                    f" VALUES ('mer_1', 'shop', 'AAAAAAAAAAAA', 1, '{now}')",
                    "INSERT INTO webhook_endpoints (id, merchant_id, url, events, description,"
                    " secret_sealed, created_at) VALUES ('we_1', 'mer_1', 'https://h.invalid/',"
                    f" '[\"*\"]', '', X'00', '{now}')",
                    "INSERT INTO webhook_events (id, merchant_id, type, created_at, body) VALUES"
                    f" ('evt_1', 'mer_1', 'payment.created', '{now}', '{{\"id\":\"evt_1\"}}')",
                    "INSERT INTO webhook_messages (id, event_id, endpoint_id, status, attempts,"
                    " window_started_at, updated_at) VALUES ('msg_1', 'evt_1', 'we_1',"
                    f" 'pending', 0, '{now}', '{now}')",
                    "INSERT INTO payments (id, merchant_id, status, amount, currency, description,"
                    " merchant_reference, metadata, terminal_id, key_index, refunded_amount,"
                    f" created_at, updated_at) VALUES ('pay_1', 'mer_1', 'succeeded', 100, 'CNY',"
                    f" '', '', '{{}}', 'AAAAAAAAAAAA', 1, 10, '{now}', '{now}')",
                    "INSERT INTO refunds (id, merchant_id, payment_id, amount, currency, status,"
                    f" created_at, updated_at) VALUES ('re_1', 'mer_1', 'pay_1', 10,"
                    f" 'CNY', 'succeeded', '{now}', '{now}')",
                ):
                    connection.execute(text(statement))
            migrate(engine)
            migrate(engine, BEFORE, downgrade=True)
            migrate(engine)
            with engine.connect() as connection:
                counts = [
                    connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                    for t in ("webhook_events", "webhook_messages", "payments", "refunds")
                ]
                body = connection.execute(
                    text("SELECT body FROM webhook_events WHERE id = 'evt_1'")
                ).scalar_one()
            assert counts == [1, 1, 1, 1] and body == '{"id":"evt_1"}'
        finally:
            engine.dispose()
        row.observed = "up, down, up: 1 event, 1 delivery, 1 payment, 1 refund, body kept"


def test_a_payment_changed_in_the_same_batch_after_its_answer_replays_the_answer(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        f"the payment changes between its answer and the key's store: one batch authorises"
        f" P (fast path, a reference) and marks P uncertain (per-item), then P is released"
        f" ({backend(world)})",
        expected="the authorise key replays the authorised answer byte for byte (status"
        " authorised), the uncertain key its own answer; the payment shows canceled",
    ) as row:
        card = world.funded_card(500)
        payment = world.terminal.create_payment(90)
        body = _authorise_body(world, card, 90)
        items = [
            {
                "path": f"/v1/payments/{payment['id']}/authorise",
                "idempotency_key": "same-auth",
                "body": body,
            },
            {"path": f"/v1/payments/{payment['id']}/uncertain", "idempotency_key": "same-unc"},
        ]
        first = _batch(world, items)
        answers = first.json()["responses"]
        assert [(a["status"], a["body"]["status"]) for a in answers] == [
            (200, "authorised"),
            (200, "uncertain"),
        ]
        a = _merchant_of(world, world.merchant_key)
        assert _key(world, a, "same-auth").step == "authorise"
        world.clock.advance(world.settings.card_hold_ttl + dt.timedelta(minutes=1))
        _sweep(world)
        now = world.client.get(
            f"/v1/payments/{payment['id']}", headers=world.auth(world.merchant_key)
        ).json()
        assert now["status"] == "canceled"
        again = _batch(world, items)
        assert again.content == first.content.replace(b'"replayed":false', b'"replayed":true')
        row.observed = "both keys replay the batch's first bytes; the payment is canceled"


@pytest.mark.postgres
def test_a_key_another_request_is_storing_replays_its_answer_once_stored(
    tmp_path: Path, proof: Proof
) -> None:
    """A concurrent request holds the key (its row written, not yet committed); a retry on
    the single endpoint and one in a batch wait for it on the key's unique index, whichever
    moment they reach it, and then replay what it stored: a reference to its payment."""
    with (
        database_url("postgresql", tmp_path, migrated=True) as url,
        make_world(url) as world,
        proof.row(
            SUITE,
            "a retry (single endpoint and batch) while another request holds the key"
            " uncommitted, then commits its answer as a reference (PostgreSQL)",
            expected="both retries wait, then replay the stored answer byte for byte (the"
            " batch's own run rolled back); one payment, as the first request made",
        ) as row,
    ):
        first = _post(world, "seed", "/v1/payments", CREATE)
        a = _merchant_of(world, world.merchant_key)
        seed = _key(world, a, "seed")
        with world.factory() as holder:
            holder.add(
                IdempotencyRecord(
                    principal=a,
                    key="race",
                    fingerprint=seed.fingerprint,
                    state="done",
                    response_status=201,
                    object_id=seed.object_id,
                    step=seed.step,
                    created_at=world.clock(),
                )
            )
            holder.flush()  # the row is written, the unique index entry held, uncommitted
            item = {"path": "/v1/payments", "idempotency_key": "race", "body": CREATE}
            with ThreadPoolExecutor(2) as pool:
                single = pool.submit(_post, world, "race", "/v1/payments", CREATE)
                batched = pool.submit(_batch, world, [item])
                holder.commit()
                answers = (single.result(timeout=60), batched.result(timeout=60))
        assert (answers[0].status_code, answers[0].content) == (201, first.content)
        assert answers[0].headers.get("idempotent-replayed") == "true"
        (replayed,) = answers[1].json()["responses"]
        assert replayed["replayed"] and replayed["body"] == first.json()
        with world.factory() as session:
            assert session.scalar(text("SELECT count(*) FROM payments")) == 1
        row.observed = "single and batch retries replayed the committed reference; 1 payment"
