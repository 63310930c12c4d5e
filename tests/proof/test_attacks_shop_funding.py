"""Attacks on the shop's top-up (issue 12): value is never created by the shop.

The shop (``webpurse.merchant``) runs in process against the real settlement app over a
migrated SQLite database (``tests.settlement.support.make_world``: the merchant's float
seeded with a recorded deposit), with a card issued by settlement's security module in a
SimReader. Each scenario checks what matters to the money: no load at settlement, no
ledger entry, the card's balance unchanged, and ``ledger.check`` still consistent.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher
from sqlalchemy import func, select

from tests.proof.conftest import Proof
from tests.settlement.support import World, make_world, pay_by_statement
from webpurse.merchant.app import create_app
from webpurse.merchant.readers import LocalBroker
from webpurse.merchant.security import make_link
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import SettlementClient
from webpurse.reader.sim import SimReader
from webpurse.settlement import ledger
from webpurse.settlement.models import Entry, Load

SUITE = "attacks_shop_funding"
SECRET = b"s" * 32
PASSWORD = "till password 1"
FAST = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


@dataclass
class Rig:
    world: World
    shop: httpx.AsyncClient
    app: Any
    reader: SimReader

    @property
    def balance(self) -> int:
        assert self.reader.card is not None
        return self.reader.card.state.balance

    def books(self) -> tuple[int, int]:
        """(loads at settlement, ledger entries): what value creation would change."""
        with self.world.factory() as session:
            loads = session.scalar(select(func.count()).select_from(Load)) or 0
            entries = session.scalar(select(func.count()).select_from(Entry)) or 0
        return loads, entries

    def ledger_ok(self) -> None:
        with self.world.factory() as session:
            report = ledger.check(session)
        assert report.ok, report.problems


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with make_world(f"sqlite:///{tmp_path / 'settlement.db'}", float_fen=10_000) as w:
        yield w


@pytest.fixture
async def rig(world: World, tmp_path: Path) -> AsyncIterator[Rig]:
    transport = httpx.ASGITransport(app=world.client.app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://settlement") as http,
        SimReader(world.issue()) as reader,
    ):
        settings = MerchantSettings(data_dir=tmp_path, cookie_secret=SECRET)
        app = create_app(
            settings,
            settlement=SettlementClient(http, world.merchant_key),
            broker=LocalBroker(reader),
            password_hasher=FAST,
        )
        app.state.till.staff.add("mei", PASSWORD)
        shop_transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=shop_transport, base_url="http://shop") as shop:
            yield Rig(world, shop, app, reader)
        await app.state.cashier.close()


def csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match
    return match.group(1)


async def signed_in(shop: httpx.AsyncClient) -> str:
    page = await shop.get("/staff/signin")
    r = await shop.post(
        "/staff/signin", data={"name": "mei", "password": PASSWORD, "csrf": csrf(page.text)}
    )
    assert r.status_code == 303
    return csrf((await shop.get("/staff")).text)


async def test_an_anonymous_top_up_creates_no_load_and_no_value(rig: Rig, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "shop: anonymous POST /topup {amount} (the old free top-up), repeated",
        expected="422, logged; no load at settlement, no ledger entry, card unchanged",
    ) as row:
        before, card = rig.books(), rig.balance
        for data in ({"amount": "20000"}, {"amount": "20000", "method": "cash"}):
            for _ in range(3):
                answer = await rig.shop.post("/topup", data=data)
                assert answer.status_code in (422, 303)
        assert rig.books() == before and rig.balance == card
        assert rig.app.state.orders.count() == 0
        rig.ledger_ok()
        row.observed = f"422/303 x6; loads, entries {before} → {rig.books()}; card {card}"


async def test_an_unpaid_bank_transfer_order_holds_no_value(rig: Rig, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "shop: online top-up ordered but never paid",
        expected="load requires_funding, no ledger entry; the page cannot load it; card unchanged",
    ) as row:
        _, entries = rig.books()
        card_number = rig.reader.card.state.serial.hex().upper()  # type: ignore[union-attr]
        answer = await rig.shop.post(
            "/topup",
            data={"amount": "20000", "method": "bank_transfer", "card_number": card_number},
        )
        assert answer.status_code == 303
        order_id = answer.headers["location"].split("/")[2]
        status = (await rig.shop.get(f"/orders/{order_id}/status")).json()
        assert status["settlement_status"] == "requires_funding"
        assert status["payment_reference"].startswith("RF")
        pay = await rig.shop.get(f"/orders/{order_id}/pay")
        assert pay.status_code == 303 and pay.headers["location"].endswith("/transfer")
        assert (await rig.shop.post(f"/orders/{order_id}/pairing")).status_code == 409
        assert rig.books()[1] == entries and rig.balance == 0
        rig.ledger_ok()
        row.observed = (
            f"load {status['settlement_id']} requires_funding ({status['payment_reference']}); "
            f"ledger entries {entries} → {rig.books()[1]}; /pay → /transfer; card ¥0"
        )


async def test_a_paid_bank_transfer_loads_exactly_once_onto_its_card(
    rig: Rig, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "shop: online top-up paid by a matched statement line",
        expected="loaded once onto the bound card; a second visit loads nothing more; ledger ok",
    ) as row:
        card_number = rig.reader.card.state.serial.hex().upper()  # type: ignore[union-attr]
        answer = await rig.shop.post(
            "/topup",
            data={"amount": "5000", "method": "bank_transfer", "card_number": card_number},
        )
        order_id = answer.headers["location"].split("/")[2]
        reference = (await rig.shop.get(f"/orders/{order_id}/status")).json()["payment_reference"]
        summary = pay_by_statement(rig.world, [(f"top-up {reference}", 5000)])
        assert len(summary["matched"]) == 1, summary
        assert (await rig.shop.get(f"/orders/{order_id}/pay")).status_code == 200
        task = rig.app.state.cashier.task(order_id)
        assert task is not None
        await task
        status = (await rig.shop.get(f"/orders/{order_id}/status")).json()
        assert status["status"] == "loaded" and rig.balance == 5000
        again = await rig.shop.get(f"/orders/{order_id}/pay")
        assert again.status_code == 303 and rig.balance == 5000
        rig.ledger_ok()
        row.observed = f"loaded {status['settlement_id']}; card ¥50.00 after two visits; ledger ok"


async def test_staff_posts_without_session_or_csrf_token_change_nothing(
    rig: Rig, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "shop till: cash top-up POST without a session, or without its CSRF token",
        expected="403, logged; no order, no load, float and card unchanged",
    ) as row:
        before, card = rig.books(), rig.balance
        assert (await rig.shop.post("/staff/topups", data={"cash": "50"})).status_code == 403
        await signed_in(rig.shop)
        assert (await rig.shop.post("/staff/topups", data={"cash": "50"})).status_code == 403
        forged = {"cash": "50", "csrf": "A" * 43}
        assert (await rig.shop.post("/staff/topups", data=forged)).status_code == 403
        assert rig.books() == before and rig.balance == card
        assert rig.app.state.orders.count() == 0
        row.observed = f"403 x3; loads, entries {before} → {rig.books()}"


async def test_a_till_top_up_beyond_the_float_is_refused(rig: Rig, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "shop till: cash top-up above the merchant's float (¥100)",
        expected="409 insufficient_float shown to staff; nothing loaded; ledger ok",
    ) as row:
        token = await signed_in(rig.shop)
        before = rig.books()
        answer = await rig.shop.post("/staff/topups", data={"cash": "100.01", "csrf": token})
        assert answer.status_code == 409 and "hand the cash back" in answer.text
        assert rig.books()[1] == before[1] and rig.balance == 0
        rig.ledger_ok()
        row.observed = f"409; ledger entries {before[1]} → {rig.books()[1]}; card ¥0"


async def test_a_forged_or_expired_top_up_link_is_refused(rig: Rig, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "shop: forged, tampered or expired top-up receipt link",
        expected="403 (forged) / 410 (expired), logged; the order stays closed to that browser",
    ) as row:
        card_number = rig.reader.card.state.serial.hex().upper()  # type: ignore[union-attr]
        answer = await rig.shop.post(
            "/topup",
            data={"amount": "5000", "method": "bank_transfer", "card_number": card_number},
        )
        order_id = answer.headers["location"].split("/")[2]
        transport = httpx.ASGITransport(app=rig.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as stranger:
            now = int(time.time())
            codes = [
                (await stranger.get(f"/topup/link/{link}")).status_code
                for link in (
                    make_link(b"guessed" * 5, order_id, now + 3600),
                    make_link(SECRET, order_id, now + 3600)[:-2] + "AA",
                    make_link(SECRET, order_id, now - 1),
                    "ord_x.1.y",
                )
            ]
            assert codes == [403, 403, 410, 403]
            assert (await stranger.get(f"/orders/{order_id}/transfer")).status_code == 404
        row.observed = f"{codes}; the order answers 404 to that browser"


async def test_a_paid_transfer_loads_only_its_own_card(rig: Rig, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "shop: paid online top-up presented with another card, then its own",
        expected="another card declined (wrong_card), unchanged, load kept; its own card loaded",
    ) as row:
        own = rig.reader.card.state.serial.hex().upper()  # type: ignore[union-attr]
        answer = await rig.shop.post(
            "/topup", data={"amount": "5000", "method": "bank_transfer", "card_number": own}
        )
        order_id = answer.headers["location"].split("/")[2]
        status = (await rig.shop.get(f"/orders/{order_id}/status")).json()
        pay_by_statement(rig.world, [(status["payment_reference"], 5000)])
        broker = rig.app.state.cashier.broker
        async with SimReader(rig.world.issue()) as stranger:
            broker.attach(stranger)
            assert (await rig.shop.get(f"/orders/{order_id}/pay")).status_code == 200
            await rig.app.state.cashier.task(order_id)
            declined = (await rig.shop.get(f"/orders/{order_id}/status")).json()
            assert (declined["status"], declined["decline_code"]) == ("declined", "wrong_card")
            assert declined["card_number"] == own  # the order still names its own card
            assert declined["settlement_status"] == "requires_card"
            assert stranger.card is not None and stranger.card.state.balance == 0
        broker.attach(rig.reader)
        assert (await rig.shop.post(f"/orders/{order_id}/retry")).status_code == 303
        assert (await rig.shop.get(f"/orders/{order_id}/pay")).status_code == 200
        await rig.app.state.cashier.task(order_id)
        loaded = (await rig.shop.get(f"/orders/{order_id}/status")).json()
        assert loaded["status"] == "loaded" and loaded["settlement_id"] == status["settlement_id"]
        assert rig.balance == 5000
        rig.ledger_ok()
        row.observed = "other card: declined wrong_card, ¥0; own card: loaded ¥50.00, same load"


async def test_a_transfer_for_a_card_settlement_does_not_know_asks_no_money(
    rig: Rig, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "shop: online top-up for a mistyped (unregistered) card number",
        expected="422 'we do not know this card'; no reference issued, no load, nothing to pay",
    ) as row:
        before = rig.books()
        answer = await rig.shop.post(
            "/topup",
            data={"amount": "5000", "method": "bank_transfer", "card_number": "0" * 19 + "1"},
        )
        assert answer.status_code == 422 and "We do not know this card" in answer.text
        assert "RF" not in answer.text and rig.books() == before
        row.observed = f"422; loads, entries {before} → {rig.books()}"
