"""What a PSAM does for the terminal: the host side of spec §4.

In webpurse these run inside the settlement server's security module; callers pass card
keys (already diversified) and the values the card returned from INITIALIZE. Every
``verify_*`` compares in constant time and returns a bool; deciding what to do about a
``False`` is the caller's business.
"""

from __future__ import annotations

import datetime as dt

from webpurse.protocol.cipher import DES_SUITE, CipherSuite
from webpurse.protocol.crypto import (
    load_session_key,
    mac,
    macs_equal,
    purchase_session_key,
    tac_key,
)
from webpurse.protocol.records import TransactionType, encode_bcd_date, encode_bcd_time

PURCHASE = TransactionType.EP_PURCHASE
LOAD = TransactionType.EP_LOAD


def _when(date: dt.date, time: dt.time) -> bytes:
    return encode_bcd_date(date) + encode_bcd_time(time)


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


# --- what each MAC covers (spec §4): shared with any security module ------------------


def purchase_mac1_data(
    *,
    amount: int,
    terminal_id: bytes,
    date: dt.date,
    time: dt.time,
    transaction_type: int = PURCHASE,
) -> bytes:
    """MAC1 for DEBIT FOR PURCHASE covers amount || type || terminal || date || time."""
    return _u32(amount) + bytes((transaction_type,)) + terminal_id + _when(date, time)


def purchase_mac2_data(*, amount: int) -> bytes:
    """MAC2 after a debit covers the amount."""
    return _u32(amount)


def purchase_tac_data(
    *,
    amount: int,
    terminal_id: bytes,
    terminal_seq: int,
    date: dt.date,
    time: dt.time,
    transaction_type: int = PURCHASE,
) -> bytes:
    """The purchase TAC covers amount || type || terminal || terminal seq || date || time."""
    return (
        _u32(amount)
        + bytes((transaction_type,))
        + terminal_id
        + _u32(terminal_seq)
        + _when(date, time)
    )


def load_mac1_data(
    *, balance: int, amount: int, terminal_id: bytes, transaction_type: int = LOAD
) -> bytes:
    """MAC1 from INITIALIZE FOR LOAD covers old balance || amount || type || terminal."""
    return _u32(balance) + _u32(amount) + bytes((transaction_type,)) + terminal_id


def load_mac2_data(
    *,
    amount: int,
    terminal_id: bytes,
    date: dt.date,
    time: dt.time,
    transaction_type: int = LOAD,
) -> bytes:
    """MAC2 for CREDIT FOR LOAD covers amount || type || terminal || date || time."""
    return _u32(amount) + bytes((transaction_type,)) + terminal_id + _when(date, time)


def load_tac_data(
    *,
    new_balance: int,
    online_counter: int,
    amount: int,
    terminal_id: bytes,
    date: dt.date,
    time: dt.time,
    transaction_type: int = LOAD,
) -> bytes:
    """The load TAC covers new balance || online counter (before +1) || amount || type ||
    terminal || date || time."""
    return (
        _u32(new_balance)
        + online_counter.to_bytes(2, "big")
        + _u32(amount)
        + bytes((transaction_type,))
        + terminal_id
        + _when(date, time)
    )


# --- purchase -----------------------------------------------------------------------


def purchase_mac1(
    dpk: bytes,
    *,
    random: bytes,
    offline_counter: int,
    terminal_seq: int,
    amount: int,
    terminal_id: bytes,
    date: dt.date,
    time: dt.time,
    transaction_type: int = PURCHASE,
    suite: CipherSuite = DES_SUITE,
) -> bytes:
    """MAC1 for DEBIT FOR PURCHASE: amount || type || terminal || date || time."""
    key = purchase_session_key(dpk, random, offline_counter, terminal_seq, suite)
    data = purchase_mac1_data(
        amount=amount,
        terminal_id=terminal_id,
        date=date,
        time=time,
        transaction_type=transaction_type,
    )
    return mac(key, data, suite)


def purchase_mac2(
    dpk: bytes,
    *,
    random: bytes,
    offline_counter: int,
    terminal_seq: int,
    amount: int,
    suite: CipherSuite = DES_SUITE,
) -> bytes:
    """MAC2 the card returns after a debit: MAC over the amount."""
    key = purchase_session_key(dpk, random, offline_counter, terminal_seq, suite)
    return mac(key, purchase_mac2_data(amount=amount), suite)


