"""A refusal's reason comes from the status table of the command the card refused (spec §5)."""

from __future__ import annotations

import pytest

from webpurse.merchant.flows import CardRefused, read_first_contact, read_recovery
from webpurse.merchant.settlement import Kind
from webpurse.protocol.apdu import ResponseApdu

OK = ResponseApdu(b"", 0x9000)


def _refusal(kind: Kind, responses: list[ResponseApdu]) -> CardRefused:
    with pytest.raises(CardRefused) as refused:
        read_first_contact(kind, responses)
    return refused.value


def test_6a80_from_initialize_for_load_is_the_balance_limit() -> None:
    refused = _refusal(
        Kind.LOAD, [OK, ResponseApdu(b"\x00" * 30, 0x9000), ResponseApdu(b"", 0x6A80)]
    )
    assert (refused.sw, refused.reason) == (0x6A80, "balance_limit")


def test_6a80_from_another_command_is_no_balance_limit() -> None:
    assert _refusal(Kind.PAYMENT, [ResponseApdu(b"", 0x6A80)]).reason == "card_error"
    assert _refusal(Kind.PAYMENT, [OK, ResponseApdu(b"", 0x6A80)]).reason == "card_error"
    refused = _refusal(
        Kind.PAYMENT, [OK, ResponseApdu(b"\x00" * 30, 0x9000), ResponseApdu(b"", 0x6A80)]
    )
    assert refused.reason == "card_error"


def test_the_reasons_a_shopper_can_act_on_stay_the_same() -> None:
    issuer = ResponseApdu(b"\x00" * 30, 0x9000)
    assert _refusal(Kind.PAYMENT, [ResponseApdu(b"", 0x6A82)]).reason == "not_an_epurse"
    assert _refusal(Kind.PAYMENT, [ResponseApdu(b"", 0x9303)]).reason == "card_blocked"
    purchase = [OK, issuer, ResponseApdu(b"", 0x9401)]
    assert _refusal(Kind.PAYMENT, purchase).reason == "insufficient_funds"
    load = [OK, issuer, ResponseApdu(b"", 0x9403)]
    assert _refusal(Kind.LOAD, load).reason == "key_not_supported"


def test_a_prove_refusal_is_read_through_prove_s_table() -> None:
    with pytest.raises(CardRefused) as refused:
        read_recovery([ResponseApdu(b"\x00" * 15, 0x9000), ResponseApdu(b"", 0x6A80)])
    assert refused.value.reason == "card_error"
    assert read_recovery([ResponseApdu(b"i", 0x9000), ResponseApdu(b"", 0x9406)]) == (b"i", None)
