"""Schemathesis against the settlement server's own OpenAPI schema, with real credentials.

Every operation of the schema is called with generated bodies, paths and queries (valid
ones and, in negative mode, deliberately broken ones) over HTTP against a real
``webpurse serve settlement`` process (uvicorn) on a migrated SQLite database that holds
real objects (a funded card, a paid payment, an open payment and load). The
merchant's key goes to merchant routes, the operator's to operator routes. What a merchant
relies on: no request, however odd, gets a 5xx, and every answer (status, content type,
body) is one the schema declares. Bounded and deterministic: a few examples per operation,
``derandomize=True``.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config import SchemathesisConfig

from tests.proof.proof_table import Row, record
from tests.settlement.support import LiveServer, Terminal, live_server
from webpurse.settlement.app import create_app
from webpurse.settlement.settings import Settings

EXAMPLES_PER_OPERATION = 20

# Operator-only routes (docs/settlement-api.md "Operator routes"); the rest take a merchant key.
_OPERATOR_PREFIXES = (
    "/metrics",
    "/v1/merchants",
    "/v1/cards",
    "/v1/blacklist",
    "/v1/maintenance",
    "/v1/ledger",
)


def role_of(method: str, path: str) -> str:
    if path.startswith(_OPERATOR_PREFIXES) or (method, path) == ("POST", "/v1/clearing/batches"):
        return "operator"
    return "merchant"


def _openapi() -> dict[str, Any]:
    """The schema the server publishes, built without a database (nothing connects)."""
    settings = Settings(database_url="sqlite://", kek=bytes(32), webhook_worker=False)
    return create_app(settings, security=object()).openapi()


# A request the schema allows may still be refused for a reason no JSON schema can state:
# a decline (402), card data of the wrong length or an unknown event type (400), an
# Idempotency-Key reused with another body (422, docs/settlement-api.md "Idempotency"). Those
# are problem+json answers the schema declares; a 5xx never is.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {
                "expected-statuses": ["2XX", "400", "401", "402", "403", "404", "409", "422"]
            }
        }
    }
)

# Built at import: pytest 9 and schemathesis' lazy fixture loader do not get along.
schema = schemathesis.openapi.from_dict(_openapi(), config=CONFIG)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder: Path = tmp_path_factory.mktemp("fuzz")
    with (
        live_server(f"sqlite:///{folder / 'settlement.db'}", folder) as live,
        httpx.Client(base_url=live.base_url, timeout=30) as http,
    ):
        terminal = Terminal(http, live.merchant_key, live.terminal_id)
        card = live.issue()
        terminal.load(card, 5_000)
        paid = terminal.purchase(card, 1_000)
        held, _ = _authorised(terminal, card, 200)
        open_payment = terminal.create_payment(300)
        load = terminal.create_load(200)
        refund = terminal.post("/v1/refunds", {"payment": paid["id"], "amount": 100}).json()
        endpoint = terminal.post(
            "/v1/webhook_endpoints", {"url": "http://127.0.0.1:9/hook", "events": ["*"]}
        ).json()
        events = http.get("/v1/events", headers=terminal.headers()).json()["data"]
        REAL_IDS.update(
            payment_id=[paid["id"], held["id"], open_payment["id"]],
            load_id=[load["id"], refund["load"]],
            refund_id=[refund["id"]],
            card_number=[card.state.issuer.card_number],
            endpoint_id=[endpoint["id"]],
            event_id=[e["id"] for e in events[:3]],
        )
        started = time.perf_counter()
        yield live
        _record_rows(time.perf_counter() - started)


def _authorised(terminal: Terminal, card: Any, amount: int) -> tuple[dict[str, Any], bytes]:
    payment = terminal.create_payment(amount)
    issuer, init = terminal.purchase_batch1(card, amount)
    answer = terminal.authorise_payment(payment["id"], issuer, init)
    assert answer.status_code == 200, answer.text
    return answer.json(), bytes.fromhex(answer.json()["authorisation"]["debit_apdu"])


# Ids of real objects, by path parameter name: about half the generated cases aim at one of
# them instead of a made-up id, so the fuzz reaches past "404 no such payment" into the
# state machine (capture, resolve, cancel … of real payments and loads).
REAL_IDS: dict[str, list[str]] = {}


def aim_at_real_objects(case: Any) -> None:
    for name, value in list((case.path_parameters or {}).items()):
        real = REAL_IDS.get(name)
        text = str(value)
        if real and len(text) % 2 == 0:
            case.path_parameters[name] = real[len(text) // 2 % len(real)]


# Per operation: the statuses answered, and the first failure (if any) — one proof row each.
_STATUSES: dict[str, Counter[int]] = defaultdict(Counter)
_FAILURES: dict[str, str] = {}


def _record_rows(seconds: float) -> None:
    for label in sorted(_STATUSES):
        statuses = _STATUSES[label]
        failure = _FAILURES.get(label)
        spread = ", ".join(f"{status}×{n}" for status, n in sorted(statuses.items()))
        record(
            Row(
                suite="fuzz",
                scenario=f"schemathesis {label}",
                expected="no 5xx; status, content type and body as the schema declares",
                observed=failure or f"{sum(statuses.values())} requests: {spread}",
                passed=failure is None,
                seconds=round(seconds / max(len(_STATUSES), 1), 3),
            )
        )


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_every_answer_matches_the_schema(case: Any, server: LiveServer) -> None:
    label = case.operation.label
    role = role_of(case.operation.method.upper(), case.operation.path)
    key = server.operator_key if role == "operator" else server.merchant_key
    aim_at_real_objects(case)
    try:
        response = case.call_and_validate(
            base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}
        )
        assert response.status_code < 500
    except BaseException as exc:
        _FAILURES.setdefault(label, f"FAILED: {str(exc).strip().splitlines()[0][:200]}")
        raise
    _STATUSES[label][response.status_code] += 1
