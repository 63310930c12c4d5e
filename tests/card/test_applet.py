"""Every command's success path and every status word it can return (spec §3, §5)."""

from __future__ import annotations

import dataclasses

import pytest

from tests.card.support import TERMINAL, Terminal, make_card, make_state
from webpurse.card import CardApplet, StoreError
from webpurse.card.state import CardState
from webpurse.protocol import commands as cmd
from webpurse.protocol.apdu import ResponseApdu
from webpurse.protocol.records import IssuerData, LogRecord


def sw(response: ResponseApdu) -> int:
    return response.sw


@pytest.fixture
def term() -> Terminal:
    return Terminal(make_card())


@pytest.fixture
def loaded() -> Terminal:
    t = Terminal(make_card())
    assert t.load(10_000).ok
    return t


def hexsend(t: Terminal, text: str) -> ResponseApdu:
    return t.send(bytes.fromhex(text.replace(" ", "")))


# --- SELECT ---------------------------------------------------------------------------


def test_select_pse_and_directory(term: Terminal) -> None:
    fci = term.send(cmd.Select(name=cmd.PSE_NAME).to_apdu())
    assert fci.ok and cmd.PSE_NAME in fci.data
    directory = term.send(cmd.ReadRecord(cmd.SFI_DIRECTORY, 1).to_apdu())
    assert directory.ok and cmd.EP_AID in directory.data
    assert sw(term.send(cmd.ReadRecord(cmd.SFI_DIRECTORY, 2).to_apdu())) == 0x6A83


def test_select_ep_by_aid_and_by_fid(term: Terminal) -> None:
    assert cmd.EP_AID in term.select().data
    assert term.send(cmd.Select(fid=cmd.EP_FID).to_apdu()).ok
    assert term.send(cmd.Select(fid=cmd.MF_FID).to_apdu()).ok


@pytest.mark.parametrize(
    ("apdu", "status"),
    [
        ("00A4040005A000000099 00", 0x6A82),  # unknown AID
        ("00A4000002200100", 0x6A82),  # unknown FID
        ("00A4020002100100", 0x6A86),  # P1 not supported
        ("00A40000031001FF00", 0x6700),  # FID of 3 bytes
        ("80A4000002100100", 0x6E00),  # wrong class
        ("00A4000005100100", 0x6700),  # Lc says 5, 2 follow (+Le)
    ],
)
def test_select_refusals(term: Terminal, apdu: str, status: int) -> None:
    assert sw(hexsend(term, apdu)) == status


# --- READ BINARY / READ RECORD ---------------------------------------------------------


def test_read_binary_issuer_and_cardholder(term: Terminal) -> None:
    term.select()
    ef15 = term.send(cmd.ReadBinary(cmd.SFI_ISSUER).to_apdu())
    assert ef15.ok and IssuerData.from_bytes(ef15.data).serial == term.card.state.serial
    assert len(term.send(cmd.ReadBinary(cmd.SFI_CARDHOLDER).to_apdu()).data) == 55
    part = term.send(cmd.ReadBinary(cmd.SFI_ISSUER, offset=10, le=10).to_apdu())
    assert part.data == term.card.state.serial


@pytest.mark.parametrize(
    ("apdu", "status"),
    [
        ("00B0950020", 0x6C1E),  # Le 32 > 30 available: 6Cxx with the size
        ("00B0970000", 0x6A82),  # SFI 0x17 does not exist
        ("00B0151F00", 0x6A86),  # not an SFI read
        ("00B0951F00", 0x6A86),  # offset beyond the file
        ("00B09500020000", 0x6700),  # data where none is allowed
    ],
)
def test_read_binary_refusals(term: Terminal, apdu: str, status: int) -> None:
    term.select()
    assert sw(hexsend(term, apdu)) == status


def test_read_binary_needs_the_application(term: Terminal) -> None:
    assert sw(term.send(cmd.ReadBinary(cmd.SFI_ISSUER).to_apdu())) == 0x6A82


