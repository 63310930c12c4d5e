"""The card's kept ciphers (``webpurse.card.macs``) compute what ``protocol.host`` does."""

from __future__ import annotations

import datetime as dt

from hypothesis import given, settings
from hypothesis import strategies as st

from webpurse.card.macs import CardCiphers
from webpurse.protocol import host
from webpurse.protocol.cipher import DES_SUITE, SINGLE_DES, TRIPLE_DES, CipherSuite

keys = st.binary(min_size=16, max_size=16)
dates = st.dates(min_value=dt.date(2000, 1, 1), max_value=dt.date(2099, 12, 31))
times = st.times()


@settings(max_examples=200, deadline=None)
@given(
    dpk=keys,
    dtk=keys,
    random=st.binary(min_size=4, max_size=4),
    offline_counter=st.integers(0, 0xFFFF),
    terminal_seq=st.integers(0, 0xFFFFFFFF),
    amount=st.integers(0, 0xFFFFFFFF),
    terminal_id=st.binary(min_size=6, max_size=6),
    date=dates,
    time=times,
)
def test_purchase_macs_and_tac_are_host_s(
    dpk: bytes,
    dtk: bytes,
    random: bytes,
    offline_counter: int,
    terminal_seq: int,
    amount: int,
    terminal_id: bytes,
    date: dt.date,
    time: dt.time,
) -> None:
    time = time.replace(microsecond=0)
    ciphers = CardCiphers()
    for _ in range(2):  # the second time through the kept ciphers
        mac1, mac2 = ciphers.purchase_macs(
            DES_SUITE,
            dpk,
            random=random,
            offline_counter=offline_counter,
            terminal_seq=terminal_seq,
            amount=amount,
            terminal_id=terminal_id,
            date=date,
            time=time,
        )
        session = {
            "random": random,
            "offline_counter": offline_counter,
            "terminal_seq": terminal_seq,
            "amount": amount,
        }
        assert mac1 == host.purchase_mac1(
            dpk, **session, terminal_id=terminal_id, date=date, time=time
        )
        assert mac2 == host.purchase_mac2(dpk, **session)
        tac = ciphers.purchase_tac(
            DES_SUITE,
            dtk,
            amount=amount,
            terminal_id=terminal_id,
            terminal_seq=terminal_seq,
            date=date,
            time=time,
        )
        assert tac == host.purchase_tac(
            dtk,
            amount=amount,
            terminal_id=terminal_id,
            terminal_seq=terminal_seq,
            date=date,
            time=time,
        )


def test_fast_only_for_the_des_suite_and_16_byte_keys() -> None:
    assert CardCiphers.fast(DES_SUITE, bytes(16), bytes(16))
    assert not CardCiphers.fast(DES_SUITE, bytes(8))
    assert not CardCiphers.fast(DES_SUITE, bytes(24))
    other = CipherSuite("other", TRIPLE_DES, SINGLE_DES)  # equal ciphers, not the suite
    assert not CardCiphers.fast(other, bytes(16))
