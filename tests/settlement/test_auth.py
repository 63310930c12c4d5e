"""Every route in the OpenAPI schema refuses callers without valid credentials."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.settlement.support import World, make_world

PUBLIC = {("GET", "/health"), ("GET", "/openapi.json"), ("GET", "/docs")}


def _routes(world: World) -> list[tuple[str, str]]:
    schema = world.client.get("/openapi.json").json()
    routes = []
    for path, operations in schema["paths"].items():
        for method in operations:
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            routes.append((method.upper(), concrete))
    assert len(routes) > 20
    return routes


@pytest.fixture(scope="module")
def sqlite_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    path = tmp_path_factory.mktemp("auth") / "settlement.db"
    with make_world(f"sqlite:///{path}") as world:
        yield world


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer sk_mer_not-a-real-key", "Basic dXNlcjpwYXNz", "Bearer ", "sk_op_bare"],
)
def test_no_route_answers_without_valid_credentials(
    sqlite_world: World, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    for method, path in _routes(sqlite_world):
        if (method, path) in PUBLIC:
            continue
        answer = sqlite_world.client.request(method, path, headers=headers, json={})
        assert answer.status_code == 401, (method, path, answer.status_code, answer.text)
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert answer.json()["code"] == "unauthenticated"


def test_public_routes_answer_without_credentials(sqlite_world: World) -> None:
    for method, path in PUBLIC:
        assert sqlite_world.client.request(method, path).status_code == 200


def test_merchant_keys_cannot_use_operator_routes(sqlite_world: World) -> None:
    headers = sqlite_world.auth(sqlite_world.merchant_key)
    for method, path in [
        ("GET", "/metrics"),
        ("GET", "/v1/cards"),
        ("GET", "/v1/blacklist"),
        ("POST", "/v1/merchants"),
        ("POST", "/v1/maintenance/sweep"),
        ("GET", "/v1/ledger/check"),
    ]:
        answer = sqlite_world.client.request(method, path, headers=headers, json={"name": "x"})
        assert answer.status_code == 403, (method, path, answer.text)


def test_operator_keys_cannot_act_as_a_merchant(sqlite_world: World) -> None:
    answer = sqlite_world.client.post(
        "/v1/payments", json={"amount": 1}, headers=sqlite_world.auth(sqlite_world.operator_key)
    )
    assert answer.status_code == 403


def test_metrics_for_the_operator_and_request_ids_everywhere(sqlite_world: World) -> None:
    answer = sqlite_world.client.get(
        "/metrics",
        headers={**sqlite_world.auth(sqlite_world.operator_key), "x-request-id": "trace-42"},
    )
    assert answer.status_code == 200
    assert "webpurse_settlement_requests_total" in answer.text
    assert answer.headers["x-request-id"] == "trace-42"
    assert sqlite_world.client.get("/health").headers["x-request-id"].startswith("req_")


def test_new_merchants_get_their_key_once(sqlite_world: World) -> None:
    ops = sqlite_world.auth(sqlite_world.operator_key)
    created = sqlite_world.client.post("/v1/merchants", json={"name": "Shop C"}, headers=ops)
    assert created.status_code == 201
    key = created.json()["api_key"]
    assert key.startswith("sk_mer_")
    listed = sqlite_world.client.get("/v1/merchants", headers=ops).text
    assert key not in listed
    payment = sqlite_world.client.post(
        "/v1/payments", json={"amount": 5}, headers={"authorization": f"Bearer {key}"}
    )
    assert payment.status_code == 201
    assert payment.json()["terminal_id"] == created.json()["terminal_id"]


def test_unknown_paths_and_methods_are_problems_naming_the_allowed_methods(
    sqlite_world: World,
) -> None:
    missing = sqlite_world.client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("application/problem+json")
    wrong = sqlite_world.client.delete("/v1/payments")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "GET, POST"
