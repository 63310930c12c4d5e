"""Random sequences of loads, purchases, wrong MACs and interruptions keep the purse honest.

The terminal here knows only what the card tells it (as a real one does): when a response
is lost it recovers through INITIALIZE (amount 0) and GET TRANSACTION PROVE (spec §6).
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.card.support import WHEN, Terminal, make_card
from webpurse.protocol import commands as cmd
from webpurse.protocol import host

amounts = st.integers(min_value=1, max_value=30_000)


class PurseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.t = Terminal(make_card())
        self.loaded = 0
        self.spent = 0
        self.online = 0
        self.offline = 0
        self.last_purchase_proof: bytes | None = None
        self.last_load_proof: bytes | None = None
        self.last_debit: tuple[int, int, bytes] | None = None  # amount, seq, init data

    # --- completed transactions -------------------------------------------------------

    @rule(amount=amounts)
    def load(self, amount: int) -> None:
        self.t.select()
        init = self.t.initialize_load(amount)
        if not init.ok:
            assert init.sw in (0x6A80, 0x9303)
            return
        credit_apdu = self.t.credit_apdu(amount, init)
        credit = self.t.send(credit_apdu)
        assert credit.ok
        self.loaded += amount
        self.last_load_proof = credit_apdu[12:16] + credit.data

    @rule(amount=amounts)
    def purchase(self, amount: int) -> None:
        self.t.select()
        init = self.t.initialize_purchase(amount)
        if not init.ok:
            assert init.sw in (0x9401, 0x9303)
            return
        debit = self.t.send(self.t.debit_apdu(amount, init))
        assert debit.ok
        self.spent += amount
        self.last_purchase_proof = debit.data[4:] + debit.data[:4]

    # --- failures -----------------------------------------------------------------------

    @rule(amount=amounts)
    def forged_debit(self, amount: int) -> None:
        self.t.select()
        init = self.t.initialize_purchase(amount)
        if init.ok:
            assert self.t.send(self.t.debit_apdu(amount, init, forge=True)).sw == 0x9302

    @rule(amount=amounts)
    def forged_credit(self, amount: int) -> None:
        self.t.select()
        init = self.t.initialize_load(amount)
        if init.ok:
            assert self.t.send(self.t.credit_apdu(amount, init, forge=True)).sw == 0x9302

    @rule(amount=amounts)
    def initialize_then_another_command(self, amount: int) -> None:
        self.t.select()
        init = self.t.initialize_purchase(amount)
        if not init.ok:
            return
        debit = self.t.debit_apdu(amount, init)
        self.t.initialize_load(0)  # a new INITIALIZE cancels the pending purchase
        assert self.t.send(debit).sw == 0x6985

    @rule(amount=amounts, delivered=st.booleans(), power_cycle=st.booleans())
    def debit_response_lost(self, amount: int, delivered: bool, power_cycle: bool) -> None:
        """DEBIT sent; the answer never comes back. Maybe the card never got it."""
        self.t.select()
        init = self.t.initialize_purchase(amount)
        if not init.ok:
            return
        before = cmd.InitializeForPurchaseResponse.from_data(init.data).offline_counter
        debit = self.t.debit_apdu(amount, init)
        if delivered:
            self.t.card.process(debit)  # the card acts; the response is lost
        if power_cycle:
            self.t.card.reset()
        # recovery (spec §6): same card, INITIALIZE amount 0, compare the counter
        self.t.select()
        probe = self.t.initialize_purchase(0)
        if not probe.ok:
            assert probe.sw == 0x9303
            return
        now = cmd.InitializeForPurchaseResponse.from_data(probe.data).offline_counter
        if now == before + 1:
            proof = self.t.send(cmd.GetTransactionProve(0x06, now).to_apdu())
            assert proof.ok
            mac2, tac = proof.data[:4], proof.data[4:]
            parsed = cmd.InitializeForPurchaseResponse.from_data(init.data)
            assert host.verify_purchase_mac2(
                self.t.dpk,
                mac2,
                random=parsed.random,
                offline_counter=before,
                terminal_seq=self.t.seq,
                amount=amount,
            )
            assert host.verify_purchase_tac(
                self.t.dtk,
                tac,
                amount=amount,
                terminal_id=self.t.terminal_id,
                terminal_seq=self.t.seq,
                date=WHEN[0],
                time=WHEN[1],
            )
            self.spent += amount
            self.last_purchase_proof = proof.data
        else:
            assert now == before  # nothing was debited: the payment can be released
            assert not delivered or self.t.card.state.locked is False

    @rule()
    def power_cycle(self) -> None:
        self.t.card.reset()

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def balance_is_loads_minus_purchases(self) -> None:
        assert self.t.card.state.balance == self.loaded - self.spent

    @invariant()
    def counters_are_monotonic(self) -> None:
        state = self.t.card.state
        assert state.online_counter >= self.online and state.offline_counter >= self.offline
        self.online, self.offline = state.online_counter, state.offline_counter

    @invariant()
    def last_proofs_are_retrievable(self) -> None:
        card = self.t.card
        self.t.select()
        if self.last_purchase_proof is not None:
            answer = self.t.send(
                cmd.GetTransactionProve(0x06, card.state.offline_counter).to_apdu()
            )
            assert answer.ok and answer.data == self.last_purchase_proof
        if self.last_load_proof is not None:
            answer = self.t.send(cmd.GetTransactionProve(0x02, card.state.online_counter).to_apdu())
            assert answer.ok and answer.data == self.last_load_proof


PurseMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestPurse = PurseMachine.TestCase
