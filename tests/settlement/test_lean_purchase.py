"""A lean purchase (issue 20): answers, the purchase's event and the card's purchase history
rendered from the payment row instead of stored beside it — and exactly what was answered.

The property: a purchase step's answer (create 201, authorise 200, capture 200) rendered
again from the payment as of that step (``views.payment_as_of``) is the first answer,
byte for byte, whatever happened to the payment since (refunds, a release and a heal).
Then, through the API on SQLite and PostgreSQL: replayed keys, the ``payment.succeeded``
event body and the card's events, on the single endpoints and in batches.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import select

from tests.settlement.support import World, ok
from webpurse.settlement import changes, ledger, views
from webpurse.settlement.models import CardEvent, IdempotencyRecord, Payment
from webpurse.settlement.routes_webhooks import secret_box_for
from webpurse.settlement.transactions import Kind, Status, move
from webpurse.settlement.webhooks import WebhookEvent, _claim_due, event_body, event_bytes

START = dt.datetime(2026, 12, 6, 10, 0, tzinfo=dt.UTC)
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)


def _encoded(answer: dict[str, Any]) -> tuple[bytes, str]:
    """Both encodings an answer is sent in: the batch's (orjson) and the single route's."""
    return orjson.dumps(answer), json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


@st.composite
def _moments(draw: st.DrawFn, n: int) -> list[dt.datetime]:
    """``n`` increasing UTC times with microseconds (what a column keeps)."""
    gaps = draw(st.lists(st.integers(0, 10**9), min_size=n, max_size=n))
    moments, at = [], START
    for gap in gaps:
        at += dt.timedelta(microseconds=gap)
        moments.append(at)
    return moments


LATER = st.lists(
    st.sampled_from(["refund", "unrefund", "release", "uncertain", "heal"]), max_size=6
)


@given(
    amount=st.integers(1, 10**9),
    description=TEXT,
    reference=TEXT,
    metadata=st.dictionaries(TEXT, TEXT, max_size=3),
    stop=st.sampled_from(["create", "authorise", "capture"]),
    later=LATER,
    moments=_moments(12),
    refund=st.integers(1, 10**9),
)
def test_each_steps_answer_is_rendered_again_exactly_after_the_payment_moved_on(
    amount: int,
    description: str,
    reference: str,
    metadata: dict[str, str],
    stop: str,
    later: list[str],
    moments: list[dt.datetime],
    refund: int,
) -> None:
    clock = iter(moments)
    created = next(clock)
    payment = Payment(
        id="pay_1",
        merchant_id="mer_1",
        status=Status.REQUIRES_CARD,
        amount=amount,
        currency="CNY",
        description=description,
        merchant_reference=reference,
        metadata_=metadata,
        terminal_id="112233445566",
        key_index=1,
        refunded_amount=0,
        created_at=created,
        updated_at=created,
    )
    answers = {"create": views.payment_json(payment)}
    if stop != "create":
        at = next(clock)
        changes.apply(
            payment,
            changes.authorised(
                Kind.PAYMENT,
                payment.status,
                card_id="crd_1",
                card_number="1234567890123456",
                key_version=1,
                balance=amount,
                counter=7,
                random=b"\x01\x02\x03\x04",
                date=at.date(),
                time=at.time(),
                now=at,
                supersedes=None,
            ),
        )
        payment.terminal_seq, payment.mac1 = 42, "A1B2C3D4"
        answers["authorise"] = views.payment_json(payment)
    if stop == "capture":
        at = next(clock)
        changes.apply(
            payment,
            changes.succeeded(Kind.PAYMENT, payment.status, mac2=b"MAC2", tac=b"TAC!", now=at),
        )
        answers["capture"] = views.payment_json(payment)
    for step, answer in answers.items():  # what the key and the event store: a reference
        assert views.renders_as_of(answer, payment, step)
    for change in later:  # the payment moves on as the services move it
        at = next(clock, moments[-1])
        if change == "refund" and payment.status == Status.SUCCEEDED:
            payment.refunded_amount += refund
        elif change == "unrefund" and payment.refunded_amount:
            payment.refunded_amount -= refund
        elif change == "release" and payment.status in (Status.AUTHORISED, Status.UNCERTAIN):
            move(Kind.PAYMENT, payment, Status.CANCELED)
            payment.decline_code = "hold_expired"
        elif change == "uncertain" and payment.status == Status.AUTHORISED:
            move(Kind.PAYMENT, payment, Status.UNCERTAIN)
        elif change == "heal" and payment.status == Status.CANCELED and payment.mac1:
            payment.decline_code = None
            changes.apply(
                payment,
                changes.succeeded(Kind.PAYMENT, payment.status, mac2=b"MAC2", tac=b"TAC?", now=at),
            )
        else:
            continue
        payment.updated_at = at
    for step, answer in answers.items():
        assert _encoded(views.payment_as_of(payment, step)) == _encoded(answer)


# --- through the API ---------------------------------------------------------------------


def _post(world: World, path: str, body: dict[str, Any], key: str) -> Any:
    headers = {**world.auth(world.merchant_key), "idempotency-key": key}
    return world.client.post(path, json=body, headers=headers)


def _refund(world: World, payment_id: str, amount: int, key: str) -> None:
    answer = _post(world, "/v1/refunds", {"payment": payment_id, "amount": amount}, key)
    assert answer.status_code in (200, 201), answer.text


def _single_purchase(world: World, amount: int) -> list[tuple[str, dict[str, Any], Any]]:
    """A purchase on the single endpoints with keys: (path, body, first answer) per step."""
    card = world.funded_card(1_000)
    steps = []
    create = {"amount": amount, "description": "keyed", "metadata": {"z": "1", "a": "é"}}
    first = _post(world, "/v1/payments", create, "create-1")
    assert first.status_code == 201
    steps.append(("/v1/payments", create, first))
    payment_id = first.json()["id"]
    world.clock.advance(dt.timedelta(seconds=3, microseconds=17))
    issuer, init = world.terminal.purchase_batch1(card, amount)
    path = f"/v1/payments/{payment_id}/authorise"
    authorise = {
        "issuer_data": issuer.hex(),
        "initialize_response": init.hex(),
        "terminal_id": world.terminal_id,
    }
    first = _post(world, path, authorise, "authorise-1")
    assert first.status_code == 200, first.text
    steps.append((path, authorise, first))
    world.clock.advance(dt.timedelta(seconds=5))
    debit = ok(card, bytes.fromhex(first.json()["authorisation"]["debit_apdu"]))
    path = f"/v1/payments/{payment_id}/capture"
    capture = {"debit_response": debit.hex()}
    first = _post(world, path, capture, "capture-1")
    assert first.status_code == 200 and first.json()["status"] == "succeeded"
    steps.append((path, capture, first))
    return steps


def test_a_replayed_purchase_step_is_its_first_answer_after_refunds(world: World) -> None:
    steps = _single_purchase(world, 300)
    payment_id = steps[0][2].json()["id"]
    world.clock.advance(dt.timedelta(minutes=1))
    _refund(world, payment_id, 100, "refund-1")
    world.clock.advance(dt.timedelta(minutes=1))
    _refund(world, payment_id, 50, "refund-2")
    for (path, body, first), key in zip(
        steps, ["create-1", "authorise-1", "capture-1"], strict=True
    ):
        again = _post(world, path, body, key)
        assert again.headers.get("idempotent-replayed") == "true"
        assert (again.status_code, again.content) == (first.status_code, first.content)
    now = world.client.get(f"/v1/payments/{payment_id}", headers=world.auth(world.merchant_key))
    assert now.json()["amount_refunded"] == 150  # the payment did move on
    with world.factory() as session:
        keys = {
            r.key: r
            for r in session.scalars(
                select(IdempotencyRecord).where(
                    IdempotencyRecord.key.in_(["create-1", "authorise-1", "capture-1", "refund-1"])
                )
            )
        }
    for key, step in (
        ("create-1", "create"),
        ("authorise-1", "authorise"),
        ("capture-1", "capture"),
    ):
        assert (keys[key].response_body, keys[key].object_id, keys[key].step) == (
            None,
            payment_id,
            step,
        )
    assert keys["refund-1"].response_body is not None  # not a purchase step: stored as is


def _batch(world: World, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answer = world.client.post(
        "/v1/batch", json={"requests": items}, headers=world.auth(world.merchant_key)
    )
    assert answer.status_code == 200, answer.text
    return list(answer.json()["responses"])


def test_a_replayed_batch_item_is_its_first_answer_after_refunds(world: World) -> None:
    cards = [world.funded_card(1_000) for _ in range(3)]
    creates = [
        {"path": "/v1/payments", "idempotency_key": f"c{i}", "body": {"amount": 100 + i}}
        for i in range(3)
    ]
    created = _batch(world, creates)
    ids = [a["body"]["id"] for a in created]
    world.clock.advance(dt.timedelta(seconds=2))
    authorises = []
    for i, (payment_id, card) in enumerate(zip(ids, cards, strict=True)):
        issuer, init = world.terminal.purchase_batch1(card, 100 + i)
        authorises.append(
            {
                "path": f"/v1/payments/{payment_id}/authorise",
                "idempotency_key": f"a{i}",
                "body": {
                    "issuer_data": issuer.hex(),
                    "initialize_response": init.hex(),
                    "terminal_id": world.terminal_id,
                },
            }
        )
    authorised = _batch(world, authorises)
    world.clock.advance(dt.timedelta(seconds=2))
    captures = [
        {
            "path": f"/v1/payments/{payment_id}/capture",
            "idempotency_key": f"k{i}",
            "body": {
                "debit_response": ok(
                    card, bytes.fromhex(a["body"]["authorisation"]["debit_apdu"])
                ).hex()
            },
        }
        for i, (payment_id, card, a) in enumerate(zip(ids, cards, authorised, strict=True))
    ]
    captured = _batch(world, captures)
    assert {a["body"]["status"] for a in captured} == {"succeeded"}
    world.clock.advance(dt.timedelta(minutes=1))
    for i, payment_id in enumerate(ids):
        _refund(world, payment_id, 10 + i, f"r{i}")
    for items, first in ((creates, created), (authorises, authorised), (captures, captured)):
        again = _batch(world, items)
        assert all(a["replayed"] for a in again)
        assert [(a["status"], json.dumps(a["body"])) for a in again] == [
            (a["status"], json.dumps(a["body"])) for a in first
        ]
    # The single endpoints replay the batch's keys the same way.
    single = _post(world, captures[0]["path"], captures[0]["body"], "k0")
    assert single.json() == captured[0]["body"]
    with world.factory() as session:
        rows = session.scalars(select(IdempotencyRecord)).all()
        purchase_keys = [r for r in rows if r.key[0] in "cak"]
    assert len(purchase_keys) == 9
    assert all(r.response_body is None and r.object_id in ids for r in purchase_keys)


def test_the_succeeded_event_is_rendered_from_the_payment_byte_for_byte(world: World) -> None:
    hook = world.client.post(
        "/v1/webhook_endpoints",
        json={"url": "https://hooks.example.invalid/in", "events": ["payment.succeeded"]},
        headers=world.auth(world.merchant_key),
    )
    assert hook.status_code == 201, hook.text
    steps = _single_purchase(world, 200)
    single = steps[-1][2].json()
    card = world.funded_card(1_000)
    created = _batch(world, [{"path": "/v1/payments", "body": {"amount": 90}}])[0]["body"]
    issuer, init = world.terminal.purchase_batch1(card, 90)
    authorised = world.terminal.authorise_payment(created["id"], issuer, init).json()
    debit = ok(card, bytes.fromhex(authorised["authorisation"]["debit_apdu"]))
    path = f"/v1/payments/{created['id']}/capture"
    batched = _batch(world, [{"path": path, "body": {"debit_response": debit.hex()}}])[0]["body"]
    world.clock.advance(dt.timedelta(minutes=1))
    for answer in (single, batched):
        _refund(world, answer["id"], 20, f"refund-{answer['id']}")
    events: list[tuple[str, dict[str, Any]]] = []
    bodies: list[tuple[str, bytes]] = []
    with world.factory() as session:
        for answer in (single, batched):
            event = session.scalars(
                select(WebhookEvent).where(
                    WebhookEvent.type == "payment.succeeded",
                    WebhookEvent.object_id == answer["id"],
                )
            ).one()
            assert event.body is None  # the row names the payment
            # What the outbox stored before: the body of the capture's answer, these bytes.
            stored = event_body(event.id, event.type, event.created_at, answer)
            assert event_bytes(session, event) == stored
            events.append((event.id, answer))
            bodies.append((event.id, stored))
    # The deliveries carry (and sign) the same bytes.
    jobs, _ = _claim_due(
        world.factory, world.clock(), secret_box_for(world.settings), 50, dt.timedelta(minutes=2)
    )
    assert {job.event_id: job.body for job in jobs} == {
        event_id: stored for event_id, stored in bodies
    }
    for event_id, answer in events:  # the merchant's event list shows the same body
        shown = world.client.get(f"/v1/events/{event_id}", headers=world.auth(world.merchant_key))
        assert shown.json()["data"] == {"object": answer}


def test_a_capture_adds_no_card_event_and_the_card_still_lists_its_purchase(
    world: World,
) -> None:
    card = world.funded_card(1_000)
    number = card.state.issuer.card_number
    operator = world.auth(world.operator_key)
    world.clock.advance(dt.timedelta(seconds=1))
    captured = world.terminal.purchase(card, 250)
    world.clock.advance(dt.timedelta(seconds=1))
    blocked = world.client.post(
        f"/v1/cards/{number}/status", json={"status": "blocked"}, headers=operator
    )
    assert blocked.status_code == 200
    with world.factory() as session:
        kinds = list(session.scalars(select(CardEvent.kind).order_by(CardEvent.id)))
        payment = session.get(Payment, captured["id"])
        assert payment is not None and payment.succeeded_at is not None
        succeeded_at, counter = payment.succeeded_at, payment.counter
    assert "purchase" not in kinds
    events = world.client.get(f"/v1/cards/{number}/events", headers=operator).json()["data"]
    assert [e["kind"] for e in events][-2:] == ["purchase", "status"]
    purchase = events[-2]
    assert purchase["detail"] == {
        "payment": captured["id"],
        "amount": 250,
        "counter": counter,
        "tac": captured["tac"],
    }
    assert purchase["created_at"] == succeeded_at.isoformat()


def test_an_item_the_fast_path_gave_back_and_the_ledger_refused_replays_its_refusal(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path answered (a reference to store), fell back, and the per-item path
    refused: the key keeps the refusal, not a rendering of the payment."""
    card = world.funded_card(1_000)
    created = _batch(world, [{"path": "/v1/payments", "body": {"amount": 100}}])[0]["body"]
    issuer, init = world.terminal.purchase_batch1(card, 100)
    item = {
        "path": f"/v1/payments/{created['id']}/authorise",
        "idempotency_key": "auth-refused",
        "body": {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": world.terminal_id,
        },
    }

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ledger.LedgerError("refused for the test")

    with monkeypatch.context() as patched:
        patched.setattr(ledger, "post_transfers", refuse)
        patched.setattr(ledger, "post_transfer", refuse)
        patched.setattr(ledger, "available", refuse)  # authorise's hold posts nothing
        first = _batch(world, [item])[0]
    assert (first["status"], first["body"]["code"]) == (409, "ledger_refused")
    again = _batch(world, [item])[0]
    assert again["replayed"] and (again["status"], again["body"]) == (409, first["body"])


