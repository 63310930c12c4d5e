"""Attacks that try to get money or a card stuck for good, or one merchant to stall others.

Issue 19, findings 1, 2 and 8, on SQLite and on PostgreSQL, through settlement's HTTP API
with the real card emulator. Each scenario ends with the conservation check
(:func:`tests.proof.invariants.check_invariants`, which runs ``webpurse ledger check`` too)
and, where money moved to a merchant, the payout rule: a clearing batch pays out exactly
captures − refunds − top-ups.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.proof.conftest import Proof
from tests.proof.invariants import InvariantReport, check_invariants
from tests.settlement.support import BACKENDS, World, database_url, make_world
from webpurse.card import CardApplet

SUITE = "attacks_stuck"


@pytest.fixture(params=BACKENDS)
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    with database_url(str(request.param), tmp_path) as url, make_world(url) as w:
        yield w


def backend(world: World) -> str:
    return "PostgreSQL" if world.url.startswith("postgresql") else "SQLite"


def invariants(world: World, cards: list[CardApplet], *, settled: bool = True) -> InvariantReport:
    return check_invariants(world.factory, world.url, cards, settled=settled)


def post(
    world: World, path: str, body: dict[str, Any] | None = None, key: str | None = None
) -> Any:
    return world.client.post(path, json=body or {}, headers=world.auth(key or world.merchant_key))


# --- finding 8: a batch keeps its items' order ----------------------------------------


def test_a_batch_cancel_then_authorise_answers_as_one_by_one(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        f"batch [cancel P, authorise P] in one request ({backend(world)})",
        expected="cancel 200, authorise 409 invalid_payment_state — as the same calls one by one;"
        " no hold; ledger check ok",
    ) as row:
        card = world.funded_card(500)
        payment = world.terminal.create_payment(200)
        issuer, init = world.terminal.purchase_batch1(card, 200)
        answer = post(
            world,
            "/v1/batch",
            {
                "requests": [
                    {"path": f"/v1/payments/{payment['id']}/cancel", "body": None},
                    {
                        "path": f"/v1/payments/{payment['id']}/authorise",
                        "body": {
                            "issuer_data": issuer.hex(),
                            "initialize_response": init.hex(),
                            "terminal_id": world.terminal_id,
                        },
                    },
                ]
            },
        )
        assert answer.status_code == 200, answer.text
        cancel, authorise = answer.json()["responses"]
        assert (cancel["status"], cancel["body"]["status"]) == (200, "canceled")
        assert (authorise["status"], authorise["body"]["code"]) == (409, "invalid_payment_state")
        report = invariants(world, [card])
        row.observed = (
            f"cancel {cancel['status']} {cancel['body']['status']}, authorise"
            f" {authorise['status']} {authorise['body']['code']}; {report.summary()}"
        )
