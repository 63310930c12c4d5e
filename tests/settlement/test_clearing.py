"""Clearing: the China-Standard-Time business day, batch totals and CSV, payouts posted once,
and the ledger still balancing afterwards."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.asgi import AppClient
from tests.settlement.wc_support import (
    MERCHANT_A,
    MERCHANT_B,
    Stack,
    settlement_stack,
)
from webpurse.settlement import clearing, ledger
from webpurse.settlement.clearing import (
    CHINA_STANDARD_TIME,
    ClearingError,
    ClearingItem,
    DayNotOverError,
    ItemKind,
    batch_id,
    business_day_of,
    business_day_window,
    compute_batch,
    parse_timezone,
    render_csv,
    run_batch,
)
from webpurse.settlement.models import Card, Payment, Refund, Transfer

UTC = dt.UTC
DAY = dt.date(2026, 11, 26)
# 10:00 on 27 November in Beijing: the 26th has ended there.
AFTER_DAY = dt.datetime(2026, 11, 27, 2, 0, tzinfo=UTC)


# --- the business day (pure) --------------------------------------------------------


def test_the_business_day_is_the_china_standard_time_calendar_day() -> None:
    start, end = business_day_window(DAY)
    assert start == dt.datetime(2026, 11, 25, 16, 0, tzinfo=UTC)
    assert end == dt.datetime(2026, 11, 26, 16, 0, tzinfo=UTC)
    assert business_day_of(dt.datetime(2026, 11, 26, 15, 59, 59, tzinfo=UTC)) == DAY
    assert business_day_of(dt.datetime(2026, 11, 26, 16, 0, tzinfo=UTC)) == DAY + dt.timedelta(1)
    assert business_day_of(dt.datetime(2026, 11, 25, 16, 0, tzinfo=UTC)) == DAY


def test_the_clearing_time_zone_is_configurable() -> None:
    assert business_day_window(DAY, UTC)[0] == dt.datetime(2026, 11, 26, tzinfo=UTC)
    assert business_day_window(DAY, parse_timezone("-05:00"))[0] == dt.datetime(
        2026, 11, 26, 5, 0, tzinfo=UTC
    )
    assert business_day_window(DAY, parse_timezone("Asia/Shanghai")) == business_day_window(DAY)
    with pytest.raises(ClearingError, match="time zone"):
        parse_timezone("Mars/Olympus")


def item(kind: ItemKind, ident: str, amount: int, hour: int = 3) -> ClearingItem:
    return ClearingItem(kind, ident, amount, dt.datetime(2026, 11, 26, hour, tzinfo=UTC))


def test_totals_net_payout_and_carry() -> None:
    items = [
        item(ItemKind.PAYMENT, "pay_1", 3000),
        item(ItemKind.PAYMENT, "pay_2", 2000),
        item(ItemKind.REFUND, "ref_1", 500),
    ]
    totals = compute_batch(items)
    assert (totals.payment_count, totals.payment_total) == (2, 5000)
    assert (totals.refund_count, totals.refund_total) == (1, 500)
    assert (totals.net, totals.payout, totals.carried_out) == (4500, 4500, 0)
    # A day of refunds only: nothing is paid, the shortfall is carried forward.
    short = compute_batch([item(ItemKind.REFUND, "ref_2", 800)])
    assert (short.payout, short.carried_out) == (0, -800)
    assert compute_batch(items, carried_in=-800).payout == 3700
    # The payout never exceeds what the payable account holds; the rest waits.
    bounded = compute_batch(items, available=4000)
    assert (bounded.payout, bounded.carried_out) == (4000, 500)
    with pytest.raises(ValueError):
        ClearingItem(ItemKind.PAYMENT, "pay_0", 0, AFTER_DAY)


def test_top_ups_a_merchant_sold_are_netted_and_a_negative_net_is_owed_not_paid() -> None:
    items = [
        item(ItemKind.PAYMENT, "pay_1", 3000),
        item(ItemKind.TOPUP, "load_1", 10_000),
        item(ItemKind.TOPUP, "load_2", 1_000),
        item(ItemKind.TOPUP_RETURN, "load_2", 1_000),  # that load failed: not owed
    ]
    # Payable 3000, receivable owed 10,000: the payable settles 3000, nothing is paid out.
    totals = compute_batch(items, available=3000, topups_owed=10_000)
    assert (totals.topup_count, totals.topup_total) == (2, 10_000)
    assert (totals.net, totals.topups_settled, totals.payout) == (-7000, 3000, 0)
    assert totals.carried_out == -7000
    # Next day's captures first pay off what is still owed, then the rest is paid out.
    later = compute_batch(
        [item(ItemKind.PAYMENT, "pay_2", 9000)], carried_in=-7000, available=9000, topups_owed=7000
    )
    assert (later.topups_settled, later.payout, later.carried_out) == (7000, 2000, 0)
    rows = list(csv.DictReader(io.StringIO(render_csv(MERCHANT_A, DAY, items, totals))))
    lines = [r for r in rows if r["kind"] in ("payment", "topup", "topup_return")]
    assert sum(int(r["amount"]) for r in lines) == totals.day_net == -7000
    trailer = {r["kind"]: int(r["amount"]) for r in rows if r["id"] == batch_id(MERCHANT_A, DAY)}
    assert (trailer["total_topups"], trailer["topups_settled"]) == (-10_000, 3000)


def test_csv_report_lines_sum_to_the_net_and_formulas_are_neutralised() -> None:
    items = [
        ClearingItem(ItemKind.PAYMENT, "pay_1", 3000, AFTER_DAY, reference="=HYPERLINK(1)"),
        ClearingItem(ItemKind.REFUND, "ref_1", 500, AFTER_DAY, payment_id="pay_1"),
    ]
    totals = compute_batch(items)
    rows = list(csv.DictReader(io.StringIO(render_csv(MERCHANT_A, DAY, items, totals))))
    lines = [r for r in rows if r["kind"] in ("payment", "refund")]
    assert sum(int(r["amount"]) for r in lines) == totals.net == 2500
    assert lines[0]["reference"] == "'=HYPERLINK(1)"
    trailer = {r["kind"]: int(r["amount"]) for r in rows if r["id"] == batch_id(MERCHANT_A, DAY)}
    assert trailer["payout"] == 2500
    assert trailer["total_refunds"] == -500


# --- batches on a real database ------------------------------------------------------


@pytest.fixture
def stack(migrated_db_url: str) -> Iterator[Stack]:
    with settlement_stack(migrated_db_url, dt.datetime(2026, 11, 25, 0, 0, tzinfo=UTC)) as built:
        yield built


@pytest.fixture
def client(stack: Stack) -> Iterator[AppClient]:
    with AppClient(stack.app) as test_client:
        yield test_client


class Shop:
    """Money movements exactly as the settlement core posts them (payments.py, refunds.py)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.count = 0
        now = dt.datetime(2026, 11, 25, 0, 0, tzinfo=UTC)
        with stack.session_factory() as session, session.begin():
            session.add(
                Card(
                    id="crd_1",
                    card_number="12345678901234567890",
                    status="active",
                    issuer_id="1",
                    key_version=1,
                    start_date=DAY,
                    expiry_date=DAY + dt.timedelta(days=3650),
                    max_balance=1_000_000,
                    shadow_balance=100_000,
                    online_counter=1,
                    offline_counter=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            session.flush()
            ledger.post_transfer(
                session,
                "load_1:hold",
                ledger.funding_account("cash"),
                ledger.HELD_LOADS,
                100_000,
                "load_hold",
                now=now,
            )
            ledger.post_transfer(
                session,
                "load_1:credit",
                ledger.HELD_LOADS,
                ledger.card_account("crd_1"),
                100_000,
                "load_credit",
                now=now,
            )

    def pay(self, merchant: str, amount: int, at: dt.datetime, reference: str = "") -> str:
        self.count += 1
        pid = f"pay_{self.count}"
        with self.stack.session_factory() as session, session.begin():
            session.add(
                Payment(
                    id=pid,
                    merchant_id=merchant,
                    status="succeeded",
                    amount=amount,
                    currency="CNY",
                    merchant_reference=reference or f"order-{self.count}",
                    terminal_id="000000000001",
                    card_id="crd_1",
                    card_number="12345678901234567890",
                    created_at=at,
                    updated_at=at,
                )
            )
            session.flush()
            hold_at = at - dt.timedelta(seconds=5)
            ledger.post_transfer(
                session,
                f"{pid}:hold",
                ledger.card_account("crd_1"),
                ledger.HELD_PURCHASES,
                amount,
                "purchase_hold",
                now=hold_at,
                reference=pid,
            )
            ledger.post_transfer(
                session,
                f"{pid}:capture",
                ledger.HELD_PURCHASES,
                ledger.merchant_account(merchant),
                amount,
                "purchase_capture",
                now=at,
                reference=pid,
            )
        return pid

    def refund(self, payment_id: str, amount: int, at: dt.datetime) -> str:
        rid = f"ref_{payment_id}"
        with self.stack.session_factory() as session, session.begin():
            payment = session.get(Payment, payment_id)
            assert payment is not None
            session.add(
                Refund(
                    id=rid,
                    merchant_id=payment.merchant_id,
                    payment_id=payment_id,
                    amount=amount,
                    currency="CNY",
                    status="succeeded",
                    created_at=at,
                    updated_at=at,
                )
            )
            session.flush()
            ledger.post_transfer(
                session,
                f"{rid}:reserve",
                ledger.merchant_account(payment.merchant_id),
                ledger.REFUNDS_PENDING,
                amount,
                "refund_reserve",
                now=at,
                reference=rid,
            )
            # Delivered (its load's hold and credit, in one): nothing waits in refunds:pending.
            ledger.post_transfer(
                session,
                f"{rid}:delivered",
                ledger.REFUNDS_PENDING,
                ledger.card_account("crd_1"),
                amount,
                "load_credit",
                now=at,
                reference=rid,
            )
        return rid


def at_cst(day: dt.date, hour: int, minute: int = 0) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=CHINA_STANDARD_TIME)


def test_a_day_with_payments_and_a_refund_clears_once_and_the_ledger_balances(
    stack: Stack, client: AppClient
) -> None:
    shop = Shop(stack)
    before = shop.pay(MERCHANT_A, 999, at_cst(DAY - dt.timedelta(1), 23, 59))  # the 25th
    first = shop.pay(MERCHANT_A, 3000, at_cst(DAY, 0, 0), "order-A")  # 16:00 UTC on the 25th
    second = shop.pay(MERCHANT_A, 2000, at_cst(DAY, 23, 59))
    refund = shop.refund(first, 500, at_cst(DAY, 18, 30))
    shop.pay(MERCHANT_A, 700, at_cst(DAY + dt.timedelta(1), 0, 0))  # the 27th
    shop.pay(MERCHANT_B, 4200, at_cst(DAY, 12, 0))  # another merchant

    stack.clock.now = AFTER_DAY
    operator = stack.auth("operator")
    response = client.post(
        "/v1/clearing/batches", json={"merchant": MERCHANT_A, "day": "2026-11-26"}, headers=operator
    )
    assert response.status_code == 200, response.text
    (batch,) = response.json()["data"]
    assert batch["id"] == batch_id(MERCHANT_A, DAY)
    assert batch["created"] is True
    assert batch["timezone"] == "UTC+08:00"
    # The 25th never had a batch: its 999 is not stranded, the merchant's first batch takes
    # everything committed before it that is not of a later day.
    assert (batch["payment_count"], batch["payment_total"]) == (3, 5999)
    assert (batch["refund_count"], batch["refund_total"]) == (1, 500)
    assert (batch["net"], batch["payout"], batch["carried_out"]) == (5499, 5499, 0)

    report = client.get(f"/v1/clearing/batches/{batch['id']}/report.csv", headers=operator)
    assert report.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(report.text)))
    lines = [
        (r["kind"], r["id"], int(r["amount"])) for r in rows if r["kind"] != "" and r["at_utc"]
    ]
    assert lines == [
        ("payment", before, 999),
        ("payment", first, 3000),
        ("refund", refund, -500),
        ("payment", second, 2000),
    ]
    by_id = {r["id"]: r for r in rows}
    assert by_id[first]["reference"] == "order-A"
    assert by_id[refund]["payment_id"] == first
    assert by_id[first]["card_number"] == "12345678901234567890"
    with stack.session_factory() as session:
        assert ledger.balance(session, ledger.payout_account(MERCHANT_A)) == 5499
        # 700 (the 27th) is still payable; everything up to the 26th was paid out.
        assert ledger.balance(session, ledger.merchant_account(MERCHANT_A)) == 700
        assert clearing.ledger_check(session).ok, clearing.ledger_check(session).problems

    # Running it again, by API or directly, pays nothing more.
    again = client.post(
        "/v1/clearing/batches", json={"merchant": MERCHANT_A, "day": "2026-11-26"}, headers=operator
    ).json()["data"][0]
    assert again["created"] is False
    assert again["payout"] == 5499
    with stack.session_factory() as session, session.begin():
        assert run_batch(session, MERCHANT_A, DAY, AFTER_DAY).created is False
    with stack.session_factory() as session:
        payouts = session.scalar(
            select(func.count()).select_from(Transfer).where(Transfer.kind == "payout")
        )
        assert payouts == 1
        assert ledger.balance(session, ledger.payout_account(MERCHANT_A)) == 5499
        assert clearing.ledger_check(session).ok

    # A merchant reads its own batch and report, not another's; only operators run batches.
    own = client.get(f"/v1/clearing/batches/{batch['id']}", headers=stack.auth(MERCHANT_A))
    assert own.json()["payout"] == 5499
    listed = client.get("/v1/clearing/batches", headers=stack.auth(MERCHANT_A)).json()
    assert [b["id"] for b in listed["data"]] == [batch["id"]]
    other = stack.auth(MERCHANT_B)
    assert client.get(f"/v1/clearing/batches/{batch['id']}", headers=other).status_code == 404
    assert (
        client.get(f"/v1/clearing/batches/{batch['id']}/report.csv", headers=other).status_code
        == 404
    )
    assert client.get("/v1/clearing/batches", headers=other).json()["data"] == []
    assert client.post("/v1/clearing/batches", json={}, headers=other).status_code == 403