def verify_purchase_mac2(
    dpk: bytes,
    mac2: bytes,
    *,
    random: bytes,
    offline_counter: int,
    terminal_seq: int,
    amount: int,
    suite: CipherSuite = DES_SUITE,
) -> bool:
    expected = purchase_mac2(
        dpk,
        random=random,
        offline_counter=offline_counter,
        terminal_seq=terminal_seq,
        amount=amount,
        suite=suite,
    )
    return macs_equal(expected, mac2)


def purchase_tac(
    dtk: bytes,
    *,
    amount: int,
    terminal_id: bytes,
    terminal_seq: int,
    date: dt.date,
    time: dt.time,
    transaction_type: int = PURCHASE,
    suite: CipherSuite = DES_SUITE,
) -> bytes:
    """Purchase TAC: amount || type || terminal || terminal seq || date || time."""
    data = purchase_tac_data(
        amount=amount,
        terminal_id=terminal_id,
        terminal_seq=terminal_seq,
        date=date,
        time=time,
        transaction_type=transaction_type,
    )
    return mac(tac_key(dtk), data, suite)


def verify_purchase_tac(
    dtk: bytes,
    tac: bytes,
    *,
    amount: int,
    terminal_id: bytes,
    terminal_seq: int,
    date: dt.date,
    time: dt.time,
    transaction_type: int = PURCHASE,
    suite: CipherSuite = DES_SUITE,
) -> bool:
    expected = purchase_tac(
        dtk,
        amount=amount,
        terminal_id=terminal_id,
        terminal_seq=terminal_seq,
        date=date,
        time=time,
        transaction_type=transaction_type,
        suite=suite,
    )
    return macs_equal(expected, tac)


# --- load ---------------------------------------------------------------------------


def load_mac1(
    dlk: bytes,
    *,
    random: bytes,
    online_counter: int,
    balance: int,
    amount: int,
    terminal_id: bytes,
    transaction_type: int = LOAD,
    suite: CipherSuite = DES_SUITE,
) -> bytes:
    """MAC1 the card returns from INITIALIZE FOR LOAD: old balance || amount || type || terminal."""
    key = load_session_key(dlk, random, online_counter, suite)
    data = load_mac1_data(
        balance=balance, amount=amount, terminal_id=terminal_id, transaction_type=transaction_type
    )
    return mac(key, data, suite)


def verify_load_mac1(
    dlk: bytes,
    mac1: bytes,
    *,
    random: bytes,
    online_counter: int,
    balance: int,
    amount: int,
    terminal_id: bytes,
    transaction_type: int = LOAD,
    suite: CipherSuite = DES_SUITE,
) -> bool:
    expected = load_mac1(
        dlk,
        random=random,
        online_counter=online_counter,
        balance=balance,
        amount=amount,
        terminal_id=terminal_id,
        transaction_type=transaction_type,
        suite=suite,
    )
    return macs_equal(expected, mac1)


def load_mac2(
    dlk: bytes,
    *,
    random: bytes,
    online_counter: int,
    amount: int,
    terminal_id: bytes,
    date: dt.date,
    time: dt.time,
    transaction_type: int = LOAD,
    suite: CipherSuite = DES_SUITE,
) -> bytes:
    """MAC2 for CREDIT FOR LOAD: amount || type || terminal || date || time."""
    key = load_session_key(dlk, random, online_counter, suite)
    data = load_mac2_data(
        amount=amount,
        terminal_id=terminal_id,
        date=date,
        time=time,
        transaction_type=transaction_type,
    )
    return mac(key, data, suite)


def load_tac(
    dtk: bytes,
    *,
    new_balance: int,
    online_counter: int,
    amount: int,
    terminal_id: bytes,
    date: dt.date,
    time: dt.time,
    transaction_type: int = LOAD,
    suite: CipherSuite = DES_SUITE,
) -> bytes:
    """Load TAC: new balance || online counter (before +1) || amount || type || terminal || when."""
    data = load_tac_data(
        new_balance=new_balance,
        online_counter=online_counter,
        amount=amount,
        terminal_id=terminal_id,
        date=date,
        time=time,
        transaction_type=transaction_type,
    )
    return mac(tac_key(dtk), data, suite)


def verify_load_tac(
    dtk: bytes,
    tac: bytes,
    *,
    new_balance: int,
    online_counter: int,
    amount: int,
    terminal_id: bytes,
    date: dt.date,
    time: dt.time,
    transaction_type: int = LOAD,
    suite: CipherSuite = DES_SUITE,
) -> bool:
    expected = load_tac(
        dtk,
        new_balance=new_balance,
        online_counter=online_counter,
        amount=amount,
        terminal_id=terminal_id,
        date=date,
        time=time,
        transaction_type=transaction_type,
        suite=suite,
    )
    return macs_equal(expected, tac)
