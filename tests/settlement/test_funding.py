"""Funding (issue 12): references, statements, floats, bank-transfer orders, exceptions.

Pure parts first (references, parsing, matching), then the API on SQLite and PostgreSQL
(the ``world`` fixture), each ending with the ledger check.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from tests.settlement.support import (
    SEED_FLOAT,
    SETTLEMENT_ACCOUNT,
    START,
    Terminal,
    World,
    make_world,
    pay_by_statement,
    statement_csv,
)
from webpurse.settlement import ledger, references, statements
from webpurse.settlement.models import Load, StatementException, Transfer
from webpurse.settlement.webhooks import WebhookEvent

# --- references (pure) ---------------------------------------------------------------


def test_the_iso_11649_example_reference_checks() -> None:
    assert references.is_valid("RF18 5390 0754 7034")
    assert references.check_digits("539007547034") == "18"
    assert not references.is_valid("RF19 5390 0754 7034")


@given(st.text("0123456789", min_size=16, max_size=16), st.integers(0, 17), st.integers(1, 9))
def test_one_wrong_digit_never_gives_another_valid_reference(
    body: str, position: int, delta: int
) -> None:
    ref = references.new_reference(lambda n: body)
    assert references.is_valid(ref)
    chars = list(ref)
    i = 2 + position
    chars[i] = str((int(chars[i]) + delta) % 10)
    assert not references.is_valid("".join(chars))


@given(st.text("0123456789", min_size=16, max_size=16), st.integers(2, 18))
def test_two_swapped_neighbours_never_give_another_valid_reference(body: str, i: int) -> None:
    ref = references.new_reference(lambda n: body)
    swapped = ref[:i] + ref[i + 1] + ref[i] + ref[i + 2 :]
    assert swapped == ref or not references.is_valid(swapped)


def test_references_are_found_in_remittance_text_with_spaces_and_any_case() -> None:
    ref = references.new_reference()
    text = f"top-up for card, ref {references.grouped(ref).lower()} thanks"
    assert references.find_in(text) == ([ref], [])
    broken = ref[:2] + f"{(int(ref[2:4]) + 1) % 100:02d}" + ref[4:]
    assert references.find_in(broken) == ([], [broken])


# --- statements (pure) ---------------------------------------------------------------

MT940 = """:20:STMT{number}
:25:{account}
:28C:{number}/1
:60F:C261127CNY{opening}
:61:2611271127C{amount}NTRFNONREF//BANK1
:86:Top-up {remittance}
:62F:C261127CNY{closing}
"""


def mt940(
    number: int = 1,
    *,
    account: str = SETTLEMENT_ACCOUNT,
    opening: str = "0,00",
    amount: str = "200,00",
    closing: str = "200,00",
    remittance: str = "",
) -> str:
    return MT940.format(
        number=number,
        account=account,
        opening=opening,
        amount=amount,
        closing=closing,
        remittance=remittance,
    )


def test_an_mt940_statement_parses_to_its_lines() -> None:
    ref = references.new_reference()
    parsed = statements.parse(mt940(7, remittance=references.grouped(ref)), "mt940")
    assert (parsed.account, parsed.number, parsed.currency) == (SETTLEMENT_ACCOUNT, 7, "CNY")
    assert (parsed.opening_balance, parsed.closing_balance) == (0, 20_000)
    (line,) = parsed.lines
    assert line.amount == 20_000 and line.bank_reference == "BANK1"
    assert references.find_in(line.remittance) == ([ref], [])
    statements.check(parsed, account=SETTLEMENT_ACCOUNT)


def test_a_csv_statement_round_trips() -> None:
    text = statement_csv(3, [("RF00 x", 150), ("hello", 2)], opening=1_000)
    parsed = statements.parse(text, "csv")
    assert parsed.number == 3 and parsed.opening_balance == 1_000
    assert [line.amount for line in parsed.lines] == [150, 2]
    assert parsed.closing_balance == 1_152
    assert statements.render_csv(parsed) == text


@pytest.mark.parametrize(
    ("text", "fmt", "code"),
    [
        ("not a statement", "mt940", "statement_malformed"),
        (mt940() + mt940(2), "mt940", "statement_malformed"),
        (mt940(amount="2x0,00"), "mt940", "statement_malformed"),
        ("record,account\nopening,x\n", "csv", "statement_malformed"),
        (mt940(closing="300,00"), "mt940", "statement_unbalanced"),
        (mt940(account="OTHER-ACCOUNT"), "mt940", "statement_wrong_account"),
        (mt940().replace("CNY", "EUR"), "mt940", "statement_wrong_currency"),
        (mt940(amount="0,00", closing="0,00"), "mt940", "statement_amount_invalid"),
        (
            statement_csv(1, [("x", 100)]).replace(",1.00,", ",-1.00,"),
            "csv",
            "statement_amount_invalid",
        ),
        (
            statement_csv(1, [("x", 100)]).replace(",1.00,", ",0.00,"),
            "csv",
            "statement_amount_invalid",
        ),
        (statement_csv(1, [("x", 100)]).replace(",1.00,", ",1.001,"), "csv", "statement_malformed"),
        (statement_csv(1, [("x", 100)], currency="USD"), "csv", "statement_wrong_currency"),
    ],
)
def test_a_bad_statement_is_refused_with_its_rule(text: str, fmt: str, code: str) -> None:
    with pytest.raises(statements.StatementError) as refused:
        statements.check(statements.parse(text, fmt), account=SETTLEMENT_ACCOUNT)
    assert refused.value.code == code


def _line(no: int, amount: int, text: str) -> statements.Line:
    return statements.Line(no, amount, START.date(), remittance=text)


def test_matching_funds_an_open_order_once_and_lists_everything_else() -> None:
    refs = [references.new_reference() for _ in range(5)]
    late = START - dt.timedelta(seconds=1)
    orders = {
        refs[0]: statements.Order("load_a", 500, "requires_funding", START + dt.timedelta(1)),
        refs[1]: statements.Order("load_b", 500, "requires_funding", None),
        refs[2]: statements.Order("load_c", 500, "requires_funding", late),
        refs[3]: statements.Order("load_d", 500, "requires_card", None, funded=True),
    }
    bad = refs[4][:2] + f"{(int(refs[4][2:4]) + 1) % 100:02d}" + refs[4][4:]
    lines = [
        _line(1, 500, refs[0]),
        _line(2, 500, refs[0]),  # the same order again
        _line(3, 499, refs[1]),
        _line(4, 501, refs[1]),
        _line(5, 500, refs[2]),
        _line(6, 500, refs[3]),
        _line(7, 500, refs[4]),  # valid, but no order has it
        _line(8, 500, bad),
        _line(9, 500, "no reference at all"),
        _line(10, -500, refs[1]),  # a debit: not matched
    ]
    plan = statements.plan(lines, orders, START)
    kinds = [(d.line.line_no, d.load_id, d.exception) for d in plan]
    x = statements.Exceptional
    assert kinds == [
        (1, "load_a", None),
        (2, "load_a", x.DUPLICATE),
        (3, "load_b", x.SHORT_PAYMENT),
        (4, "load_b", x.OVER_PAYMENT),
        (5, "load_c", x.EXPIRED_ORDER),
        (6, "load_d", x.DUPLICATE),
        (7, None, x.UNMATCHED),
        (8, None, x.BAD_CHECK_DIGIT),
        (9, None, x.UNMATCHED),
    ]


# --- floats (API) --------------------------------------------------------------------


def _op(world: World) -> dict[str, str]:
    return world.auth(world.operator_key)


def _deposit(world: World, merchant_id: str, amount: int, ref: str) -> Any:
    return world.client.post(
        f"/v1/operator/floats/{merchant_id}/deposits",
        json={"amount": amount, "bank_reference": ref},
        headers=_op(world),
    )


def _float(world: World, key: str | None = None) -> dict[str, Any]:
    answer = world.client.get("/v1/float", headers=world.auth(key or world.merchant_key))
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _check(world: World) -> None:
    with world.factory() as session:
        report = ledger.check(session)
    assert report.ok, report.problems


@pytest.fixture
def bare(migrated_db_url: str) -> Any:
    """A world whose merchants have no float yet."""
    with make_world(migrated_db_url, float_fen=0) as w:
        yield w


def test_a_deposit_fills_the_float_once_and_a_conflicting_replay_is_refused(bare: World) -> None:
    assert _float(bare) == {
        "object": "float",
        "merchant": bare.merchant_id,
        "currency": "CNY",
        "balance": 0,
        "low_threshold": 10_000,
    }
    first = _deposit(bare, bare.merchant_id, 50_000, "BANK-0001")
    assert first.status_code == 201 and first.json()["float"]["balance"] == 50_000
    again = _deposit(bare, bare.merchant_id, 50_000, "BANK-0001")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = _deposit(bare, bare.merchant_id, 60_000, "BANK-0001")
    assert other.status_code == 409 and other.json()["code"] == "deposit_conflict"
    assert _float(bare)["balance"] == 50_000
    assert _deposit(bare, "mer_nobody", 1, "BANK-0002").status_code == 404
    merchant = bare.client.post(
        f"/v1/operator/floats/{bare.merchant_id}/deposits",
        json={"amount": 1, "bank_reference": "BANK-0003"},
        headers=bare.auth(bare.merchant_key),
    )
    assert merchant.status_code == 403  # a merchant cannot fill its own float
    _check(bare)


def test_a_load_beyond_the_float_is_refused_and_changes_nothing(bare: World) -> None:
    terminal = bare.terminal
    refused = terminal.post("/v1/loads", {"amount": 100, "funding": {"method": "merchant_float"}})
    assert refused.status_code == 409 and refused.json()["code"] == "insufficient_float"
    assert refused.headers["content-type"].startswith("application/problem+json")
    _deposit(bare, bare.merchant_id, 10_000, "BANK-1")
    terminal.create_load(6_000)
    refused = terminal.post("/v1/loads", {"amount": 4_001, "funding": {"method": "merchant_float"}})
    assert refused.status_code == 409 and refused.json()["float_balance"] == 4_000
    terminal.create_load(4_000)
    assert _float(bare)["balance"] == 0
    with bare.factory() as session:
        assert session.scalar(select(func.count()).select_from(Load)) == 2
    _check(bare)


def test_a_canceled_or_expired_float_load_returns_its_amount(bare: World) -> None:
    _deposit(bare, bare.merchant_id, 10_000, "BANK-1")
    load = bare.terminal.create_load(3_000)
    assert _float(bare)["balance"] == 7_000
    assert bare.terminal.post(f"/v1/loads/{load['id']}/cancel").status_code == 200
    assert _float(bare)["balance"] == 10_000
    bare.terminal.create_load(2_500)
    bare.clock.advance(dt.timedelta(hours=1))
    swept = bare.client.post("/v1/maintenance/sweep", json={}, headers=_op(bare))
    assert swept.json()["loads_expired"] == 1
    assert _float(bare)["balance"] == 10_000
    _check(bare)


def test_the_float_running_low_tells_the_merchant_once(bare: World) -> None:
    _deposit(bare, bare.merchant_id, 15_000, "BANK-1")
    bare.terminal.create_load(4_000)  # 11 000 left: not low
    bare.terminal.create_load(2_000)  # 9 000: below 10 000
    bare.terminal.create_load(1_000)  # still low: no second event
    with bare.factory() as session:
        events = list(session.scalars(select(WebhookEvent).where(WebhookEvent.type == "float.low")))
    assert len(events) == 1
    assert json.loads(events[0].body)["data"]["object"]["balance"] == 9_000


def test_another_merchants_key_reads_only_its_own_float(world: World) -> None:
    assert _float(world, world.other_key)["merchant"] != world.merchant_id
    assert world.client.get("/v1/float", headers=_op(world)).status_code == 403


def test_cash_funding_is_gone(world: World) -> None:
    answer = world.terminal.post(
        "/v1/loads", {"amount": 100, "funding": {"method": "cash", "reference": "x"}}
    )
    assert answer.status_code == 422


# --- bank-transfer orders (API) ------------------------------------------------------


def _order(world: World, card_number: str, amount: int) -> dict[str, Any]:
    load = world.terminal.create_load(amount, card_number, method="bank_transfer")
    assert load["status"] == "requires_funding", load
    return load


def _status(world: World, load: dict[str, Any]) -> str:
    got = world.client.get(f"/v1/loads/{load['id']}", headers=world.auth(world.merchant_key))
    return str(got.json()["status"])


def _held(world: World) -> int:
    with world.factory() as session:
        return ledger.balance(session, ledger.HELD_LOADS)


def test_a_bank_transfer_order_waits_unfunded_with_a_checked_reference(world: World) -> None:
    card = world.issue()
    number = card.state.issuer.card_number
    no_card = world.terminal.post(
        "/v1/loads", {"amount": 100, "funding": {"method": "bank_transfer"}}
    )
    assert no_card.status_code == 422
    load = _order(world, number, 20_000)
    assert references.is_valid(load["funding"]["reference"])
    assert load["card_number"] == number
    assert dt.datetime.fromisoformat(load["expires_at"]) == START + dt.timedelta(days=3)
    with world.factory() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Transfer).where(Transfer.reference == load["id"])
            )
            == 0
        )
    early = world.terminal.post(
        f"/v1/loads/{load['id']}/authorise",
        {"issuer_data": "00" * 30, "initialize_response": "00" * 16, "terminal_id": "00" * 6},
    )
    assert early.status_code == 409 and early.json()["code"] == "load_not_funded"
    assert _held(world) == 0
    _check(world)


def test_a_statement_funds_the_order_which_then_loads_onto_its_card_only(world: World) -> None:
    card, thief = world.issue(), world.issue()
    load = _order(world, card.state.issuer.card_number, 20_000)
    ref = load["funding"]["reference"]
    summary = pay_by_statement(world, [(f"top up {references.grouped(ref)}", 20_000)])
    assert [m["load"] for m in summary["matched"]] == [load["id"]] and not summary["exceptions"]
    assert _status(world, load) == "requires_card" and _held(world) == 20_000
    with world.factory() as session:
        funded = session.scalars(select(WebhookEvent).where(WebhookEvent.type == "load.funded"))
        assert [json.loads(e.body)["data"]["object"]["id"] for e in funded] == [load["id"]]
    # another card is declined, and the order still waits for its own card
    issuer, init = world.terminal.load_batch1(thief, 20_000, load["terminal_id"])
    wrong = world.terminal.post(
        f"/v1/loads/{load['id']}/authorise",
        {
            "issuer_data": issuer.hex(),
            "initialize_response": init.hex(),
            "terminal_id": load["terminal_id"],
        },
    )
    assert wrong.status_code == 402 and wrong.json()["decline_code"] == "invalid_state"
    assert "another card" in wrong.json()["detail"]
    assert _status(world, load) == "requires_card" and _held(world) == 20_000
    # the shop cannot cancel the cardholder's money away
    cancel = world.terminal.post(f"/v1/loads/{load['id']}/cancel")
    assert cancel.status_code == 409 and cancel.json()["code"] == "payer_funded"
    # nor does it expire
    world.clock.advance(dt.timedelta(days=10))
    world.client.post("/v1/maintenance/sweep", json={}, headers=_op(world))
    assert _status(world, load) == "requires_card"
    assert world.terminal.run_load(card, load)["status"] == "succeeded"
    assert card.state.balance == 20_000 and thief.state.balance == 0
    with world.factory() as session:
        assert ledger.balance(session, ledger.RECEIVED_BANK_TRANSFERS) == -20_000
        assert ledger.balance(session, ledger.MATCHED_BANK_TRANSFERS) == 0
    _check(world)


def test_importing_the_same_statement_twice_changes_nothing(world: World) -> None:
    card = world.issue()
    load = _order(world, card.state.issuer.card_number, 5_000)
    text = statement_csv(1, [(load["funding"]["reference"], 5_000), ("no ref", 300)])
    body = {"format": "csv", "statement": text}
    first = world.client.post("/v1/operator/statements", json=body, headers=_op(world))
    assert first.status_code == 201
    with world.factory() as session:
        transfers = session.scalar(select(func.count()).select_from(Transfer))
    again = world.client.post("/v1/operator/statements", json=body, headers=_op(world))
    assert again.status_code == 200 and again.json() == first.json()
    with world.factory() as session:
        assert session.scalar(select(func.count()).select_from(Transfer)) == transfers
        assert session.scalar(select(func.count()).select_from(StatementException)) == 1
    changed = statement_csv(1, [(load["funding"]["reference"], 5_000), ("no ref", 301)])
    conflict = world.client.post(
        "/v1/operator/statements",
        json={"format": "csv", "statement": changed},
        headers=_op(world),
    )
    assert conflict.status_code == 409 and conflict.json()["code"] == "statement_conflict"
    _check(world)


def test_a_gap_or_a_wrong_opening_balance_is_refused(world: World) -> None:
    pay_by_statement(world, [("x", 100)])  # statement 1, closing 100
    for text, code in (
        (statement_csv(3, [("x", 1)], opening=100), "statement_gap"),
        (statement_csv(2, [("x", 1)], opening=0), "statement_opening_mismatch"),
    ):
        refused = world.client.post(
            "/v1/operator/statements",
            json={"format": "csv", "statement": text},
            headers=_op(world),
        )
        assert refused.json()["code"] == code
    _check(world)


def test_money_that_funds_nothing_is_listed_and_returned_to_its_payer(world: World) -> None:
    card = world.issue()
    short = _order(world, card.state.issuer.card_number, 1_000)
    paid = _order(world, card.state.issuer.card_number, 2_000)
    expired = _order(world, card.state.issuer.card_number, 3_000)
    world.clock.advance(dt.timedelta(days=3, seconds=1))
    world.client.post("/v1/maintenance/sweep", json={}, headers=_op(world))
    # (short and paid were ordered at the same time, so they expired too: order again)
    assert _status(world, expired) == "expired"
    short = _order(world, card.state.issuer.card_number, 1_000)
    paid = _order(world, card.state.issuer.card_number, 2_000)
    summary = pay_by_statement(
        world,
        [
            (short["funding"]["reference"], 999),
            (paid["funding"]["reference"], 2_000),
            (paid["funding"]["reference"], 2_000),
            (expired["funding"]["reference"], 3_000),
            ("a gift", 50),
        ],
    )
    kinds = [e["kind"] for e in summary["exceptions"]]
    assert kinds == ["short_payment", "duplicate", "expired_order", "unmatched"]
    assert _status(world, short) == "requires_funding" and _status(world, paid) == "requires_card"
    listed = world.client.get(
        "/v1/operator/statement-exceptions?status=awaiting_return", headers=_op(world)
    ).json()["data"]
    assert sum(x["amount"] for x in listed) == 999 + 2_000 + 3_000 + 50
    with world.factory() as session:
        assert ledger.balance(session, ledger.RETURNS_AWAITING) == 6_049
    first, back = listed[0]["id"], listed[0]["amount"]
    path = f"/v1/operator/statement-exceptions/{first}/return"
    done = world.client.post(path, json={"return_reference": "OUT-1"}, headers=_op(world))
    assert done.status_code == 200 and done.json()["status"] == "returned"
    replay = world.client.post(path, json={"return_reference": "OUT-1"}, headers=_op(world))
    assert replay.status_code == 200
    other = world.client.post(path, json={"return_reference": "OUT-2"}, headers=_op(world))
    assert other.status_code == 409 and other.json()["code"] == "exception_returned"
    with world.factory() as session:
        assert ledger.balance(session, ledger.RETURNS_AWAITING) == 6_049 - back
        assert ledger.balance(session, ledger.RETURNED_PAYERS) == back
    _check(world)


def test_an_operator_cancel_of_a_funded_order_sends_the_money_back_to_the_payer(
    world: World,
) -> None:
    card = world.issue()
    load = _order(world, card.state.issuer.card_number, 1_500)
    pay_by_statement(world, [(load["funding"]["reference"], 1_500)])
    operator = Terminal(world.client, world.operator_key, "000000000000")
    assert operator.post(f"/v1/loads/{load['id']}/cancel").json()["status"] == "canceled"
    (listed,) = world.client.get("/v1/operator/statement-exceptions", headers=_op(world)).json()[
        "data"
    ]
    assert (listed["kind"], listed["load"], listed["amount"]) == (
        "load_canceled",
        load["id"],
        1_500,
    )
    assert _held(world) == 0
    _check(world)


def test_an_unpaid_order_can_be_canceled_and_holds_nothing(world: World) -> None:
    card = world.issue()
    load = _order(world, card.state.issuer.card_number, 1_500)
    assert world.terminal.post(f"/v1/loads/{load['id']}/cancel").json()["status"] == "canceled"
    summary = pay_by_statement(world, [(load["funding"]["reference"], 1_500)])
    assert [e["kind"] for e in summary["exceptions"]] == ["expired_order"]
    _check(world)


def test_seed_float_is_what_the_world_starts_with(world: World) -> None:
    assert _float(world)["balance"] == SEED_FLOAT


@given(st.text(max_size=400), st.sampled_from(["mt940", "csv"]))
def test_any_text_parses_or_is_refused_as_a_statement_error(text: str, fmt: str) -> None:
    try:
        statements.parse(text, fmt)
    except statements.StatementError as refused:
        assert refused.code.startswith("statement_")


@given(
    st.lists(
        st.sampled_from(
            [
                ":20:X",
                ":25:" + SETTLEMENT_ACCOUNT,
                ":28C:1/1",
                ":60F:C261127CNY0,00",
                ":61:2611271127C1,00NTRFNONREF//B",
                ":61:2611271127D0,50NTRF",
                ":86:RF",
                ":62F:C261127CNY0,50",
                ":62F:C261127CNY1,00",
                "x",
                ":61:26112799C9,9NMSC",
            ]
        ),
        max_size=12,
    )
)
def test_any_mt940_field_soup_parses_or_is_refused(fields: list[str]) -> None:
    try:
        parsed = statements.parse("\n".join(fields) + "\n", "mt940")
    except statements.StatementError as refused:
        assert refused.code.startswith("statement_")
    else:
        assert parsed.number == 1


@given(
    st.lists(st.integers(1, 5_000), min_size=1, max_size=6),
    st.lists(st.tuples(st.integers(0, 7), st.integers(-2, 2), st.booleans()), max_size=12),
)
def test_matching_funds_each_order_at_most_once_and_only_for_its_exact_amount(
    amounts: list[int], payments: list[tuple[int, int, bool]]
) -> None:
    refs = [references.new_reference() for _ in amounts]
    orders = {
        ref: statements.Order(f"load_{i}", amount, "requires_funding", None)
        for i, (ref, amount) in enumerate(zip(refs, amounts, strict=True))
    }
    lines = []
    for no, (pick, delta, debit) in enumerate(payments, start=1):
        ref = refs[pick % len(refs)] if pick < len(refs) else "none"
        fen = max(1, amounts[pick % len(amounts)] + delta)
        lines.append(_line(no, -fen if debit else fen, ref))
    plan = statements.plan(lines, orders, START)
    assert [d.line.line_no for d in plan] == [x.line_no for x in lines if x.amount > 0]
    funded = [d.load_id for d in plan if d.matched]
    assert len(funded) == len(set(funded))
    for decision in plan:
        if decision.matched:
            assert orders[decision.reference or ""].amount == decision.line.amount
        else:
            assert decision.exception is not None


def test_an_mt940_statement_funds_its_order_through_the_api(world: World) -> None:
    card = world.issue()
    load = _order(world, card.state.issuer.card_number, 20_000)
    text = mt940(1, remittance=references.grouped(load["funding"]["reference"]))
    answer = world.client.post(
        "/v1/operator/statements", json={"format": "mt940", "statement": text}, headers=_op(world)
    )
    assert answer.status_code == 201, answer.text
    assert [m["load"] for m in answer.json()["matched"]] == [load["id"]]
    assert _status(world, load) == "requires_card"
    _check(world)


@pytest.mark.postgres
def test_concurrent_replays_of_a_statement_and_a_deposit_book_each_once(tmp_path: Any) -> None:
    """Eight operators post the same statement and the same deposit at once (uvicorn on
    PostgreSQL): one import and one deposit are booked, the others answer them again."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    import httpx

    from tests.settlement.support import database_url, live_server

    with (
        database_url("postgresql", tmp_path, migrated=True) as url,
        live_server(url, tmp_path) as live,
    ):
        op = {"authorization": f"Bearer {live.operator_key}"}
        merchant = {"authorization": f"Bearer {live.merchant_key}"}
        with httpx.Client(base_url=live.base_url, timeout=60) as http:
            card = live.issue()
            order = http.post(
                "/v1/loads",
                json={
                    "amount": 700,
                    "card_number": card.state.issuer.card_number,
                    "funding": {"method": "bank_transfer"},
                },
                headers=merchant,
            ).json()
            merchant_id = http.get("/v1/float", headers=merchant).json()["merchant"]
            body = {
                "format": "csv",
                "statement": statement_csv(1, [(order["funding"]["reference"], 700)]),
            }
            start = Barrier(8)

            def post(i: int) -> int:
                start.wait(timeout=30)
                if i % 2:
                    return http.post("/v1/operator/statements", json=body, headers=op).status_code
                return http.post(
                    f"/v1/operator/floats/{merchant_id}/deposits",
                    json={"amount": 500, "bank_reference": "SAME"},
                    headers=op,
                ).status_code

            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(post, range(8)))
            assert sorted(codes[1::2]) == [200, 200, 200, 201], codes
            assert sorted(codes[0::2]) == [200, 200, 200, 201], codes
            assert http.get(f"/v1/loads/{order['id']}", headers=merchant).json()["status"] == (
                "requires_card"
            )
        with live.factory() as session:
            assert ledger.balance(session, ledger.RECEIVED_BANK_TRANSFERS) == -700
            assert ledger.balance(session, ledger.float_account(merchant_id)) == SEED_FLOAT + 500
            report = ledger.check(session)
            assert report.ok, report.problems