def test_all_merchants_default_to_the_last_closed_day(stack: Stack, client: AppClient) -> None:
    shop = Shop(stack)
    shop.pay(MERCHANT_A, 100, at_cst(DAY, 9))
    shop.pay(MERCHANT_B, 250, at_cst(DAY, 10))
    stack.clock.now = AFTER_DAY
    data = client.post("/v1/clearing/batches", json={}, headers=stack.auth("operator")).json()
    assert {(b["merchant"], b["day"], b["payout"]) for b in data["data"]} == {
        (MERCHANT_A, "2026-11-26", 100),
        (MERCHANT_B, "2026-11-26", 250),
    }


def test_a_day_not_over_or_out_of_order_is_refused_and_changes_nothing(
    stack: Stack, client: AppClient
) -> None:
    shop = Shop(stack)
    shop.pay(MERCHANT_A, 100, at_cst(DAY, 9))
    stack.clock.now = at_cst(DAY, 23, 0)
    operator = stack.auth("operator")
    early = client.post(
        "/v1/clearing/batches", json={"merchant": MERCHANT_A, "day": "2026-11-26"}, headers=operator
    )
    assert early.status_code == 409
    assert early.json()["code"] == "day_not_over"
    unknown = client.post(
        "/v1/clearing/batches",
        json={"merchant": "mer_nobody", "day": "2026-11-20"},
        headers=operator,
    )
    assert unknown.status_code == 404
    bad_day = client.post("/v1/clearing/batches", json={"day": "26/11/2026"}, headers=operator)
    assert bad_day.status_code == 422
    for extreme in ("0001-01-01", "9999-12-31"):
        response = client.post("/v1/clearing/batches", json={"day": extreme}, headers=operator)
        assert response.status_code == 400, extreme
        assert response.json()["code"] == "day_out_of_range"
    assert client.get("/v1/clearing/batches", headers=operator).json()["data"] == []

    stack.clock.now = AFTER_DAY
    with stack.session_factory() as session, session.begin():
        run_batch(session, MERCHANT_A, DAY, AFTER_DAY)
    with stack.session_factory() as session, pytest.raises(Exception, match="day order"):
        run_batch(session, MERCHANT_A, DAY - dt.timedelta(days=1), AFTER_DAY)
    with stack.session_factory() as session, pytest.raises(DayNotOverError):
        run_batch(session, MERCHANT_A, DAY + dt.timedelta(days=1), AFTER_DAY)


