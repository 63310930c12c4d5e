"""Attacks on funding (issue 12): value is never created, every load is paid for.

Against the real settlement app (SQLite, and PostgreSQL where locks are the point) and the
card emulator: a merchant key cannot load without a float and moves at most its own float,
also under 20 concurrent attempts through a real uvicorn process on PostgreSQL; an imported
statement funds exactly the orders it pays, once; every bad statement or deposit is
refused with its code and changes nothing. Each scenario ends with the invariants
(:func:`tests.proof.invariants.check_invariants`, which runs ``webpurse ledger check``).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Barrier
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.proof.conftest import Proof
from tests.proof.invariants import InvariantReport, check_invariants
from tests.settlement.support import (
    BACKENDS,
    SETTLEMENT_ACCOUNT,
    World,
    database_url,
    live_server,
    make_world,
    pay_by_statement,
    statement_csv,
)
from webpurse.card import CardApplet
from webpurse.settlement import ledger, references
from webpurse.settlement.models import Account, BankStatement, Load, StatementException

SUITE = "attacks_funding"
FLOAT = 10_000  # ¥100


@pytest.fixture
def world(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[World]:
    """A world whose merchants start with no float (SQLite unless parametrised)."""
    backend = getattr(request, "param", "sqlite")
    with database_url(backend, tmp_path, migrated=True) as url, make_world(url, float_fen=0) as w:
        yield w


BOTH = pytest.mark.parametrize("world", BACKENDS, indirect=True)


def on(world: World) -> str:
    return " (PostgreSQL)" if world.url.startswith("postgresql") else ""


def _op(world: World) -> dict[str, str]:
    return world.auth(world.operator_key)


def _deposit(world: World, merchant_id: str, amount: int, ref: str) -> httpx.Response:
    return world.client.post(
        f"/v1/operator/floats/{merchant_id}/deposits",
        json={"amount": amount, "bank_reference": ref},
        headers=_op(world),
    )


def _balances(world: World) -> dict[str, int]:
    with world.factory() as session:
        return {a.id: a.balance for a in session.scalars(select(Account))}


def _invariants(world: World, cards: list[CardApplet] = ()) -> InvariantReport:  # type: ignore[assignment]
    return check_invariants(world.factory, world.url, cards, settled=True)


def _float_load(world: World, amount: int, key: str | None = None) -> httpx.Response:
    return world.client.post(
        "/v1/loads",
        json={"amount": amount, "funding": {"method": "merchant_float"}},
        headers=world.auth(key or world.merchant_key),
    )


@BOTH
def test_a_merchant_key_with_an_empty_float_cannot_load(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "merchant key orders a cash top-up with an empty float" + on(world),
        expected="409 insufficient_float; no load, no ledger entry",
    ) as row:
        before = _balances(world)
        answer = _float_load(world, 100)
        assert answer.status_code == 409 and answer.json()["code"] == "insufficient_float"
        assert _balances(world) == before
        with world.factory() as session:
            assert session.scalars(select(Load)).first() is None
        report = _invariants(world)
        row.observed = f"409 insufficient_float; 0 loads; {report.summary()}"


def test_a_stolen_merchant_key_moves_at_most_that_merchants_float(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "stolen merchant key mints value onto a card (float ¥100)",
        expected="at most ¥100 of loads, all drawn from that merchant's float; then 409"
        " insufficient_float; it cannot fill its float, read or draw another's",
    ) as row:
        _deposit(world, world.merchant_id, FLOAT, "BANK-A")
        other = world.client.get("/v1/float", headers=world.auth(world.other_key)).json()
        _deposit(world, other["merchant"], 50_000, "BANK-B")
        card = world.issue()
        world.terminal.load(card, 6_000)
        world.terminal.load(card, 4_000)
        beyond = _float_load(world, 1)
        assert beyond.status_code == 409 and beyond.json()["code"] == "insufficient_float"
        refill = world.client.post(
            f"/v1/operator/floats/{world.merchant_id}/deposits",
            json={"amount": 1_000_000, "bank_reference": "FAKE"},
            headers=world.auth(world.merchant_key),
        )
        assert refill.status_code == 403
        mine = world.client.get("/v1/float", headers=world.auth(world.merchant_key)).json()
        assert mine["balance"] == 0 and mine["merchant"] == world.merchant_id
        with world.factory() as session:
            assert ledger.balance(session, ledger.float_account(other["merchant"])) == 50_000
        assert card.state.balance == FLOAT
        report = _invariants(world, [card])
        row.observed = (
            f"loaded 6000 + 4000 = float; 1 fen more → 409; refill 403; other float 50000"
            f" untouched; {report.summary()}"
        )


@pytest.mark.postgres
def test_a_hundred_yuan_float_allows_exactly_a_hundred_yuan_under_20_concurrent_loads(
    tmp_path: Path, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "20 concurrent ¥10 cash top-ups against a ¥100 float, real uvicorn on PostgreSQL",
        expected="exactly 10 created (¥100), 10 refused 409 insufficient_float; float 0",
    ) as row:
        attempts = 20
        with (
            database_url("postgresql", tmp_path, migrated=True) as url,
            live_server(url, tmp_path, float_fen=FLOAT) as server,
        ):
            start = Barrier(attempts)
            limits = httpx.Limits(max_connections=attempts)
            with httpx.Client(base_url=server.base_url, timeout=60, limits=limits) as http:

                def attempt(i: int) -> int:
                    start.wait(timeout=30)
                    return http.post(
                        "/v1/loads",
                        json={"amount": 1_000, "funding": {"method": "merchant_float"}},
                        headers={"authorization": f"Bearer {server.merchant_key}"},
                    ).status_code

                with ThreadPoolExecutor(attempts) as pool:
                    codes = list(pool.map(attempt, range(attempts)))
            assert sorted(codes) == [201] * 10 + [409] * 10, codes
            with server.factory() as session:
                loads = list(session.scalars(select(Load)))
                assert sum(x.amount for x in loads) == FLOAT and len(loads) == 10
                (float_account,) = [
                    a for a in session.scalars(select(Account)) if a.kind == "float"
                ]
                assert float_account.balance == 0
            report = check_invariants(server.factory, url, settled=True)
        row.observed = f"201 ×10, 409 ×10; held 10000; float 0; {report.summary()}"


@BOTH
def test_an_imported_statement_funds_exactly_the_matched_top_ups_once(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "bank statement imported (twice) with a paid order, a short payment and a stranger"
        + on(world),
        expected="only the exactly paid order is funded and loads onto its card; the rest are"
        " exceptions; the second import changes nothing",
    ) as row:
        card = world.issue()
        number = card.state.issuer.card_number
        paid = world.terminal.create_load(20_000, number, method="bank_transfer")
        short = world.terminal.create_load(5_000, number, method="bank_transfer")
        text = statement_csv(
            1,
            [
                (references.grouped(paid["funding"]["reference"]), 20_000),
                (short["funding"]["reference"], 4_999),
                ("no reference", 700),
            ],
        )
        body = {"format": "csv", "statement": text}
        first = world.client.post("/v1/operator/statements", json=body, headers=_op(world))
        assert first.status_code == 201
        assert [m["load"] for m in first.json()["matched"]] == [paid["id"]]
        after_first = _balances(world)
        again = world.client.post("/v1/operator/statements", json=body, headers=_op(world))
        assert again.status_code == 200 and again.json() == first.json()
        assert _balances(world) == after_first
        assert world.terminal.run_load(card, paid)["status"] == "succeeded"
        assert card.state.balance == 20_000
        with world.factory() as session:
            statuses = {x.id: x.status for x in session.scalars(select(Load))}
            awaiting = ledger.balance(session, ledger.RETURNS_AWAITING)
        assert statuses == {paid["id"]: "succeeded", short["id"]: "requires_funding"}
        assert awaiting == 4_999 + 700
        report = _invariants(world, [card])
        row.observed = (
            f"1 matched, 2 exceptions (short, unmatched: 5699 awaiting return); re-import 200,"
            f" ledger unchanged; card 20000; {report.summary()}"
        )


def _refusal_cases(world: World) -> list[tuple[str, dict[str, Any], int, str]]:
    card = world.issue()
    order = world.terminal.create_load(1_000, card.state.issuer.card_number, method="bank_transfer")
    ref = order["funding"]["reference"]
    good = statement_csv(2, [(ref, 1_000)], opening=100)
    return [
        (
            "malformed statement",
            {"format": "mt940", "statement": ":20:X\n:25:"},
            422,
            "statement_malformed",
        ),
        (
            "opening + lines ≠ closing",
            {
                "format": "csv",
                "statement": good.replace("\nclosing,", "\nclosing,", 1).replace(
                    ",11.00,CNY,,,", ",12.00,CNY,,,"
                ),
            },
            422,
            "statement_unbalanced",
        ),
        (
            "another account",
            {
                "format": "csv",
                "statement": statement_csv(
                    2, [(ref, 1_000)], opening=100, account="6222-0000-OTHER"
                ),
            },
            422,
            "statement_wrong_account",
        ),
        (
            "another currency",
            {
                "format": "csv",
                "statement": statement_csv(2, [(ref, 1_000)], opening=100, currency="USD"),
            },
            422,
            "statement_wrong_currency",
        ),
        (
            "a gap in statement numbers",
            {"format": "csv", "statement": statement_csv(3, [(ref, 1_000)], opening=100)},
            409,
            "statement_gap",
        ),
        (
            "a negative credit line",
            {"format": "csv", "statement": good.replace(",10.00,CNY", ",-10.00,CNY")},
            422,
            "statement_amount_invalid",
        ),
        (
            "a zero credit line",
            {"format": "csv", "statement": good.replace(",10.00,CNY", ",0.00,CNY")},
            422,
            "statement_amount_invalid",
        ),
    ]


@BOTH
def test_each_bad_statement_is_refused_and_changes_nothing(world: World, proof: Proof) -> None:
    pay_by_statement(world, [("opening money", 100)])  # statement 1, closing ¥1.00
    cases = _refusal_cases(world)
    for name, body, status, code in cases:
        with proof.row(
            SUITE,
            f"statement import: {name}" + on(world),
            expected=f"{status} {code}; nothing booked, no order funded",
        ) as row:
            before = _balances(world)
            with world.factory() as session:
                statements_before = len(list(session.scalars(select(BankStatement))))
            answer = world.client.post("/v1/operator/statements", json=body, headers=_op(world))
            assert (answer.status_code, answer.json()["code"]) == (status, code), answer.text
            assert answer.headers["content-type"].startswith("application/problem+json")
            assert _balances(world) == before
            with world.factory() as session:
                assert len(list(session.scalars(select(BankStatement)))) == statements_before
                assert {x.status for x in session.scalars(select(Load))} == {"requires_funding"}
            report = _invariants(world)
            row.observed = f"{answer.status_code} {code}; ledger unchanged; {report.summary()}"


def test_a_reference_failing_its_check_digit_funds_nothing(world: World, proof: Proof) -> None:
    with proof.row(
        SUITE,
        "bank transfer names the order's reference with a mistyped check digit",
        expected="the order stays requires_funding; the money is a bad_check_digit exception"
        " awaiting return",
    ) as row:
        card = world.issue()
        order = world.terminal.create_load(
            1_000, card.state.issuer.card_number, method="bank_transfer"
        )
        ref = order["funding"]["reference"]
        typo = ref[:2] + f"{(int(ref[2:4]) + 1) % 100:02d}" + ref[4:]
        summary = pay_by_statement(world, [(typo, 1_000)])
        assert [e["kind"] for e in summary["exceptions"]] == ["bad_check_digit"]
        with world.factory() as session:
            assert session.get(Load, order["id"]).status == "requires_funding"  # type: ignore[union-attr]
            (exc,) = session.scalars(select(StatementException))
            assert exc.status == "awaiting_return" and exc.amount == 1_000
        report = _invariants(world)
        row.observed = f"bad_check_digit exception 1000; order unfunded; {report.summary()}"


@BOTH
def test_a_float_deposit_replayed_with_another_amount_is_refused(
    world: World, proof: Proof
) -> None:
    with proof.row(
        SUITE,
        "float deposit replayed: same bank reference, same and then another amount" + on(world),
        expected="same amount: the same deposit (200), nothing added; another amount: 409"
        " deposit_conflict; float as first recorded",
    ) as row:
        first = _deposit(world, world.merchant_id, FLOAT, "BANK-REPLAY")
        assert first.status_code == 201
        before = _balances(world)
        same = _deposit(world, world.merchant_id, FLOAT, "BANK-REPLAY")
        assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
        other = _deposit(world, world.merchant_id, FLOAT * 10, "BANK-REPLAY")
        assert other.status_code == 409 and other.json()["code"] == "deposit_conflict"
        assert _balances(world) == before
        assert before[ledger.float_account(world.merchant_id)] == FLOAT
        report = _invariants(world)
        row.observed = f"201, then 200 same id, then 409 deposit_conflict; {report.summary()}"


def test_the_statement_account_is_the_configured_one(world: World) -> None:
    assert world.settings.settlement_account == SETTLEMENT_ACCOUNT
