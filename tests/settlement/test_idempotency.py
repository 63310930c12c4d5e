"""Idempotency-Key on POSTs: replay, conflicting reuse, in-flight requests."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import hypothesis
from hypothesis import given
from hypothesis import strategies as st

from tests.settlement.support import World
from webpurse.settlement import idempotency
from webpurse.settlement.models import IdempotencyRecord, Payment


def _post(
    world: World, body: dict[str, object], key: str
) -> tuple[int, dict[str, object], dict[str, str]]:
    answer = world.client.post(
        "/v1/payments",
        json=body,
        headers={**world.auth(world.merchant_key), "idempotency-key": key},
    )
    return answer.status_code, answer.json(), dict(answer.headers)


def test_a_retry_gets_the_stored_answer_and_creates_nothing(world: World) -> None:
    status, first, _ = _post(world, {"amount": 100}, "order-1")
    assert status == 201
    status, again, headers = _post(world, {"amount": 100}, "order-1")
    assert status == 201 and again == first
    assert headers.get("idempotent-replayed") == "true"
    with world.factory() as session:
        assert session.query(Payment).count() == 1


def test_the_same_key_with_other_parameters_is_refused(world: World) -> None:
    _post(world, {"amount": 100}, "order-2")
    status, body, _ = _post(world, {"amount": 999}, "order-2")
    assert status == 422 and body["code"] == "idempotency_key_reused"


def test_keys_are_per_merchant(world: World) -> None:
    _post(world, {"amount": 100}, "shared")
    answer = world.client.post(
        "/v1/payments",
        json={"amount": 100},
        headers={**world.auth(world.other_key), "idempotency-key": "shared"},
    )
    assert answer.status_code == 201 and "idempotent-replayed" not in answer.headers


def test_a_request_still_running_under_the_key_gets_409(world: World) -> None:
    fingerprint_source = {"amount": 100}
    _post(world, fingerprint_source, "busy")  # learn the fingerprint the server stores
    with world.factory() as session, session.begin():
        record = session.query(IdempotencyRecord).filter_by(key="busy").one()
        session.add(
            IdempotencyRecord(
                principal=record.principal,
                key="busy-2",
                fingerprint=record.fingerprint,
                state="in_flight",
                created_at=record.created_at,
            )
        )
    status, body, _ = _post(world, fingerprint_source, "busy-2")
    assert status == 409 and body["code"] == "idempotency_in_flight"


def test_declines_are_replayed_too(world: World) -> None:
    card = world.funded_card(100)
    payment = world.terminal.create_payment(500)
    issuer, init = world.terminal.purchase_batch1(card, 100)
    body = {
        "issuer_data": issuer.hex(),
        "initialize_response": init.hex(),
        "terminal_id": world.terminal_id,
    }
    headers = {**world.auth(world.merchant_key), "idempotency-key": "auth-1"}
    url = f"/v1/payments/{payment['id']}/authorise"
    first = world.client.post(url, json=body, headers=headers)
    second = world.client.post(url, json=body, headers=headers)
    assert first.status_code == second.status_code == 402
    assert first.json() == second.json()
    assert second.json()["decline_code"] == "insufficient_funds"


def test_a_key_abandoned_in_flight_by_a_dead_request_runs_afresh(world: World) -> None:
    import datetime as dt

    status, _, _ = _post(world, {"amount": 100}, "learn")
    with world.factory() as session, session.begin():
        record = session.query(IdempotencyRecord).filter_by(key="learn").one()
        session.add(
            IdempotencyRecord(
                principal=record.principal,
                key="dead",
                fingerprint=record.fingerprint,
                state="in_flight",
                created_at=world.clock() - dt.timedelta(minutes=6),
            )
        )
    status, body, _ = _post(world, {"amount": 100}, "dead")
    assert status == 201 and body["status"] == "requires_card"


def test_a_ledger_refusal_is_stored_under_the_key_and_replayed(world: World) -> None:
    """409 ledger_refused is a refusal like a decline: a retry with the key replays it."""
    from sqlalchemy import select, update

    from webpurse.settlement import ledger
    from webpurse.settlement.models import Account, Card

    card = world.funded_card(1_000)
    payment = world.terminal.create_payment(300)
    number = card.state.issuer.card_number
    with world.factory() as session, session.begin():  # a damaged row the hold must use
        card_id = session.scalars(select(Card.id).where(Card.card_number == number)).one()
        account = ledger.card_account(card_id)
        session.execute(update(Account).where(Account.id == account).values(currency="USD"))
    issuer, init = world.terminal.purchase_batch1(card, 300)
    body = {
        "issuer_data": issuer.hex(),
        "initialize_response": init.hex(),
        "terminal_id": world.terminal_id,
    }
    headers = {**world.auth(world.merchant_key), "idempotency-key": "auth-ledger"}
    url = f"/v1/payments/{payment['id']}/authorise"
    first = world.client.post(url, json=body, headers=headers)
    assert first.status_code == 409
    assert first.json()["code"] == "ledger_refused"
    with world.factory() as session, session.begin():
        session.execute(update(Account).where(Account.id == account).values(currency="CNY"))
        stored = session.query(IdempotencyRecord).filter_by(key="auth-ledger").one()
        assert (stored.state, stored.response_status) == ("done", 409)
        assert session.get(Payment, payment["id"]).status == "requires_card"  # type: ignore[union-attr]
    again = world.client.post(url, json=body, headers=headers)
    assert again.status_code == 409
    assert again.json() == first.json()
    assert again.headers.get("idempotent-replayed") == "true"


_JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True)
    | st.text()
    | st.sampled_from(["\x7f", "é", "中", "\x00", "\u2028", "\ud7ff", 'a"\\/b']),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.sampled_from(["é", "\x7f", "Z", "a"]), inner)
        | st.tuples(inner, inner)
    ),
    max_leaves=12,
)


@hypothesis.settings(max_examples=500, deadline=None)
@given(payload=_JSONISH, path=st.text(max_size=10))
def test_fingerprints_are_the_stored_formula_whatever_the_payload(payload: Any, path: str) -> None:
    """Fingerprints are stored with each key, so a faster encoder must give the same
    digest as the original formula for every payload (floats, non-ASCII, big ints...)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    expected = hashlib.sha256(f"POST {path}\n{canonical}".encode()).hexdigest()
    assert idempotency.fingerprint("POST", path, payload) == expected