def test_a_refund_heavy_day_carries_its_shortfall_to_the_next_batch(stack: Stack) -> None:
    shop = Shop(stack)
    old = shop.pay(MERCHANT_A, 1000, at_cst(DAY - dt.timedelta(1), 10))
    shop.refund(old, 800, at_cst(DAY, 0, 30))  # before the 25th's batch ran
    shop.pay(MERCHANT_A, 300, at_cst(DAY + dt.timedelta(1), 10))
    with stack.session_factory() as session, session.begin():
        day25 = run_batch(session, MERCHANT_A, DAY - dt.timedelta(1), AFTER_DAY).batch
        # The 25th earned 1000, but only 500 is still payable (1000 - 800 refunded + 300
        # captured on the 27th): 500 is paid, 500 waits.
        assert (day25.payout, day25.carried_out) == (500, 500)
        day26 = run_batch(session, MERCHANT_A, DAY, AFTER_DAY).batch
        # The 26th refunded 800: with 500 carried in, the merchant owes 300.
        assert (day26.refund_total, day26.carried_in, day26.payout, day26.carried_out) == (
            800,
            500,
            0,
            -300,
        )
        day27 = run_batch(
            session, MERCHANT_A, DAY + dt.timedelta(1), AFTER_DAY + dt.timedelta(days=1)
        ).batch
        assert (day27.payment_total, day27.carried_in, day27.payout, day27.carried_out) == (
            300,
            -300,
            0,
            0,
        )
    with stack.session_factory() as session:
        assert ledger.balance(session, ledger.payout_account(MERCHANT_A)) == 1000 - 800 + 300
        assert ledger.balance(session, ledger.merchant_account(MERCHANT_A)) == 0
        assert clearing.ledger_check(session).ok


