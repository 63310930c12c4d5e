"""Attacks found trying as an attacker would (issue 13, point 3), each refused.

Session fixation in the shop, world-readable data files, a KEK beside the data it
protects, decline details that leak the shadow counter, one network locking everyone out
of code pairing, and a public map of settlement's routes. Real components each time: the
shop app (ASGI), the settlement app and CLI, the SQLite files on disk, the hub's
``CodeLimiter``. Rows go to the ``attacks_hardening`` proof table.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.asgi import AppClient
from tests.merchant.fakes import FakeSettlement
from tests.proof.conftest import Proof
from tests.settlement.support import World, database_url, make_world
from webpurse.cli import app as cli
from webpurse.merchant.app import create_app as create_shop
from webpurse.merchant.orders import OrderBook
from webpurse.merchant.orders import make_engine as shop_engine
from webpurse.merchant.readers import LocalBroker
from webpurse.merchant.settings import MerchantSettings
from webpurse.protocol.commands import InitializeForPurchaseResponse
from webpurse.reader.remote import CODE_ATTEMPTS, CodeLimiter
from webpurse.reader.sim import SimReader
from webpurse.settlement.app import create_app
from webpurse.settlement.db import make_engine, migrate
from webpurse.settlement.settings import Settings

SUITE = "attacks_hardening"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with database_url("sqlite", tmp_path, migrated=True) as url, make_world(url) as w:
        yield w


async def test_a_planted_session_id_is_not_adopted(tmp_path: Path, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "shop session fixation: plant a well-formed wp_sid in the victim's browser, let the"
        " victim check out, read the victim's order with that id",
        expected="the shop issues its own signed id; the planted one sees 404",
    ) as row:
        settings = MerchantSettings(data_dir=tmp_path, cookie_secret=b"s" * 32)
        shop = create_shop(settings, settlement=FakeSettlement(), broker=LocalBroker(SimReader()))
        transport = httpx.ASGITransport(app=shop)
        planted = "planted-by-the-attacker-0123456789"
        async with (
            httpx.AsyncClient(transport=transport, base_url="https://shop.test") as victim,
            httpx.AsyncClient(transport=transport, base_url="https://shop.test") as attacker,
        ):
            victim.cookies.set("wp_sid", planted, domain="shop.test")
            await victim.post("/cart/add", data={"product": "tea", "quantity": "1"})
            opened = await victim.post("/checkout")
            assert opened.status_code == 303
            order = opened.headers["location"].split("/")[2]
            issued = [c for c in opened.headers.get_list("set-cookie") if c.startswith("wp_sid=")]
            assert issued and planted not in issued[0]
            assert "secure" in issued[0].lower() and "httponly" in issued[0].lower()
            attacker.cookies.set("wp_sid", planted, domain="shop.test")
            assert (await attacker.get(f"/orders/{order}")).status_code == 404
            assert (await victim.get(f"/orders/{order}")).status_code == 200
        await shop.state.cashier.close()
        row.observed = "new signed id issued (Secure, HttpOnly, SameSite=Lax); planted id 404"


def test_data_files_are_created_owner_only(tmp_path: Path, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "another local user reads settlement.db / orders.db and their -wal/-shm files"
        " (created under umask 022)",
        expected="every file 0600",
    ) as row:
        old = os.umask(0o022)
        try:
            settlement = make_engine(f"sqlite:///{tmp_path / 'settlement.db'}")
            migrate(settlement)
            with settlement.connect() as connection:  # WAL and SHM exist while open
                connection.exec_driver_sql("SELECT 1")
                shop = shop_engine(f"sqlite:///{tmp_path / 'orders.db'}")
                OrderBook(shop).create(session_id="s" * 20, kind="topup", amount=100)
                with shop.connect() as shop_connection:
                    shop_connection.exec_driver_sql("SELECT 1")
                    files = sorted(p for p in tmp_path.iterdir() if ".db" in p.name)
                    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
            settlement.dispose()
            shop.dispose()
        finally:
            os.umask(old)
        assert {"settlement.db-wal", "settlement.db-shm", "orders.db-wal"} <= set(modes)
        assert set(modes.values()) == {"0o600"}, modes
        row.observed = f"{len(modes)} files, all 0600"


def test_the_kek_is_not_kept_in_the_data_folder(
    tmp_path: Path, proof: Proof, monkeypatch: pytest.MonkeyPatch
) -> None:
    with proof.row(
        SUITE,
        "steal one backup of data/ (settlement.db) and open the master keys with the KEK beside it",
        expected="init keeps the KEK in the user config dir (0600), none in data/; a KEK file"
        " inside data/ is refused unless WEBPURSE_KEK_IN_DATA_DIR=1",
    ) as row:
        data = tmp_path / "data"
        for name in ("WEBPURSE_KEK", "WEBPURSE_KEK_FILE", "WEBPURSE_DATABASE_URL"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv("WEBPURSE_KEK_IN_DATA_DIR", raising=False)
        monkeypatch.setenv("WEBPURSE_DATA_DIR", str(data))
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
        done = CliRunner().invoke(cli, ["settlement", "init"])
        assert done.exit_code == 0, done.output
        assert sorted(p.name for p in data.iterdir() if "kek" in p.name) == []
        kek = tmp_path / "config" / "webpurse" / "kek.key"
        assert kek.stat().st_mode & 0o777 == 0o600
        monkeypatch.setenv("WEBPURSE_KEK_FILE", str(data / "kek.key"))
        refused = CliRunner().invoke(cli, ["settlement", "init"])
        assert refused.exit_code != 0 and "inside the data folder" in refused.output
        row.observed = "KEK in config dir 0600, data/ has none; a KEK inside data/ refused"


def test_a_decline_does_not_tell_the_shadow_counter_or_balance(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "probe a card's shadow counter and balance through decline details (wrong counter,"
        " then a balance above, then below)",
        expected="402 counter_mismatch / balance_mismatch; the detail names what failed, not"
        " the number nor the direction",
    ) as row:
        card = world.funded_card(4_321)
        for _ in range(3):
            world.terminal.purchase(card, 7)  # shadow: counter 3, balance 4300
        details = []
        for fields in ({"offline_counter": 1}, {"balance": 9_999}, {"balance": 1}):
            payment = world.terminal.create_payment(7)
            issuer, init = world.terminal.purchase_batch1(card, 7)
            doctored = replace(InitializeForPurchaseResponse.from_data(init), **fields)
            answer = world.terminal.authorise_payment(payment["id"], issuer, doctored.to_data())
            assert answer.status_code == 402
            details.append(answer.json()["detail"])
        text = " ".join(details)
        assert "3" not in text and "4300" not in text and "4321" not in text
        assert not {"behind", "ahead", "above", "below"} & set(text.split())
        assert len(set(details[1:])) == 1  # above and below read the same
        row.observed = "402 ×3; details name only the field that did not match"


def test_one_network_flooding_codes_does_not_lock_out_another(proof: Proof) -> None:
    with proof.row(
        SUITE,
        "flood code pairing from one IPv6 /64 (a fresh address per guess) and from one /48 (a"
        " fresh /64 per guess), 20 000 guesses each",
        expected="each network refused after its budget; the table never fills; another"
        " client (IPv4, another /64) may still pair by code; a table filled by many sites"
        " locks nobody out (each code is retired after CODE_GUESS_BUDGET wrong codes)",
    ) as row:
        limiter = CodeLimiter(max_clients=10_000)
        for network in ("2001:db8:1:2::{:x}", "2001:db8:7:{:x}::1"):
            tried = 0
            for n in range(20_000):
                host = network.format(n)
                if limiter.allows(host):
                    tried += 1
                    limiter.failed(host)
            assert tried <= 100, tried
        assert len(limiter) <= 1 + 100
        assert limiter.allows("192.0.2.44") and limiter.allows("2001:db8:99:1::5")
        for _ in range(CODE_ATTEMPTS):
            limiter.failed("192.0.2.44")
        assert not limiter.allows("192.0.2.44")  # and its own limit still holds
        # Many sites together fill a small table: still nobody else is locked out; each
        # open pairing's code is retired after CODE_GUESS_BUDGET wrong codes instead.
        small = CodeLimiter(max_clients=50)
        for site in range(200):
            small.failed(f"2001:db8:{site:x}::1")
        assert len(small) == 50 and small.allows("198.51.100.9")
        assert small.wrong_codes == 200
        row.observed = (
            f"{len(limiter)} networks remembered; other clients allowed; a full table locks"
            " nobody out"
        )


def test_settlement_route_map_is_not_public_unless_configured(tmp_path: Path, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "read settlement's /docs and /openapi.json without a key (serve's default settings)",
        expected="404 for both; /health 200; both 200 when WEBPURSE_PUBLIC_DOCS=1 (the demo)",
    ) as row:
        url = f"sqlite:///{tmp_path / 'settlement.db'}"
        for public, want in ((False, 404), (True, 200)):
            settings = replace(
                Settings.from_env({"WEBPURSE_DATABASE_URL": url}, migrate=True),
                kek=b"k" * 32,
                public_docs=public,
                webhook_worker=False,
                sweep_interval=0.0,
            )
            with AppClient(create_app(settings, security=object())) as client:
                assert client.get("/docs").status_code == want
                assert client.get("/openapi.json").status_code == want
                assert client.get("/health").status_code == 200
        assert not Settings.from_env({}).public_docs
        assert Settings.from_env({"WEBPURSE_PUBLIC_DOCS": "1"}).public_docs
        row.observed = "default: /docs 404, /openapi.json 404, /health 200; flag on: 200"
