"""``webpurse settlement …`` and ``webpurse ledger check`` as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from webpurse.cli import app
from webpurse.settlement.db import make_engine


def test_init_merchant_card_and_ledger_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    monkeypatch.setenv("WEBPURSE_DATA_DIR", str(data))
    monkeypatch.delenv("WEBPURSE_DATABASE_URL", raising=False)
    monkeypatch.delenv("WEBPURSE_KEK", raising=False)
    monkeypatch.delenv("WEBPURSE_KEK_FILE", raising=False)
    monkeypatch.delenv("WEBPURSE_KEK_IN_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    runner = CliRunner()
    first = runner.invoke(app, ["settlement", "init"])
    assert first.exit_code == 0, first.output
    # The KEK is kept outside the data folder: a backup of data/ does not open the keys.
    assert (tmp_path / "config" / "webpurse" / "kek.key").stat().st_mode & 0o777 == 0o600
    assert not (data / "kek.key").exists()
    assert (data / "settlement.db").stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["settlement", "init"])
    assert again.exit_code == 0 and "master keys present" in again.output

    merchant = runner.invoke(app, ["settlement", "merchant", "create", "Tea House", "--json"])
    assert merchant.exit_code == 0, merchant.output
    assert json.loads(merchant.output)["api_key"].startswith("sk_mer_")

    image = tmp_path / "card.json"
    issued = runner.invoke(
        app, ["settlement", "card", "issue", str(image), "--serial", "00" * 9 + "42"]
    )
    assert issued.exit_code == 0, issued.output
    assert "0000000000000000" in issued.output and image.exists()
    twice = runner.invoke(
        app, ["settlement", "card", "issue", str(tmp_path / "b.json"), "--serial", "00" * 9 + "42"]
    )
    assert twice.exit_code == 2 and "already registered" in twice.output

    number = "00" * 9 + "42"
    blocked = runner.invoke(
        app, ["settlement", "card", "status", number, "lost", "--reason", "phone call"]
    )
    assert blocked.exit_code == 0 and "now lost" in blocked.output
    bad = runner.invoke(app, ["settlement", "card", "status", number, "stolen"])
    assert bad.exit_code == 2 and "status must be one of" in bad.output

    checked = runner.invoke(app, ["ledger", "check"])
    assert checked.exit_code == 0 and "ledger consistent" in checked.output

    engine = make_engine(f"sqlite:///{data / 'settlement.db'}")
    with engine.begin() as connection:
        connection.execute(text("UPDATE ledger_accounts SET balance = balance + 1"))
    engine.dispose()
    broken = runner.invoke(app, ["ledger", "check"])
    assert broken.exit_code == 1


def test_a_wrong_kek_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBPURSE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("WEBPURSE_DATABASE_URL", raising=False)
    monkeypatch.delenv("WEBPURSE_KEK_FILE", raising=False)
    monkeypatch.setenv("WEBPURSE_KEK", "11" * 32)
    runner = CliRunner()
    assert runner.invoke(app, ["settlement", "init"]).exit_code == 0
    monkeypatch.setenv("WEBPURSE_KEK", "22" * 32)
    refused = runner.invoke(app, ["settlement", "card", "issue", str(tmp_path / "c.json")])
    assert refused.exit_code == 2 and "wrong key-encryption key" in refused.output
