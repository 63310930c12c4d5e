"""Hypothesis against the agent's Guard: a hostile merchant sends any APDU sequence.

The merchant server drives the card; the agent's :class:`~webpurse.agent.guard.Guard`
stands between them (docs/remote-reader.md, "The agent: trusted display and guard"). Here
the merchant is Hypothesis: it sends SELECTs, INITIALIZEs for any amount (purchase or load),
DEBITs and CREDITs with correct MACs for whatever INITIALIZE the card last accepted (the
worst case: a merchant that colludes with a stolen key) or forged ones, other commands,
random bytes, and it may lose the card's answers. The shopper confirms or refuses each
question. The agent loop is the real one minus the socket: ``check`` → ask → ``decide`` →
card → ``sent``.

What the shopper relies on, for every sequence:
- the card's balance goes down only by an amount the shopper confirmed, at most once per
  session, and only after confirming; it goes up (a load) likewise;
- a refused question is final for the session;
- the card never receives a command outside the relayed e-purse set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.card.support import TERMINAL, Terminal, make_card
from tests.proof.proof_table import Row, record
from webpurse.agent.guard import Allow, Ask, Guard, Kind, Refuse
from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import CommandApdu, ResponseApdu
from webpurse.protocol.errors import ProtocolError

ORIGIN = "https://shop.example"
AMOUNTS = st.sampled_from([1, 100, 999, 1_000, 2_500, 0, 50_000, 0xFFFFFFFF])
RELAYED_INS = {
    cmd.INS_SELECT,
    cmd.INS_READ_BINARY,
    cmd.INS_READ_RECORD,
    cmd.INS_GET_BALANCE,
    cmd.INS_INITIALIZE,
    cmd.INS_DEBIT_FOR_PURCHASE,
    cmd.INS_CREDIT_FOR_LOAD,
    cmd.INS_GET_TRANSACTION_PROVE,
}

# Whole attempts (SELECT, INITIALIZE for one amount, DEBIT/CREDIT with a MAC for another or
# the same) so sequences reach the card's debit often; single steps mix them up.
attempts = st.tuples(
    st.sampled_from(["purchase", "load"]),
    AMOUNTS,
    st.none() | AMOUNTS,  # the MAC's amount; None: the INITIALIZE's own
    st.booleans(),
    st.booleans(),
)

actions = st.one_of(
    st.tuples(st.just("attempt"), attempts),
    st.tuples(st.just("select")),
    st.tuples(st.just("init_purchase"), AMOUNTS),
    st.tuples(st.just("init_load"), AMOUNTS),
    st.tuples(st.just("debit"), AMOUNTS, st.booleans()),
    st.tuples(st.just("credit"), AMOUNTS, st.booleans()),
    st.tuples(st.just("balance")),
    st.tuples(st.just("prove"), st.integers(0, 3)),
    st.tuples(st.just("verify")),
    st.tuples(st.just("raw"), st.binary(min_size=0, max_size=24)),
)


@dataclass
class Session:
    """One agent session: the guard, the card, a hostile merchant's terminal, the shopper."""

    answers: list[bool]
    card: Any = field(default_factory=make_card)
    guard: Guard = field(default_factory=lambda: Guard(ORIGIN, "Order 42"))
    confirmed: dict[Kind, int] = field(default_factory=dict)
    refused: set[Kind] = field(default_factory=set)
    debits: list[int] = field(default_factory=list)
    credits: list[int] = field(default_factory=list)
    last_init: dict[str, ResponseApdu] = field(default_factory=dict)
    asked: int = 0

    def __post_init__(self) -> None:
        self.terminal = Terminal(self.card)
        assert self.terminal.load(20_000).ok  # the shopper's card, funded beforehand

    def shopper(self) -> bool:
        answer = self.answers[self.asked % len(self.answers)]
        self.asked += 1
        return answer

    def apdu_for(self, action: tuple[Any, ...]) -> bytes:
        name = action[0]
        if name == "select":
            return cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes()
        if name == "init_purchase":
            return cmd.InitializeForPurchase(1, action[1], TERMINAL).to_apdu().to_bytes()
        if name == "init_load":
            return cmd.InitializeForLoad(1, action[1], TERMINAL).to_apdu().to_bytes()
        if name == "debit":
            init = self.last_init.get("purchase")
            if init is None:
                return cmd.DebitForPurchase(1, *_when(), b"\0" * 4).to_apdu().to_bytes()
            return self.terminal.debit_apdu(action[1], init, forge=action[2])
        if name == "credit":
            init = self.last_init.get("load")
            if init is None:
                return cmd.CreditForLoad(*_when(), b"\0" * 4).to_apdu().to_bytes()
            return self.terminal.credit_apdu(action[1], init, forge=action[2])
        if name == "balance":
            return cmd.GetBalance().to_apdu().to_bytes()
        if name == "prove":
            return cmd.GetTransactionProve(0x06, action[1]).to_apdu().to_bytes()
        if name == "verify":
            return bytes.fromhex("0020000002123F")
        return bytes(action[1])

    def relay(self, apdu: bytes, lose_answer: bool) -> None:
        verdict = self.guard.check(apdu)
        if isinstance(verdict, Ask):
            request = verdict.request
            granted = self.shopper()
            if granted:
                self.confirmed[request.kind] = request.amount
            else:
                self.refused.add(request.kind)
            verdict = self.guard.decide(request, granted)
        if isinstance(verdict, Refuse):
            return
        assert isinstance(verdict, Allow)
        command = CommandApdu.from_bytes(apdu)  # Allow implies a well-formed command
        assert command.ins in RELAYED_INS, f"relayed INS {command.ins:02X}"
        balance = self.card.state.balance
        response = self.card.process(apdu)
        moved = self.card.state.balance - balance
        if moved < 0:
            self.debits.append(-moved)
            assert Kind.PURCHASE in self.confirmed, "a debit nobody confirmed"
            assert -moved == self.confirmed[Kind.PURCHASE], "debited another amount"
            assert Kind.PURCHASE not in self.refused
        elif moved > 0:
            self.credits.append(moved)
            assert Kind.LOAD in self.confirmed, "a credit nobody confirmed"
            assert moved == self.confirmed[Kind.LOAD], "credited another amount"
        answer = ResponseApdu.from_bytes(response)
        if command.ins == cmd.INS_INITIALIZE and answer.ok:
            kind = "load" if command.p1 == 0x00 else "purchase"
            self.last_init[kind] = answer
        self.guard.sent(apdu, None if lose_answer else response)