def test_read_record_log_newest_first_and_cyclic(loaded: Terminal) -> None:
    for amount in range(1, 13):
        assert loaded.purchase(amount).ok
    log = [
        LogRecord.from_bytes(loaded.send(cmd.ReadRecord(cmd.SFI_LOG, n).to_apdu()).data)
        for n in range(1, 11)
    ]
    assert [r.amount for r in log] == list(range(12, 2, -1))
    assert [r.counter for r in log] == list(range(11, 1, -1))
    assert all(r.transaction_type == 0x06 and r.terminal_id == TERMINAL for r in log)
    assert sw(loaded.send(cmd.ReadRecord(cmd.SFI_LOG, 11).to_apdu())) == 0x6A83
    assert sw(hexsend(loaded, "00B201C418")) == 0x6C17  # 23 bytes available
    assert sw(hexsend(loaded, "00B201C300")) == 0x6A86
    assert sw(hexsend(loaded, "00B201BC00")) == 0x6A82  # SFI 0x17


def test_read_record_empty_log(term: Terminal) -> None:
    term.select()
    assert sw(term.send(cmd.ReadRecord(cmd.SFI_LOG, 1).to_apdu())) == 0x6A83


# --- GET BALANCE ------------------------------------------------------------------------


def test_get_balance(loaded: Terminal) -> None:
    answer = loaded.send(cmd.GetBalance().to_apdu())
    assert answer.ok and int.from_bytes(answer.data, "big") == 10_000
    assert sw(hexsend(loaded, "805C000104")) == 0x6A86
    assert sw(hexsend(loaded, "805C00020100")) == 0x6700


def test_get_balance_needs_the_application(term: Terminal) -> None:
    assert sw(term.send(cmd.GetBalance().to_apdu())) == 0x6985


# --- LOAD -------------------------------------------------------------------------------


def test_load_success_updates_everything(term: Terminal) -> None:
    before = term.card.state
    term.select()
    init = term.initialize_load(2_500)
    parsed = cmd.InitializeForLoadResponse.from_data(init.data)
    assert (parsed.balance, parsed.online_counter, parsed.key_version, parsed.algorithm_id) == (
        0,
        0,
        1,
        0,
    )
    credit = term.send(term.credit_apdu(2_500, init))
    assert credit.ok and len(credit.data) == 4
    after = term.card.state
    assert after.balance == before.balance + 2_500
    assert after.online_counter == 1 and after.offline_counter == 0
    assert after.log[0].amount == 2_500 and after.log[0].counter == 0
    assert after.load_proof is not None and after.load_proof.tac == credit.data


def test_load_refusals(term: Terminal) -> None:
    term.select()
    assert sw(term.initialize_load(100, key_index=7)) == 0x9403
    assert sw(term.initialize_load(100_001)) == 0x6A80  # over the maximum balance
    assert sw(hexsend(term, "805000010B0100000064001122334455 10")) == 0x6A86  # P2 01 = ED
    assert sw(hexsend(term, "805000020A01000000640011223344 10")) == 0x6700


def test_credit_without_initialize_or_after_amount_zero(term: Terminal) -> None:
    term.select()
    init = term.initialize_load(100)
    credit = term.credit_apdu(100, init)
    term.send(cmd.GetBalance().to_apdu())  # any other command cancels the pending load
    assert sw(term.send(credit)) == 0x6985
    zero = term.initialize_load(0)
    assert zero.ok
    assert sw(term.send(term.credit_apdu(0, zero))) == 0x6985
    assert term.card.state.balance == 0 and term.card.state.online_counter == 0


def test_credit_with_a_wrong_mac2(term: Terminal) -> None:
    term.select()
    init = term.initialize_load(100)
    assert sw(term.send(term.credit_apdu(100, init, forge=True))) == 0x9302
    assert term.card.state.balance == 0 and term.card.state.mac_failures == 1


