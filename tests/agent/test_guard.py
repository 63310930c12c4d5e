"""The agent's guard: what it lets through to the card, fed APDUs and the card's answers."""

from __future__ import annotations

import pytest

from tests.card.support import TERMINAL, WHEN, Terminal, make_card
from webpurse.agent.guard import Allow, Ask, ConsentRequest, Guard, Kind, Refuse
from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import ResponseApdu
from webpurse.reader.messages import ErrorCode

ORIGIN = "https://shop.example"


class Relay:
    """The agent's loop, minus the socket: guard.check → card → guard.sent."""

    def __init__(self, consent: bool = True) -> None:
        self.card = make_card()
        self.terminal = Terminal(self.card)
        self.guard = Guard(ORIGIN, "Order 42")
        self.consent = consent
        self.asked: list[ConsentRequest] = []

    def send(self, apdu: bytes) -> Refuse | bytes:
        verdict = self.guard.check(apdu)
        if isinstance(verdict, Ask):
            self.asked.append(verdict.request)
            verdict = self.guard.decide(verdict.request, self.consent)
        if isinstance(verdict, Refuse):
            return verdict
        assert isinstance(verdict, Allow)
        response = self.card.process(apdu)
        self.guard.sent(apdu, response)
        return response

    def initialize_purchase(self, amount: int) -> bytes:
        self.send(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes())
        answer = self.send(cmd.InitializeForPurchase(1, amount, TERMINAL).to_apdu().to_bytes())
        assert isinstance(answer, bytes) and answer[-2:] == b"\x90\x00"
        return answer

    def debit(self, amount: int, init: bytes, forge: bool = False) -> Refuse | bytes:
        return self.send(
            self.terminal.debit_apdu(amount, ResponseApdu.from_bytes(init), forge=forge)
        )


@pytest.fixture
def funded() -> Relay:
    relay = Relay()
    assert relay.terminal.load(5000).ok
    return relay


def test_debit_asks_once_with_the_initialize_amount(funded: Relay) -> None:
    init = funded.initialize_purchase(1000)
    answer = funded.debit(1000, init)
    assert isinstance(answer, bytes) and answer[-2:] == b"\x90\x00"
    assert funded.asked == [ConsentRequest(Kind.PURCHASE, 1000, ORIGIN, "Order 42")]
    assert funded.card.state.balance == 4000


def test_refused_consent_refuses_the_debit_and_every_later_one(funded: Relay) -> None:
    funded.consent = False
    init = funded.initialize_purchase(1000)
    first = funded.debit(1000, init)
    init = funded.initialize_purchase(1000)
    second = funded.debit(1000, init)
    assert isinstance(first, Refuse) and first.code is ErrorCode.CONSENT_REFUSED
    assert isinstance(second, Refuse) and second.code is ErrorCode.CONSENT_REFUSED
    assert len(funded.asked) == 1 and funded.card.state.balance == 5000


def test_a_failed_debit_spends_the_consent_the_retry_is_asked_again(funded: Relay) -> None:
    init = funded.initialize_purchase(1000)
    failed = funded.debit(1000, init, forge=True)
    assert isinstance(failed, bytes) and failed[-2:] == b"\x93\x02"
    assert funded.guard.failures == 1
    init = funded.initialize_purchase(2000)
    retried = funded.debit(2000, init)  # a new amount: a new question, with that amount
    assert isinstance(retried, bytes) and retried[-2:] == b"\x90\x00"
    assert [r.amount for r in funded.asked] == [1000, 2000]
    assert funded.card.state.balance == 3000


def test_after_two_failed_debits_the_agent_refuses_more_and_says_why(funded: Relay) -> None:
    for _ in range(2):
        failed = funded.debit(1000, funded.initialize_purchase(1000), forge=True)
        assert isinstance(failed, bytes) and failed[-2:] == b"\x93\x02"
    third = funded.debit(1000, funded.initialize_purchase(1000))
    assert isinstance(third, Refuse) and third.code is ErrorCode.TOO_MANY_FAILURES
    assert "locking the card" in third.message
    assert len(funded.asked) == 2  # one "yes" per failed attempt, and no third question
    assert funded.card.state.mac_failures == 2 and not funded.card.state.locked
    assert funded.card.state.balance == 5000