def test_a_purchase_is_listed_before_the_release_its_capture_caused(world: World) -> None:
    """B supersedes A's uncertain payment at the same counter; B's capture releases A in
    the same request: the card lists B's purchase, then A's release, as it recorded them."""
    card = world.funded_card(1_000)
    number = card.state.issuer.card_number
    world.clock.advance(dt.timedelta(seconds=1))
    stale = world.terminal.create_payment(300)
    issuer, init = world.terminal.purchase_batch1(card, 300)
    assert world.terminal.authorise_payment(stale["id"], issuer, init).status_code == 200
    assert world.terminal.post(f"/v1/payments/{stale['id']}/uncertain").status_code == 200
    theirs = world.other_terminal.create_payment(200)
    issuer, init = world.other_terminal.purchase_batch1(card, 200)
    authorised = world.other_terminal.authorise_payment(theirs["id"], issuer, init)
    assert authorised.status_code == 200, authorised.text  # it supersedes A's
    debit = ok(card, bytes.fromhex(authorised.json()["authorisation"]["debit_apdu"]))
    world.clock.advance(dt.timedelta(seconds=1))
    path = f"/v1/payments/{theirs['id']}/capture"
    captured = world.other_terminal.post(path, {"debit_response": debit.hex()})
    assert captured.json()["status"] == "succeeded"
    events = world.client.get(
        f"/v1/cards/{number}/events", headers=world.auth(world.operator_key)
    ).json()["data"]
    kinds = [(e["kind"], e["detail"].get("payment")) for e in events]
    assert kinds[-2:] == [("purchase", theirs["id"]), ("purchase_released", stale["id"])]
    assert events[-1]["created_at"] == events[-2]["created_at"]


