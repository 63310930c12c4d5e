"""A broken connection to settlement is retried with the same Idempotency-Key, never guessed."""

from __future__ import annotations

import httpx
import pytest

from webpurse.merchant import settlement as client_module
from webpurse.merchant.settlement import Kind, SettlementClient, SettlementError

PAYMENT = {
    "id": "pay_1",
    "object": "payment",
    "status": "requires_card",
    "amount": 350,
    "currency": "CNY",
    "terminal_id": "000000000001",
    "key_index": 1,
}


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "RETRY_PAUSES", (0, 0, 0))


def client_failing(
    times: int, error: type[httpx.TransportError]
) -> tuple[SettlementClient, list[str]]:
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) <= times:
            raise error("connection closed by peer", request=request)
        return httpx.Response(201, json=PAYMENT)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://settlement")
    return SettlementClient(http, "sk_mer_test"), keys


@pytest.mark.parametrize("error", [httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError])
async def test_a_dropped_connection_is_retried_with_the_same_key(
    error: type[httpx.TransportError],
) -> None:
    client, keys = client_failing(2, error)
    payment = await client.create(Kind.PAYMENT, 350, description="tea", reference="ord_1")
    assert payment.id == "pay_1"
    assert len(keys) == 3 and len(set(keys)) == 1  # one logical request, one key


async def test_after_the_last_attempt_the_outcome_is_reported_unknown() -> None:
    client, keys = client_failing(10, httpx.ReadError)
    with pytest.raises(SettlementError, match="unreachable"):
        await client.create(Kind.PAYMENT, 350, description="tea", reference="ord_1")
    assert len(keys) == 4 and len(set(keys)) == 1


async def test_an_in_flight_answer_to_a_retry_is_waited_out() -> None:
    answers = iter(
        [
            httpx.ReadError("lost"),
            httpx.Response(409, json={"code": "idempotency_in_flight"}),
            httpx.Response(201, json=PAYMENT),
        ]
    )
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://settlement")
    payment = await SettlementClient(http, "k").create(
        Kind.PAYMENT, 350, description="tea", reference="ord_1"
    )
    assert payment.status == "requires_card" and len(set(keys)) == 1 and len(keys) == 3
