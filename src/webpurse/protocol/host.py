"""What a PSAM does for the terminal: the host side of spec §4.

In webpurse these run inside the settlement server's security module; visible pass card
keys (already diversified) and the values the card returned from INITIALIZE. Every
``verify_*`` compares in constant time and returns a bool; deciding what to do about a
``False`` is the caller's business.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from typing import Concatenate, ParamSpec

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

P = ParamSpec("P")


def _when(date: dt.date, time: dt.time) -> bytes:
    """Date and time as BCD (kept for a plain date and a naive time: a batch's purchases
    share one date and time). Not for an aware time or a datetime as the date: one equals
    another zone's, whose digits differ (12:00+01:00 == 11:00Z), so a kept answer would
    be another value's BCD."""
    if type(date) is dt.date and type(time) is dt.time and time.tzinfo is None:
        return _when_naive(date, time)
    return encode_bcd_date(date) + encode_bcd_time(time)


@functools.lru_cache(maxsize=256)
def _when_naive(date: dt.date, time: dt.time) -> bytes:
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


# --- checks: each recomputes and compares in constant time ----------------------------


def _verifier(
    compute: Callable[Concatenate[bytes, P], bytes],
) -> Callable[Concatenate[bytes, bytes, P], bool]:
    """``verify(key, given, **fields)``: ``compute(key, **fields)`` equals ``given``,
    compared in constant time."""

    def verify(key: bytes, given: bytes, /, *args: P.args, **kwargs: P.kwargs) -> bool:
        return macs_equal(compute(key, *args, **kwargs), given)

    verify.__name__ = verify.__qualname__ = f"verify_{compute.__name__}"
    verify.__doc__ = f"Whether the card's value is {compute.__name__}(key, **fields)."
    return verify


verify_purchase_mac2 = _verifier(purchase_mac2)
verify_purchase_tac = _verifier(purchase_tac)
verify_load_mac1 = _verifier(load_mac1)
verify_load_tac = _verifier(load_tac)
