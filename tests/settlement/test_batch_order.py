"""POST /v1/batch answers every item as the same calls made one by one, in the batch's order.

The fast path runs before the per-item path; an item it takes must not jump ahead of an
earlier per-item call that touches its payment or its card (issue 19, finding 8). A table
of orders and a Hypothesis property compare a batch with the same calls one by one, on two
identical setups (a fresh card and fresh payments each) of the same database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.settlement.support import World
from webpurse.card import CardApplet

Op = str  # "cancel P", "authorise P", "authorise Q", "uncertain P", "cancel Q", "create"
OPS: tuple[Op, ...] = ("cancel P", "authorise P", "authorise Q", "uncertain P", "cancel Q")


@dataclass
class Setup:
    """One copy of the scenario: a funded card and two payments waiting for it."""

    card: CardApplet
    ids: dict[str, str]


def _setup(world: World) -> Setup:
    card = world.funded_card(1_000)
    ids = {
        name: world.terminal.create_payment(amount)["id"]
        for name, amount in (("P", 300), ("Q", 200))
    }
    return Setup(card, ids)


def _request(world: World, setup: Setup, op: Op) -> dict[str, Any]:
    """One call as a batch item (path and body); INITIALIZE is run on the card now."""
    if op == "create":
        return {"path": "/v1/payments", "body": {"amount": 50, "description": "order"}}
    action, name = op.split()
    payment_id = setup.ids[name]
    path = f"/v1/payments/{payment_id}/{action}"
    if action != "authorise":
        return {"path": path, "body": None}
    amount = 300 if name == "P" else 200
    issuer, init = world.terminal.purchase_batch1(setup.card, amount)
    body = {
        "issuer_data": issuer.hex(),
        "initialize_response": init.hex(),
        "terminal_id": world.terminal_id,
    }
    return {"path": path, "body": body}


def _shape(status: int, body: dict[str, Any]) -> tuple[Any, ...]:
    """What a caller acts on: the status, and the object's status or the problem's code."""
    if status < 300:
        return (status, body.get("object"), body.get("status"))
    return (status, body.get("code"), body.get("decline_code"))


def one_by_one(world: World, requests: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    shapes = []
    for request in requests:
        answer = world.client.post(
            request["path"], json=request["body"] or {}, headers=world.auth(world.merchant_key)
        )
        shapes.append(_shape(answer.status_code, answer.json()))
    return shapes


def batched(world: World, requests: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    answer = world.client.post(
        "/v1/batch", json={"requests": requests}, headers=world.auth(world.merchant_key)
    )
    assert answer.status_code == 200, answer.text
    return [_shape(r["status"], r["body"]) for r in answer.json()["responses"]]


def compare(world: World, order: tuple[Op, ...]) -> tuple[list[Any], list[Any]]:
    single, batch = _setup(world), _setup(world)
    singles = one_by_one(world, [_request(world, single, op) for op in order])
    batches = batched(world, [_request(world, batch, op) for op in order])
    return singles, batches


TABLE: list[tuple[Op, ...]] = [
    ("cancel P", "authorise P"),  # the case: cancel 200, authorise 409
    ("authorise P", "cancel P"),
    ("cancel P", "authorise P", "authorise Q"),
    ("uncertain P", "authorise P"),
    ("authorise P", "authorise Q", "cancel Q"),
    ("cancel Q", "authorise Q", "authorise P"),
    ("create", "cancel P", "create", "authorise P", "authorise Q"),
]


@pytest.mark.parametrize("order", TABLE, ids=[" / ".join(o) for o in TABLE])
def test_a_batch_answers_as_the_same_calls_one_by_one(world: World, order: tuple[Op, ...]) -> None:
    singles, batches = compare(world, order)
    assert batches == singles


def test_cancel_then_authorise_in_one_batch_cancels_first(world: World) -> None:
    singles, batches = compare(world, ("cancel P", "authorise P"))
    assert singles == [(200, "payment", "canceled"), (409, "invalid_payment_state", None)]
    assert batches == singles


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    order=st.permutations(OPS).flatmap(
        lambda ops: st.integers(1, len(ops)).map(lambda n: tuple(ops[:n]))
    )
)
def test_any_order_of_calls_answers_alike_batched_or_one_by_one(
    world: World, order: tuple[Op, ...]
) -> None:
    singles, batches = compare(world, order)
    assert batches == singles, order


# --- _in_order without _touches --------------------------------------------------------

ACTIONS = ("create", "authorise", "capture", "cancel", "uncertain", "resolve")


@st.composite
def _planned(draw: st.DrawFn) -> tuple[list[Any], set[int], dict[int, frozenset[str]]]:
    """Items as the fast path leaves them for :func:`batch._in_order`: some answered or
    duplicates, the pending ones with the keys they touch, some of those taken."""
    from webpurse.settlement import batch

    count = draw(st.integers(0, 8))
    items, taken, touched = [], set(), {}
    for index in range(count):
        action = draw(st.sampled_from(ACTIONS))
        item = batch.Item(index, "/v1/payments", action, None, None, None)
        state = draw(st.sampled_from(("pending", "answered", "duplicate")))
        if state == "answered":
            item.answer = (200, {})
        elif state == "duplicate" and index:
            item.duplicate_of = draw(st.integers(0, index - 1))
        else:
            keys = draw(st.frozensets(st.sampled_from(("payment:P", "card:C", "card:D"))))
            touched[index] = frozenset() if action == "create" else keys
            if action in ("authorise", "capture") and draw(st.booleans()):
                taken.add(index)
        items.append(item)
    return items, taken, touched


@settings(max_examples=500, deadline=None)
@given(plan=_planned())
def test_in_order_keeps_every_fast_item_when_none_runs_before_it(
    plan: tuple[list[Any], set[int], dict[int, frozenset[str]]],
) -> None:
    """The shortcut of :func:`batch._fast`: whenever :func:`batch._none_before` holds,
    :func:`batch._in_order` keeps all it is given, whatever each item touches."""
    from webpurse.settlement import batch

    items, taken, touched = plan
    if batch._none_before(items, taken):
        assert batch._in_order(items, set(taken), touched) == taken
    else:  # a pending item not taken, and not a create: the keys decide
        pending = [i for i in items if i.answer is None and i.duplicate_of is None]
        assert any(i.index not in taken and i.action != "create" for i in pending)


def test_a_batch_taken_whole_by_the_fast_path_reads_no_card_numbers(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every item fast: the answers are the same calls' one by one, and :func:`_touches`
    (a statement and a pass over the items) does not run; with a per-item item it does."""
    from webpurse.settlement import batch

    calls: list[int] = []
    real = batch._touches

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "_touches", counted)
    singles, batches = compare(world, ("create", "authorise P", "create"))
    assert singles == [
        (201, "payment", "requires_card"),
        (200, "payment", "authorised"),
        (201, "payment", "requires_card"),
    ]
    assert batches == singles
    assert calls == []
    singles, batches = compare(world, ("cancel Q", "authorise P"))  # a per-item item first
    assert batches == singles
    assert calls == [1]
