"""The shop's copy of settlement's status words is settlement's own set.

The shop imports nothing from settlement (the import contracts in pyproject.toml), so it
keeps its own :class:`TxStatus`. A status settlement adds to a payment's or a load's
lifecycle, or renames, must reach the shop too: this test fails until it does.
"""

from __future__ import annotations

from webpurse.merchant.settlement import TxStatus
from webpurse.settlement.transactions.status import TRANSITIONS, Kind


def test_the_shop_knows_every_status_a_payment_or_a_load_can_have() -> None:
    settlement_words = {
        status.value
        for kind in (Kind.PAYMENT, Kind.LOAD)
        for state, moves in TRANSITIONS[kind].items()
        for status in (state, *moves)
    }
    assert {status.value for status in TxStatus} == settlement_words