def test_credit_refusals(term: Terminal) -> None:
    term.select()
    term.initialize_load(100)
    assert sw(hexsend(term, "805200000A2011122121482200000004")) == 0x6700
    term.initialize_load(100)
    assert sw(hexsend(term, "805201000B20111221214822AABBCCDD04")) == 0x6A86
    term.initialize_load(100)
    assert sw(hexsend(term, "805200000B2011AA21214822AABBCCDD04")) == 0x6A80  # not BCD


def test_pin_protected_load(term: Terminal) -> None:
    card = make_card(make_state(pin=bytes.fromhex("123456"), pin_required_for_load=True))
    t = Terminal(card)
    t.select()
    assert sw(t.initialize_load(100)) == 0x6982
    assert t.send(cmd.Verify.from_digits("123456").to_apdu()).ok
    assert t.initialize_load(100).ok


# --- PURCHASE ---------------------------------------------------------------------------


def test_purchase_success_updates_everything(loaded: Terminal) -> None:
    loaded.select()
    init = loaded.initialize_purchase(1_250)
    parsed = cmd.InitializeForPurchaseResponse.from_data(init.data)
    assert (parsed.balance, parsed.offline_counter) == (10_000, 0)
    debit = loaded.send(loaded.debit_apdu(1_250, init))
    assert debit.ok
    result = cmd.DebitForPurchaseResponse.from_data(debit.data)
    state = loaded.card.state
    assert state.balance == 8_750 and state.offline_counter == 1 and state.online_counter == 1
    assert state.purchase_proof is not None
    assert (state.purchase_proof.tac, state.purchase_proof.mac2) == (result.tac, result.mac2)


def test_purchase_refusals(loaded: Terminal) -> None:
    loaded.select()
    assert sw(loaded.initialize_purchase(10_001)) == 0x9401
    assert sw(loaded.send(loaded.debit_apdu(10_001, loaded.initialize_purchase(1)))) == 0x9302
    assert sw(loaded.initialize_purchase(1, key_index=2)) == 0x9403
    # 9401 leaves nothing pending
    loaded.initialize_purchase(10_001)
    assert sw(hexsend(loaded, "805401000F0000000120261127103000AABBCCDD08")) == 0x6985
    zero = loaded.initialize_purchase(0)
    assert zero.ok
    assert sw(loaded.send(loaded.debit_apdu(0, zero))) == 0x6985
    loaded.initialize_purchase(1)
    assert sw(hexsend(loaded, "805402000F0000000120261127103000AABBCCDD08")) == 0x6A86
    loaded.initialize_purchase(1)
    assert sw(hexsend(loaded, "805401000E00000001202611271030AABBCCDD08")) == 0x6700
    assert loaded.card.state.balance == 10_000 and loaded.card.state.offline_counter == 0


def test_counters_at_their_maximum() -> None:
    state = dataclasses.replace(
        make_state(), online_counter=0xFFFF, offline_counter=0xFFFF, balance=10
    )
    t = Terminal(make_card(state))
    t.select()
    assert sw(t.initialize_load(1)) == 0x9402
    assert sw(t.initialize_purchase(1)) == 0x9402


def test_blocked_application() -> None:
    t = Terminal(make_card(dataclasses.replace(make_state(), blocked=True)))
    assert t.select().ok
    assert sw(t.initialize_load(1)) == 0x6A81
    assert sw(t.initialize_purchase(0)) == 0x6A81


def test_ten_mac_failures_lock_the_application(loaded: Terminal) -> None:
    loaded.select()
    for _ in range(9):
        assert (
            sw(loaded.send(loaded.debit_apdu(1, loaded.initialize_purchase(1), forge=True)))
            == 0x9302
        )
    # a success resets the count
    assert loaded.send(loaded.debit_apdu(1, loaded.initialize_purchase(1))).ok
    assert loaded.card.state.mac_failures == 0
    for _ in range(10):
        assert (
            sw(loaded.send(loaded.debit_apdu(1, loaded.initialize_purchase(1), forge=True)))
            == 0x9302
        )
    assert loaded.card.state.locked
    assert sw(loaded.initialize_purchase(1)) == 0x9303
    assert sw(loaded.initialize_load(1)) == 0x9303
    assert loaded.card.state.balance == 9_999