def test_cli_runs_a_day(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from webpurse.cli import app

    shop = Shop(stack)
    shop.pay(MERCHANT_A, 1500, at_cst(DAY, 9))
    monkeypatch.setenv("WEBPURSE_DATABASE_URL", stack.settings.database_url)
    runner = CliRunner()
    result = runner.invoke(app, ["settlement", "clearing", "run", "--day", "2026-11-26"])
    assert result.exit_code == 0, result.output
    assert batch_id(MERCHANT_A, DAY) in result.output
    assert "1500" in result.output
    again = runner.invoke(app, ["settlement", "clearing", "run", "--day", "2026-11-26"])
    assert again.exit_code == 0
    assert "existed" in again.output
    bad = runner.invoke(app, ["settlement", "clearing", "run", "--day", "2999-01-01"])
    assert bad.exit_code != 0
    assert "has not ended" in bad.output or "ends at" in bad.output
    with stack.session_factory() as session:
        assert ledger.balance(session, ledger.payout_account(MERCHANT_A)) == 1500
        assert clearing.ledger_check(session).ok


async def test_real_card_payments_are_notified_by_webhook_and_cleared(
    stack: Stack, client: AppClient
) -> None:
    """End to end in process: a card emulator behind a SimReader, the merchant's flows and
    settlement client, the settlement API; then webhooks delivered and the day cleared."""
    import os
    import random

    import httpx

    from tests.settlement.test_webhooks import independent_verify
    from tests.settlement.wc_support import Receiver
    from webpurse.card import CardApplet, MemoryStore
    from webpurse.merchant.flows import run_transaction
    from webpurse.merchant.settlement import Kind, SettlementClient
    from webpurse.reader.sim import SimReader
    from webpurse.settlement.funding import record_deposit
    from webpurse.settlement.registry import issue_card
    from webpurse.settlement.routes_webhooks import secret_box_for
    from webpurse.settlement.webhooks import deliver_due

    stack.clock.now = at_cst(DAY, 10)
    with stack.session_factory() as session, session.begin():
        _, state = issue_card(session, stack.app.state.settlement.security, stack.clock())
        record_deposit(session, MERCHANT_A, 10_000, "BANK-A-1", stack.clock())  # its float
    reader = SimReader(CardApplet(state, MemoryStore(state), os.urandom))

    with Receiver([]) as receiver:
        endpoint = client.post(
            "/v1/webhook_endpoints",
            json={"url": receiver.url, "events": ["payment.succeeded", "refund.*"]},
            headers=stack.auth(MERCHANT_A),
        ).json()
        transport = httpx.ASGITransport(app=stack.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://settlement") as http:
            merchant = SettlementClient(http, stack.keys[MERCHANT_A])
            load = await merchant.create(
                Kind.LOAD, 10_000, description="", reference="cash-1", funding="merchant_float"
            )
            assert (await run_transaction(reader, merchant, load, card_timeout=1)).status == (
                "succeeded"
            )
            paid = []
            for amount in (3000, 2000):
                stack.clock.advance(dt.timedelta(minutes=5))
                payment = await merchant.create(
                    Kind.PAYMENT, amount, description="tea", reference=f"order-{amount}"
                )
                outcome = await run_transaction(reader, merchant, payment, card_timeout=1)
                assert outcome.status == "succeeded", outcome
                paid.append(payment.id)
            refund = await http.post(
                "/v1/refunds",
                json={"payment": paid[0], "amount": 500},
                headers=stack.auth(MERCHANT_A),
            )
            assert refund.status_code == 201, refund.text

        async with httpx.AsyncClient() as http:
            report = await deliver_due(
                stack.session_factory,
                http,
                stack.clock(),
                secret_box=secret_box_for(stack.settings),
                rng=random.Random(3),
                allow_private=stack.settings.webhook_allow_private,  # the receiver is on loopback
            )
        assert report.succeeded == report.attempted == 3
        got = receiver.wait_for(3)
    types = sorted(json.loads(g.body)["type"] for g in got)
    assert types == ["payment.succeeded", "payment.succeeded", "refund.created"]
    assert all(independent_verify(endpoint["secret"], g.headers, g.body) for g in got)
    objects = {json.loads(g.body)["data"]["object"]["id"] for g in got}
    assert set(paid) <= objects

    stack.clock.now = AFTER_DAY
    (batch,) = client.post(
        "/v1/clearing/batches",
        json={"merchant": MERCHANT_A, "day": DAY.isoformat()},
        headers=stack.auth("operator"),
    ).json()["data"]
    assert (batch["payment_count"], batch["payment_total"]) == (2, 5000)
    assert (batch["refund_count"], batch["refund_total"]) == (1, 500)
    # The 10,000 top-up was paid for from the merchant's prepaid float: it is not in the
    # day's clearing, which pays out 5000 − 500.
    assert (batch["topup_count"], batch["topup_total"]) == (0, 0)
    assert batch["topups_settled"] == 0
    assert (batch["net"], batch["payout"], batch["carried_out"]) == (4500, 4500, 0)
    with stack.session_factory() as session:
        check = clearing.ledger_check(session)
        assert check.ok, check.problems
        assert ledger.balance(session, ledger.payout_account(MERCHANT_A)) == 4500
        assert ledger.balance(session, ledger.merchant_account(MERCHANT_A)) == 0
        assert ledger.balance(session, ledger.float_account(MERCHANT_A)) == 0
