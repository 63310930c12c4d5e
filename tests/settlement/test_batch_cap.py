"""The open-orders cap in a batch: the fast path reads the merchant and its room in one
statement (batch._merchant), and past the cap its creates take the per-item path."""

from __future__ import annotations

import dataclasses

from tests.settlement.support import World


def _creates(world: World, count: int) -> list[int]:
    answer = world.client.post(
        "/v1/batch",
        json={"requests": [{"path": "/v1/payments", "body": {"amount": 1}}] * count},
        headers=world.auth(world.merchant_key),
    )
    assert answer.status_code == 200, answer.text
    return [item["status"] for item in answer.json()["responses"]]


def test_a_batch_creates_up_to_the_cap_and_refuses_past_it(world: World) -> None:
    state = world.client.app.state.settlement  # type: ignore[attr-defined]
    state.settings = dataclasses.replace(world.settings, max_open_orders=3)
    assert _creates(world, 2) == [201, 201]  # room 3: the fast path
    assert _creates(world, 2) == [201, 429]  # room 1: per item, the second refused
    assert _creates(world, 1) == [429]  # room 0
    state.settings = dataclasses.replace(world.settings, max_open_orders=4)
    assert _creates(world, 1) == [201]  # room again under a higher cap