def test_listing_events_takes_the_same_queries_for_two_events_as_for_eight(world: World) -> None:
    # GET /v1/events renders each body-less event from its payment: one query per page,
    # not one per event (and one for all the events' deliveries).
    hook = world.client.post(
        "/v1/webhook_endpoints",
        json={"url": "https://hooks.example.invalid/in", "events": ["payment.succeeded"]},
        headers=world.auth(world.merchant_key),
    )
    assert hook.status_code == 201, hook.text
    engine = world.factory.kw["bind"]
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    def listed() -> tuple[int, list[dict[str, Any]]]:
        statements.clear()
        sqlalchemy_event.listen(engine, "before_cursor_execute", count)
        try:
            shown = world.client.get(
                "/v1/events?limit=100&type=payment.succeeded",
                headers=world.auth(world.merchant_key),
            )
        finally:
            sqlalchemy_event.remove(engine, "before_cursor_execute", count)
        assert shown.status_code == 200, shown.text
        return len(statements), shown.json()["data"]

    answers = [world.terminal.purchase(world.funded_card(1_000), 10) for _ in range(2)]
    few, first = listed()
    answers += [world.terminal.purchase(world.funded_card(1_000), 10) for _ in range(6)]
    many, shown = listed()
    assert len(first) == 2 and len(shown) == 8
    assert many == few
    succeeded = {e["data"]["object"]["id"]: e["data"]["object"] for e in shown}
    assert {a["id"] for a in answers} == set(succeeded)
    assert all(len(e["deliveries"]) == 1 for e in shown)