def test_a_confirmed_amount_does_not_cover_a_different_initialize(funded: Relay) -> None:
    init = funded.initialize_purchase(1000)
    debit = funded.terminal.debit_apdu(1000, ResponseApdu.from_bytes(init))
    asked = funded.guard.check(debit)
    assert isinstance(asked, Ask)
    funded.guard.decide(asked.request, True)
    funded.initialize_purchase(2000)  # the merchant swaps the INITIALIZE after the "yes"
    swapped = funded.guard.check(debit)
    assert isinstance(swapped, Refuse) and swapped.code is ErrorCode.AMOUNT_MISMATCH


def test_no_second_debit_after_one_succeeded(funded: Relay) -> None:
    funded.debit(1000, funded.initialize_purchase(1000))
    again = funded.debit(1000, funded.initialize_purchase(1000))
    assert isinstance(again, Refuse) and again.code is ErrorCode.ALREADY_DONE
    assert funded.card.state.balance == 4000


def test_no_second_debit_after_one_whose_outcome_is_unknown(funded: Relay) -> None:
    init = funded.initialize_purchase(1000)
    debit = funded.terminal.debit_apdu(1000, ResponseApdu.from_bytes(init))
    assert isinstance(funded.guard.check(debit), Ask)
    funded.guard.decide(ConsentRequest(Kind.PURCHASE, 1000, ORIGIN), True)
    funded.guard.sent(debit, None)  # sent, the answer lost
    again = funded.debit(1000, funded.initialize_purchase(1000))
    assert isinstance(again, Refuse) and again.code is ErrorCode.ALREADY_DONE


def test_debit_needs_an_initialize_directly_before(funded: Relay) -> None:
    init = funded.initialize_purchase(1000)
    funded.send(cmd.GetBalance().to_apdu().to_bytes())  # cancels the card's pending INITIALIZE
    late = funded.debit(1000, init)
    zero = funded.debit(0, funded.initialize_purchase(0))
    orphan = Relay().debit(1000, init)
    for refusal in (late, zero, orphan):
        assert isinstance(refusal, Refuse) and refusal.code is ErrorCode.NO_INITIALIZE
    assert funded.asked == []


def test_a_failed_initialize_starts_nothing() -> None:
    relay = Relay()  # balance 0: INITIALIZE FOR PURCHASE answers 9401
    relay.send(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes())
    answer = relay.send(cmd.InitializeForPurchase(1, 1000, TERMINAL).to_apdu().to_bytes())
    assert answer == b"\x94\x01"
    debit = cmd.DebitForPurchase(1, WHEN[0], WHEN[1], b"\x00" * 4).to_apdu().to_bytes()
    refusal = relay.send(debit)
    assert isinstance(refusal, Refuse) and refusal.code is ErrorCode.NO_INITIALIZE


def test_loads_are_shown_and_confirmed_too() -> None:
    relay = Relay()
    relay.send(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes())
    init = relay.send(cmd.InitializeForLoad(1, 2500, TERMINAL).to_apdu().to_bytes())
    assert isinstance(init, bytes)
    answer = relay.send(relay.terminal.credit_apdu(2500, ResponseApdu.from_bytes(init)))
    assert isinstance(answer, bytes) and answer[-2:] == b"\x90\x00"
    assert relay.asked == [ConsentRequest(Kind.LOAD, 2500, ORIGIN, "Order 42")]