def test_an_order_for_an_unknown_or_blocked_card_is_refused(world: World) -> None:
    unknown = world.terminal.post(
        "/v1/loads",
        {"amount": 100, "card_number": "00" * 10, "funding": {"method": "bank_transfer"}},
    )
    assert unknown.status_code == 404 and unknown.json()["param"] == "card_number"
    card = world.issue()
    number = card.state.issuer.card_number
    world.client.post(f"/v1/cards/{number}/status", json={"status": "lost"}, headers=_op(world))
    lost = world.terminal.post(
        "/v1/loads",
        {"amount": 100, "card_number": number, "funding": {"method": "bank_transfer"}},
    )
    assert lost.status_code == 409 and lost.json()["code"] == "card_not_loadable"
    with world.factory() as session:
        assert session.scalars(select(Load)).first() is None


def test_a_recorded_float_deposit_on_the_statement_is_not_counted_twice(bare: World) -> None:
    """The merchant's deposit reaches the same bank account: the operator recorded it (its
    float is filled), and the statement line with that bank reference is that deposit."""
    _deposit(bare, bare.merchant_id, 30_000, "B1-1")  # statement_csv names line i "B1-i"
    text = statement_csv(1, [("float top-up", 30_000), ("float top-up", 30_000)])
    answer = bare.client.post(
        "/v1/operator/statements", json={"format": "csv", "statement": text}, headers=_op(bare)
    )
    summary = answer.json()
    assert summary["float_deposits"] == [{"line": 1, "bank_reference": "B1-1"}]
    assert [e["kind"] for e in summary["exceptions"]] == ["unmatched"]  # line 2: not recorded
    with bare.factory() as session:
        assert ledger.balance(session, ledger.RECEIVED_FLOAT_DEPOSITS) == -30_000
        assert ledger.balance(session, ledger.RECEIVED_BANK_TRANSFERS) == -30_000
    again = statement_csv(2, [("float top-up", 30_000)], opening=60_000)  # same bank ref B2-1
    _deposit(bare, bare.merchant_id, 30_000, "B2-1")
    second = bare.client.post(
        "/v1/operator/statements", json={"format": "csv", "statement": again}, headers=_op(bare)
    ).json()
    assert second["float_deposits"] == [{"line": 1, "bank_reference": "B2-1"}]
    _check(bare)


def test_matching_recognises_a_recorded_deposit_once() -> None:
    lines = [
        statements.Line(1, 500, START.date(), bank_reference="DEP"),
        statements.Line(2, 500, START.date(), bank_reference="DEP"),
        statements.Line(3, 400, START.date(), bank_reference="OTHER"),
    ]
    plan = statements.plan(lines, {}, START, {"DEP": 500, "OTHER": 401})
    assert [(d.deposit, d.exception) for d in plan] == [
        ("DEP", None),
        (None, statements.Exceptional.UNMATCHED),
        (None, statements.Exceptional.UNMATCHED),
    ]
