"""Hypothesis on settlement's parsing of the card's raw answers (ARCHITECTURE.md: settlement
parses them itself and never trusts fields the relay parsed).

1. The strict parsers (``service.parse`` over each card answer's layout) take any bytes and
   either return a value that re-encodes to exactly those bytes or refuse with a 400
   ``invalid_<field>`` problem — never another exception.
2. Through the HTTP API (the app over a migrated SQLite database, a real funded card):
   arbitrary hex as the card's answers to authorise (fresh payments), capture and resolve
   (an authorised payment) never gets a 5xx, never captures, and leaves the ledger as it was
   unless settlement approved real card data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.proof.proof_table import Row, record
from tests.settlement.support import World, make_world
from webpurse.protocol.commands import (
    CreditForLoadResponse,
    DebitForPurchaseResponse,
    InitializeForLoadResponse,
    InitializeForPurchaseResponse,
    TransactionProof,
)
from webpurse.protocol.records import IssuerData
from webpurse.settlement.errors import SettlementError
from webpurse.settlement.models import Account
from webpurse.settlement.problems import problem
from webpurse.settlement.service import parse

SUITE = "fuzz-hypothesis"

PARSERS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "issuer_data": (IssuerData.from_bytes, lambda v: v.to_bytes()),
    "initialize_response": (InitializeForPurchaseResponse.from_data, lambda v: v.to_data()),
    "load_initialize_response": (InitializeForLoadResponse.from_data, lambda v: v.to_data()),
    "debit_response": (DebitForPurchaseResponse.from_data, lambda v: v.to_data()),
    "credit_response": (CreditForLoadResponse.from_data, lambda v: v.to_data()),
    "prove_response": (TransactionProof.from_data, lambda v: v.to_data()),
}
SIZES = {
    "issuer_data": 30,
    "initialize_response": 15,
    "load_initialize_response": 16,
    "debit_response": 8,
    "credit_response": 4,
    "prove_response": 8,
}
_COUNTS: dict[str, int] = {"parsed": 0, "refused": 0, "api": 0}
_FIRST: dict[str, float] = {}  # when each property's first example started (wall time)


def near(size: int) -> st.SearchStrategy[bytes]:
    """Bytes of about a layout's size: the interesting ones are off by a little."""
    return st.binary(min_size=max(size - 2, 0), max_size=size + 2) | st.binary(max_size=64)


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(field=st.sampled_from(sorted(PARSERS)), data=st.data(), upper=st.booleans())
def test_card_answer_parsers_accept_exact_layouts_or_refuse_with_400(
    field: str, data: st.DataObject, upper: bool
) -> None:
    parser, encode = PARSERS[field]
    raw = data.draw(near(SIZES[field]))
    started = time.perf_counter()
    text = raw.hex().upper() if upper else raw.hex()
    try:
        value = parse(text, field, parser)
    except SettlementError as refusal:
        exc = problem(refusal)
        assert exc.status == 400 and exc.code == f"invalid_{field}", (exc.status, exc.code)
        _COUNTS["refused"] += 1
    else:
        assert encode(value) == raw  # nothing dropped, nothing invented
        _COUNTS["parsed"] += 1
    _FIRST.setdefault("parsers", started)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder: Path = tmp_path_factory.mktemp("answers")
    with make_world(f"sqlite:///{folder / 'settlement.db'}") as w:
        yield w


def ledger(world: World) -> dict[str, int]:
    with world.factory() as session:
        return {a.id: a.balance for a in session.scalars(select(Account)) if a.balance}


hexes = st.binary(max_size=40).map(bytes.hex)


@settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    issuer=hexes | st.just("REAL"),
    initialize=hexes | st.just("REAL"),
    debit=hexes,
    prove=st.none() | hexes,
)
def test_arbitrary_card_answers_never_break_settlement(
    world: World, issuer: str, initialize: str, debit: str, prove: str | None
) -> None:
    started = time.perf_counter()
    terminal = world.terminal
    if not hasattr(world, "fuzz_card"):
        card = world.funded_card(10_000)
        real_issuer, _ = terminal.purchase_batch1(card, 0)
        held = terminal.create_payment(100)
        issuer_ok, init_ok = terminal.purchase_batch1(card, 100)
        answer = terminal.authorise_payment(held["id"], issuer_ok, init_ok)
        assert answer.status_code == 200
        world.fuzz_card = (card, real_issuer, init_ok, held["id"])  # type: ignore[attr-defined]
    card, real_issuer, real_init, held_id = world.fuzz_card  # type: ignore[attr-defined]
    before = ledger(world)

    # capture / resolve of the authorised payment with made-up answers
    captured = terminal.post(f"/v1/payments/{held_id}/capture", {"debit_response": debit})
    assert captured.status_code in (400, 402, 409, 422), captured.text
    body: dict[str, Any] = {"initialize_response": initialize if initialize != "REAL" else ""}
    if prove is not None:
        body["prove_response"] = prove
    resolved = terminal.post(f"/v1/payments/{held_id}/resolve", body)
    assert resolved.status_code < 500, resolved.text
    assert resolved.status_code != 200 or resolved.json()["status"] != "succeeded"
    if resolved.status_code != 200:
        assert ledger(world) == before

    # authorise a fresh payment with made-up (or real) answers
    payment = terminal.create_payment(100)
    authorised = terminal.authorise_payment(
        payment["id"],
        real_issuer if issuer == "REAL" else bytes.fromhex(issuer),
        real_init if initialize == "REAL" else bytes.fromhex(initialize),
    )
    assert authorised.status_code in (200, 400, 402, 409, 422), authorised.text
    if authorised.status_code != 200:
        assert ledger(world) == before or resolved.status_code == 200
    _COUNTS["api"] += 1
    _FIRST.setdefault("api", started)


def test_record_the_card_answer_fuzz_rows() -> None:
    assert _COUNTS["parsed"] > 0 and _COUNTS["refused"] > 0, _COUNTS
    record(
        Row(
            suite=SUITE,
            scenario="Hypothesis: settlement's parsers of raw card answers, arbitrary bytes",
            expected="exact layouts parse, re-encode byte for byte; the rest 400 invalid_<field>",
            observed=f"{_COUNTS['parsed']} parsed, {_COUNTS['refused']} refused with 400",
            passed=True,
            seconds=round(_FIRST["api"] - _FIRST["parsers"], 2),
        )
    )
    record(
        Row(
            suite=SUITE,
            scenario="Hypothesis: arbitrary hex as card answers to authorise/capture/resolve",
            expected="never 5xx, never a capture from made-up answers, refusals move no money",
            observed=f"{_COUNTS['api']} rounds of authorise+capture+resolve, all 4xx or approved",
            passed=True,
            seconds=round(time.perf_counter() - _FIRST["api"], 2),
        )
    )
