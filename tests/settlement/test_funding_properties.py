"""Property: any sequence of float deposits, loads, bank orders, statement imports, cancels,
sweeps and returns keeps the conservation equation (funds received = where they are now)
and the invariants of :mod:`tests.proof.invariants` (held amounts = open loads)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proof.invariants import check_invariants
from tests.settlement.support import World, database_url, make_world, pay_by_statement
from webpurse.settlement import ledger

ops = st.one_of(
    st.tuples(st.just("deposit"), st.integers(0, 1), st.integers(1, 5_000), st.integers(0, 4)),
    st.tuples(st.just("float_load"), st.integers(0, 1), st.integers(1, 3_000)),
    st.tuples(st.just("order"), st.integers(1, 3_000)),
    st.tuples(st.just("pay"), st.integers(0, 50), st.sampled_from([-1, 0, 0, 0, 1])),
    st.tuples(st.just("stranger"), st.integers(1, 900)),
    st.tuples(st.just("cancel"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("sweep"), st.integers(0, 100)),
    st.tuples(st.just("return"), st.integers(0, 50)),
)


CARD: dict[str, Any] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("funding_props")
    with database_url("sqlite", tmp, migrated=True) as url, make_world(url, float_fen=0) as w:
        CARD["number"] = w.issue().state.issuer.card_number
        yield w


def _apply(world: World, op: tuple[Any, ...], state: dict[str, list[dict[str, Any]]]) -> None:
    op_auth = world.auth(world.operator_key)
    keys = [world.merchant_key, world.other_key]
    kind = op[0]
    if kind == "deposit":
        _, who, amount, ref = op
        merchant = world.client.get("/v1/float", headers=world.auth(keys[who])).json()["merchant"]
        answer = world.client.post(
            f"/v1/operator/floats/{merchant}/deposits",
            json={"amount": amount, "bank_reference": f"DEP-{ref}"},
            headers=op_auth,
        )
        assert answer.status_code in (200, 201, 409), answer.text
    elif kind == "float_load":
        _, who, amount = op
        answer = world.client.post(
            "/v1/loads",
            json={"amount": amount, "funding": {"method": "merchant_float"}},
            headers=world.auth(keys[who]),
        )
        assert answer.status_code in (201, 409), answer.text
        if answer.status_code == 201:
            state["loads"].append({**answer.json(), "key": keys[who]})
    elif kind == "order":
        answer = world.client.post(
            "/v1/loads",
            json={
                "amount": op[1],
                "card_number": state["card"][0]["number"],
                "funding": {"method": "bank_transfer"},
            },
            headers=world.auth(world.merchant_key),
        )
        assert answer.status_code == 201, answer.text
        state["loads"].append({**answer.json(), "key": world.merchant_key})
        state["orders"].append(answer.json())
    elif kind == "pay" and state["orders"]:
        order = state["orders"][op[1] % len(state["orders"])]
        pay_by_statement(world, [(order["funding"]["reference"], order["amount"] + op[2])])
    elif kind == "stranger":
        pay_by_statement(world, [("no reference", op[1])])
    elif kind == "cancel" and state["loads"]:
        load = state["loads"][op[1] % len(state["loads"])]
        key = world.operator_key if op[2] else load["key"]
        answer = world.client.post(
            f"/v1/loads/{load['id']}/cancel", json={}, headers=world.auth(key)
        )
        assert answer.status_code in (200, 404, 409), answer.text
    elif kind == "sweep":
        world.clock.advance(dt.timedelta(hours=op[1]))
        world.client.post("/v1/maintenance/sweep", json={}, headers=op_auth)
    elif kind == "return":
        listed = world.client.get(
            "/v1/operator/statement-exceptions?status=awaiting_return", headers=op_auth
        ).json()["data"]
        if listed:
            exc = listed[op[1] % len(listed)]
            path = f"/v1/operator/statement-exceptions/{exc['id']}/return"
            answer = world.client.post(
                path, json={"return_reference": f"OUT-{exc['id']}"}, headers=op_auth
            )
            assert answer.status_code == 200, answer.text


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(ops, min_size=1, max_size=10))
def test_any_funding_sequence_conserves_value(world: World, sequence: list[Any]) -> None:
    state: dict[str, list[dict[str, Any]]] = {"loads": [], "orders": [], "card": [CARD]}
    for op in sequence:
        _apply(world, op, state)
        with world.factory() as session:
            report = ledger.check(session)
        assert report.ok, (op, report.problems)
        received = ledger.funds_received(report.totals)
        assert received == ledger.funds_held(report.totals)
        assert all(report.totals.get(k, 0) >= 0 for k in ledger.HOLDING_KINDS)
    check_invariants(world.factory, world.url, settled=True)
