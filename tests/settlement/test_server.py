"""A real uvicorn process: full purchase and load over HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.settlement.support import Terminal, live_server


def test_purchase_and_load_through_a_real_server(migrated_db_url: str, tmp_path: Path) -> None:
    with (
        live_server(migrated_db_url, tmp_path) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as http,
    ):
        terminal = Terminal(http, server.merchant_key, server.terminal_id)
        card = server.issue()
        assert terminal.load(card, 3_000)["status"] == "succeeded"
        paid = terminal.purchase(card, 1_234)
        assert paid["status"] == "succeeded"
        assert card.state.balance == 3_000 - 1_234
        assert http.get("/docs").status_code == 200
        check = http.get(
            "/v1/ledger/check",
            headers=terminal.headers() | {"authorization": f"Bearer {server.operator_key}"},
        ).json()
        assert check["ok"], check["problems"]
        assert check["totals"]["card"] == card.state.balance
        unauthenticated = http.get(f"/v1/payments/{paid['id']}")
        assert unauthenticated.status_code == 401
        card_keys = {key.value.hex() for key in card.state.keys}
        answers = paid | {"docs": http.get("/openapi.json").text}
    log = (tmp_path / "server.log").read_text()
    assert '"event": "http.request"' in log and '"request_id"' in log
    for key in card_keys:  # keys are never logged nor returned
        assert key not in log.lower() and key not in str(answers).lower()
