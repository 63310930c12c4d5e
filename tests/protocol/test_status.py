"""One status table per command (spec §5): what each answer means for *that* command."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.card.support import make_card
from webpurse.protocol import commands as cmd
from webpurse.protocol import status
from webpurse.protocol.apdu import CommandApdu, ResponseApdu, StatusWord

TERMINAL = bytes.fromhex("112233445566")


def test_6a80_is_a_balance_limit_only_for_initialize_for_load() -> None:
    assert status.INITIALIZE_FOR_LOAD.reason(0x6A80, "card_error") == "balance_limit"
    for table in (status.SELECT, status.READ_BINARY, status.INITIALIZE_FOR_PURCHASE):
        assert table.reason(0x6A80, "card_error") == "card_error"
        assert table.allows(0x6A80)  # a malformed field, for any command


def test_insufficient_funds_and_key_index_belong_to_initialize() -> None:
    assert status.INITIALIZE_FOR_PURCHASE.reason(0x9401, "x") == "insufficient_funds"
    assert not status.INITIALIZE_FOR_LOAD.allows(0x9401)
    assert not status.SELECT.allows(0x9401)
    for table in (status.INITIALIZE_FOR_PURCHASE, status.INITIALIZE_FOR_LOAD):
        assert table.reason(0x9403, "x") == "key_not_supported"
        assert table.reason(0x9402, "x") == "counter_at_maximum"


def test_a_locked_or_blocked_purse_refuses_every_command_as_blocked() -> None:
    tables = (status.SELECT, status.READ_BINARY, status.DEBIT_FOR_PURCHASE, status.CREDIT_FOR_LOAD)
    for table in tables:
        assert table.reason(0x9303, "x") == "card_blocked"
        assert table.reason(0x6A81, "x") == "card_blocked"


def test_a_bad_mac_is_no_shopper_reason_and_9406_is_an_answer_only_for_prove() -> None:
    assert status.DEBIT_FOR_PURCHASE.reason(0x9302, "card_refused") == "card_refused"
    assert status.GET_TRANSACTION_PROVE.answers() == {0x9000, 0x9406}
    assert status.DEBIT_FOR_PURCHASE.answers() == {0x9000}
    assert not status.DEBIT_FOR_PURCHASE.allows(0x9406)


def test_statuses_for_names_initialize_by_p1() -> None:
    load = cmd.InitializeForLoad(1, 100, TERMINAL).to_apdu()
    purchase = cmd.InitializeForPurchase(1, 100, TERMINAL).to_apdu()
    assert cmd.statuses_for(load) is status.INITIALIZE_FOR_LOAD
    assert cmd.statuses_for(purchase) is status.INITIALIZE_FOR_PURCHASE
    prove = cmd.GetTransactionProve(0x06, 3).to_apdu()
    assert cmd.statuses_for(prove) is status.GET_TRANSACTION_PROVE


def test_prove_names_the_counter_after_the_lost_transaction() -> None:
    assert cmd.prove_counter(0) == 1
    assert cmd.prove_counter(41) == 42


def test_apdu_still_exports_the_status_words() -> None:
    assert StatusWord.SUCCESS == 0x9000
    assert status.describe_sw(0x6C10) == "wrong Le, 16 bytes available"


@settings(max_examples=300, deadline=None)
@given(
    ins=st.sampled_from([0xA4, 0xB0, 0xB2, 0x20, 0x5C, 0x50, 0x52, 0x54, 0x5A, 0x00]),
    cla=st.sampled_from([0x00, 0x80]),
    p1=st.integers(0, 255),
    p2=st.integers(0, 255),
    data=st.binary(max_size=20),
)
def test_the_applet_answers_only_what_the_command_table_lists(
    ins: int, cla: int, p1: int, p2: int, data: bytes
) -> None:
    card = make_card()
    card.process(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes())
    raw = CommandApdu(cla, ins, p1, p2, data, 0x00).to_bytes()
    answer = ResponseApdu.from_bytes(card.process(raw))  # the applet asserts the table
    assert cmd.statuses_for(CommandApdu.from_bytes(raw)).allows(answer.sw)