_STATS = {"sequences": 0, "apdus": 0, "debits": 0, "credits": 0, "asked": 0}
_FIRST: list[float] = []  # when the first example started: the row gives wall time


@settings(
    max_examples=1000,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    steps=st.lists(st.tuples(actions, st.booleans()), min_size=1, max_size=25),
    answers=st.lists(st.booleans(), min_size=1, max_size=4),
)
def test_the_guard_never_lets_an_unconfirmed_debit_through(
    steps: list[tuple[tuple[Any, ...], bool]], answers: list[bool]
) -> None:
    started = time.perf_counter()
    session = Session(answers)
    for action, lose in steps:
        if action[0] == "attempt":
            kind, init_amount, mac_amount, forge, lose_final = action[1]
            session.relay(session.apdu_for(("select",)), lose_answer=False)
            try:
                session.relay(session.apdu_for((f"init_{kind}", init_amount)), lose_answer=False)
                final = "debit" if kind == "purchase" else "credit"
                mac_amount = init_amount if mac_amount is None else mac_amount
                apdu = session.apdu_for((final, mac_amount, forge))
            except ProtocolError:
                continue
            session.relay(apdu, lose_answer=lose_final)
            continue
        try:
            apdu = session.apdu_for(action)
        except ProtocolError:
            continue  # the hostile side could not even build it (e.g. amount out of range)
        session.relay(apdu, lose_answer=lose and action[0] in ("debit", "credit"))
    assert len(session.debits) <= 1, f"two debits in one session: {session.debits}"
    assert len(session.credits) <= 1, f"two credits in one session: {session.credits}"
    _STATS["sequences"] += 1
    _STATS["apdus"] += len(steps)
    _STATS["debits"] += len(session.debits)
    _STATS["credits"] += len(session.credits)
    _STATS["asked"] += session.asked
    _FIRST[:] = _FIRST or [started]


def test_record_the_guard_fuzz_row() -> None:
    """One proof row for the property above (runs after it, in file order)."""
    assert _STATS["sequences"] >= 100, _STATS
    assert _STATS["debits"] > 0, "the fuzz never reached a real debit: it proves nothing"
    record(
        Row(
            suite="fuzz-hypothesis",
            scenario="Hypothesis: the agent's Guard fed 1,000 hostile APDU sequences",
            expected="a debit/credit only after the shopper confirmed exactly that amount, once",
            observed=(
                f"{_STATS['sequences']} sequences, {_STATS['apdus']} APDUs, "
                f"{_STATS['asked']} questions, {_STATS['debits']} debits and "
                f"{_STATS['credits']} credits, each confirmed"
            ),
            passed=True,
            seconds=round(time.perf_counter() - _FIRST[0], 2),
        )
    )


def _when() -> tuple[Any, Any]:
    from tests.card.support import WHEN

    return WHEN