@pytest.mark.parametrize(
    "apdu",
    [
        "0020000002123F",  # VERIFY: the merchant never handles the PIN
        "00D6950004DEADBEEF",  # UPDATE BINARY
        "00C0000008",  # GET RESPONSE: the reader backend's business
        "84E4000000",
        "80",  # not an APDU
        "805C00020400",  # Lc that does not match
    ],
)
def test_only_e_purse_commands_are_relayed(apdu: str) -> None:
    verdict = Guard(ORIGIN).check(bytes.fromhex(apdu))
    assert isinstance(verdict, Refuse) and verdict.code is ErrorCode.APDU_NOT_ALLOWED


def test_amount_text_is_yuan() -> None:
    assert ConsentRequest(Kind.PURCHASE, 123456, ORIGIN).amount_text == "¥1,234.56"


def select() -> bytes:
    return cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes()


@pytest.mark.parametrize(
    "apdu",
    [
        "00A4040007A0000003330101",  # another application (a PBOC debit/credit AID)
        "00A40400" + "0E" + cmd.PSE_NAME.hex(),  # the payment system directory
        "00A40000023F00",  # the MF by file id
        "00A40000021001",  # the e-purse DF, but by file id
    ],
)
def test_only_the_e_purse_application_is_selected(apdu: str) -> None:
    verdict = Guard(ORIGIN).check(bytes.fromhex(apdu))
    assert isinstance(verdict, Refuse) and verdict.code is ErrorCode.APDU_NOT_ALLOWED


def test_nothing_is_read_before_the_e_purse_is_selected_on_this_card(funded: Relay) -> None:
    read = cmd.ReadBinary(cmd.SFI_ISSUER).to_apdu().to_bytes()
    balance = cmd.GetBalance().to_apdu().to_bytes()
    fresh = Guard(ORIGIN)
    for apdu in (read, balance):
        verdict = fresh.check(apdu)
        assert isinstance(verdict, Refuse) and verdict.code is ErrorCode.APDU_NOT_ALLOWED
    funded.send(select())
    assert isinstance(funded.guard.check(read), Allow)
    funded.guard.card_changed()  # the card left the field: whatever is selected now, not EP
    assert isinstance(funded.guard.check(read), Refuse)


@pytest.mark.parametrize(
    ("apdu", "sfi"),
    [
        (cmd.ReadBinary(cmd.SFI_CARDHOLDER).to_apdu().to_bytes(), cmd.SFI_CARDHOLDER),
        (cmd.ReadRecord(cmd.SFI_LOG, 1).to_apdu().to_bytes(), cmd.SFI_LOG),
    ],
)
def test_the_holder_file_and_the_log_need_the_shoppers_separate_consent(
    apdu: bytes, sfi: int
) -> None:
    relay = Relay(consent=False)
    relay.send(select())
    first = relay.send(apdu)
    second = relay.send(apdu)
    for refusal in (first, second):
        assert isinstance(refusal, Refuse) and refusal.code is ErrorCode.SHARE_REFUSED
    assert relay.asked == [ConsentRequest(Kind.SHARE, 0, ORIGIN, "Order 42", files=(sfi,))]
    agreed = Relay(consent=True)
    agreed.send(select())
    assert isinstance(agreed.send(apdu), bytes) and isinstance(agreed.send(apdu), bytes)
    assert len(agreed.asked) == 1  # remembered for this session


@pytest.mark.parametrize(
    "apdu",
    [
        cmd.ReadBinary(0x01).to_apdu().to_bytes(),
        cmd.ReadBinary(0x17).to_apdu().to_bytes(),
        cmd.ReadRecord(cmd.SFI_ISSUER, 1).to_apdu().to_bytes(),
        cmd.ReadRecord(0x01, 1).to_apdu().to_bytes(),
        "805C000104",  # GET BALANCE of the e-deposit
    ],
)
def test_no_other_file_is_read(apdu: bytes | str) -> None:
    raw = bytes.fromhex(apdu) if isinstance(apdu, str) else apdu
    relay = Relay()
    relay.send(select())
    refusal = relay.send(raw)
    assert isinstance(refusal, Refuse) and refusal.code is ErrorCode.APDU_NOT_ALLOWED
    assert relay.asked == []
