"""``webpurse settlement float|statement …``: what an operator runs for funding (issue 12)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from tests.settlement.support import statement_csv
from webpurse.cli import app
from webpurse.settlement import ledger
from webpurse.settlement.auth import MERCHANT, Principal
from webpurse.settlement.db import make_engine, make_session_factory
from webpurse.settlement.funding import FundingPolicy
from webpurse.settlement.load_orders import create_transfer_order
from webpurse.settlement.models import Load
from webpurse.settlement.service import Ctx

CARD = "00" * 9 + "42"  # issued with this serial, the card number is the same


def test_deposit_import_list_and_return_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("WEBPURSE_DATA_DIR", str(data))
    for name in ("WEBPURSE_DATABASE_URL", "WEBPURSE_KEK", "WEBPURSE_KEK_FILE"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    assert runner.invoke(app, ["settlement", "init"]).exit_code == 0
    merchant = json.loads(
        runner.invoke(app, ["settlement", "merchant", "create", "Tea House", "--json"]).output
    )["id"]

    deposit = ["settlement", "float", "deposit", merchant, "50000", "--bank-reference", "B-1"]
    first = runner.invoke(app, [*deposit, "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["float"]["balance"] == 50_000
    again = runner.invoke(app, deposit)
    assert again.exit_code == 0 and "already recorded" in again.output
    conflict = runner.invoke(
        app, ["settlement", "float", "deposit", merchant, "1", "--bank-reference", "B-1"]
    )
    assert conflict.exit_code == 2 and "deposit_conflict" in conflict.output
    shown = runner.invoke(app, ["settlement", "float", "show", merchant])
    assert json.loads(shown.output)["balance"] == 50_000

    issued = runner.invoke(
        app, ["settlement", "card", "issue", str(tmp_path / "card.json"), "--serial", CARD]
    )
    assert issued.exit_code == 0, issued.output
    engine = make_engine(f"sqlite:///{data / 'settlement.db'}")
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        ctx = Ctx(session, None, dt.datetime.now(dt.UTC), Principal(MERCHANT, "key_x", merchant))  # type: ignore[arg-type]
        order = create_transfer_order(
            ctx,
            amount=2_000,
            currency="CNY",
            card_number=CARD,
            ttl=FundingPolicy().bank_transfer_ttl,
        )
        reference, load_id = order.funding_reference, order.id
    statement = tmp_path / "statement.csv"
    statement.write_text(statement_csv(1, [(reference, 2_000), ("who?", 300)]))
    imported = runner.invoke(
        app, ["settlement", "statement", "import", str(statement), "--format", "csv"]
    )
    assert imported.exit_code == 0, imported.output
    summary = json.loads(imported.output)
    assert [m["load"] for m in summary["matched"]] == [load_id] and summary["created"]
    twice = runner.invoke(
        app, ["settlement", "statement", "import", str(statement), "--format", "csv"]
    )
    assert json.loads(twice.output)["created"] is False
    bad = tmp_path / "bad.csv"
    bad.write_text(statement_csv(1, [("x", 1)], account="ELSEWHERE"))
    refused = runner.invoke(app, ["settlement", "statement", "import", str(bad), "--format", "csv"])
    assert refused.exit_code == 2 and "statement_wrong_account" in refused.output

    listed = runner.invoke(app, ["settlement", "statement", "exceptions"])
    (exception,) = [json.loads(line) for line in listed.output.splitlines()]
    assert (exception["kind"], exception["amount"]) == ("unmatched", 300)
    returned = runner.invoke(app, ["settlement", "statement", "return", exception["id"], "OUT-7"])
    assert json.loads(returned.output)["status"] == "returned"

    with factory() as session:
        assert session.scalars(select(Load)).one().status == "requires_card"
        assert ledger.balance(session, ledger.RETURNED_PAYERS) == 300
    engine.dispose()
    checked = runner.invoke(app, ["ledger", "check"])
    assert checked.exit_code == 0 and "ledger consistent" in checked.output
    assert "received" in checked.output and "returned" in checked.output