# --- GET TRANSACTION PROVE ----------------------------------------------------------------


def test_transaction_proof_survives_a_new_initialize(loaded: Terminal) -> None:
    loaded.select()
    debit = loaded.send(loaded.debit_apdu(300, loaded.initialize_purchase(300)))
    tac, mac2 = debit.data[:4], debit.data[4:]
    assert loaded.initialize_purchase(0).ok  # recovery reads the counter
    counter = loaded.card.state.offline_counter
    proof = loaded.send(cmd.GetTransactionProve(0x06, counter).to_apdu())
    assert proof.ok and proof.data == mac2 + tac  # MAC2 first here, the reverse of DEBIT
    load_proof = loaded.send(cmd.GetTransactionProve(0x02, 1).to_apdu())
    assert load_proof.ok and load_proof.data[4:] == loaded.card.state.load_proof.tac  # type: ignore[union-attr]


def test_transaction_proof_refusals(loaded: Terminal, term: Terminal) -> None:
    loaded.select()
    assert sw(loaded.send(cmd.GetTransactionProve(0x06, 1).to_apdu())) == 0x9406  # no purchase yet
    assert sw(loaded.send(cmd.GetTransactionProve(0x02, 2).to_apdu())) == 0x9406  # wrong counter
    assert sw(loaded.send(cmd.GetTransactionProve(0x01, 0).to_apdu())) == 0x9406  # ED: no proof
    assert sw(hexsend(loaded, "805A000302000108")) == 0x6A86
    assert sw(hexsend(loaded, "805A00060100 08")) == 0x6700
    assert sw(term.send(cmd.GetTransactionProve(0x02, 0).to_apdu())) == 0x6985  # not selected


# --- VERIFY -----------------------------------------------------------------------------


def test_verify_pin_counts_down_and_blocks() -> None:
    t = Terminal(make_card(make_state(pin=bytes.fromhex("123456"))))
    t.select()
    wrong = cmd.Verify.from_digits("000000").to_apdu()
    assert sw(t.send(wrong)) == 0x63C2
    assert t.send(cmd.Verify.from_digits("123456").to_apdu()).ok  # resets the tries
    assert [sw(t.send(wrong)) for _ in range(4)] == [0x63C2, 0x63C1, 0x63C0, 0x6983]
    assert sw(t.send(cmd.Verify.from_digits("123456").to_apdu())) == 0x6983
    assert sw(hexsend(t, "0020000103123456")) == 0x6A86
    assert sw(hexsend(t, "002000000112")) == 0x6700


def test_verify_without_a_pin(term: Terminal) -> None:
    term.select()
    assert sw(term.send(cmd.Verify.from_digits("1234").to_apdu())) == 0x6985


# --- class, instruction, memory --------------------------------------------------------------


@pytest.mark.parametrize(
    ("apdu", "status"),
    [("80CA000000", 0x6D00), ("90A4000002100100", 0x6E00), ("005C000204", 0x6E00), ("", 0x6700)],
)
def test_unknown_instruction_and_class(term: Terminal, apdu: str, status: int) -> None:
    assert sw(hexsend(term, apdu)) == status


class FailingStore:
    def save(self, state: CardState) -> None:
        raise StoreError("disk full")


def test_a_failed_write_answers_6581_and_keeps_the_old_state() -> None:
    state = dataclasses.replace(make_state(), balance=500)
    card = CardApplet(state, FailingStore(), lambda n: bytes(n))
    t = Terminal(card)
    t.select()
    init = t.initialize_purchase(100)
    assert sw(t.send(t.debit_apdu(100, init))) == 0x6581
    assert card.state == state


def test_reset_forgets_the_pending_transaction(loaded: Terminal) -> None:
    loaded.select()
    init = loaded.initialize_purchase(100)
    loaded.card.reset()
    loaded.select()
    assert sw(loaded.send(loaded.debit_apdu(100, init))) == 0x6985
