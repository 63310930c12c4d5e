"""The batch route's edge: what it reads off the items and how it answers (issue 20).

The shortcuts taken for speed must give exactly what the general path gives.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from webpurse.settlement import batch
from webpurse.settlement.schemas import BatchItemIn

HEX30 = "00" * 30
BODIES: list[tuple[str, dict[str, Any] | None]] = [
    ("/v1/payments", {"amount": 5}),
    (
        "/v1/payments",
        {
            "amount": 4294967295,
            "currency": "CNY",
            "description": 'caf\u00e9 \u4e2d\u6587 \x7f "q" \\',
            "merchant_reference": "r-1",
            "metadata": {"b": "2", "a": "\u00e9"},
        },
    ),
    (
        "/v1/payments/pay_1/authorise",
        {"issuer_data": HEX30, "initialize_response": "AB" * 15, "terminal_id": "0A0B0C0D0E0F"},
    ),
    (
        "/v1/payments/pay_1/authorise",
        {"issuer_data": "", "initialize_response": "", "terminal_id": "000000000000", "amount": 9},
    ),
    ("/v1/payments/pay_1/capture", {"debit_response": "0011223344556677"}),
    ("/v1/payments/pay_1/uncertain", None),
    ("/v1/payments/pay_1/uncertain", {}),
    ("/v1/payments/pay_1/cancel", None),
    ("/v1/payments/pay_1/cancel", {}),
    ("/v1/payments/pay_1/cancel", {"card_status_word": "9303"}),
    ("/v1/payments/pay_1/cancel", {"issuer_data": HEX30, "card_status_word": None}),
    ("/v1/payments/pay_1/resolve", {"initialize_response": "00" * 15}),
    (
        "/v1/payments/pay_1/resolve",
        {"initialize_response": "00", "prove_response": "11" * 8, "issuer_data": HEX30},
    ),
]


def _general(item: batch.Item) -> Any:
    """The payload as the single endpoints make it (routes_transactions: model_dump)."""
    if item.action == "uncertain" or item.body is None:
        return {}
    if item.action == "cancel":
        return item.body.model_dump(mode="json", exclude_none=True)
    return item.body.model_dump(mode="json")


@pytest.mark.parametrize(("path", "body"), BODIES)
def test_an_items_payload_is_what_model_dump_gives(path: str, body: dict[str, Any] | None) -> None:
    item = batch.parse_item(0, BatchItemIn(path=path, body=body), "req_1")
    assert item.answer is None, item.answer
    assert item.payload == _general(item)
    assert list(item.payload) == list(_general(item))  # the same order of keys too
    assert item.body is None or type(item.body) in batch._NATIVE


def test_every_batch_schema_is_read_directly() -> None:
    assert set(batch._SCHEMAS.values()) == batch._NATIVE


def test_a_schema_with_a_field_json_mode_changes_is_dumped() -> None:
    class Later(BaseModel):
        model_config = ConfigDict(extra="forbid")
        at: dt.datetime

    class Ratio(BaseModel):
        model_config = ConfigDict(extra="forbid")
        share: float | None

    class Open(BaseModel):
        name: str

    assert not batch._json_native(dt.datetime)
    assert not batch._json_native(float | None)
    assert not batch._json_native(dict[str, float])
    assert batch._json_native(dict[str, list[int | None]])
    item = batch.Item(0, "/v1/payments", "create", None, Later(at=dt.datetime(2026, 1, 2)), None)
    assert item.payload == {"at": "2026-01-02T00:00:00"}
    assert type(Ratio(share=0.5)) not in batch._NATIVE and type(Open(name="x")) not in batch._NATIVE


@pytest.mark.parametrize(
    "raw",
    [
        [],
        [(b"content-type", b"application/json")],
        [(b"x-request-id", b"mine"), (b"content-length", b"2")],
        [(b"a", b"1"), (b"x-request-id", b"one"), (b"b", b"2"), (b"x-request-id", b"two")],
    ],
)
def test_the_request_id_is_echoed_as_starlette_set_it(raw: list[tuple[bytes, bytes]]) -> None:
    from starlette.datastructures import MutableHeaders

    from webpurse.settlement.app import _echo

    expected = MutableHeaders(raw=list(raw))
    expected["X-Request-Id"] = "req_1"
    assert _echo(list(raw), b"req_1") == expected.raw


def test_the_request_context_is_pure_asgi() -> None:
    from starlette.middleware.base import BaseHTTPMiddleware

    from webpurse.settlement.app import RequestContext, create_app
    from webpurse.settlement.settings import Settings

    app = create_app(Settings(database_url="sqlite://", migrate=False), security=object())
    kinds = [m.cls for m in app.user_middleware]
    assert RequestContext in kinds and BaseHTTPMiddleware not in kinds


def test_serving_collects_the_young_generation_past_a_batchs_working_set() -> None:
    import gc

    from webpurse.settlement import app

    app._freeze_startup_objects()
    assert gc.get_threshold()[0] == app.GC_YOUNG
