"""The security module's interface, and every host MAC written once over two primitives.

What settlement asks of its keys is the same whoever holds them: the MAC1 of a purchase,
the MAC2 and TAC a debit returns, the MAC1 of a load, its MAC2, its TAC (spec §4). Each is
"a session MAC under a card key" or "a TAC under the card's TAC key" over data
:mod:`webpurse.protocol.host` lays out. :class:`SecurityModule` computes them all from
those two primitives, so the software keystore (:mod:`.security`) and the PKCS#11 token
(:mod:`.pkcs11`) differ only in where the key is and how the block cipher runs.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod

from webpurse.protocol import host
from webpurse.protocol.crypto import load_session_block, macs_equal, purchase_session_block
from webpurse.protocol.issuance import personalise_with_card_keys
from webpurse.protocol.purse import DEFAULT_MAX_BALANCE, CardState


class SecurityModule(ABC):
    """What settlement asks of its keys. Every method takes the card's serial and key
    version and derives the card key inside; no method returns a key."""

    # --- what a keystore provides ------------------------------------------------------

    @property
    @abstractmethod
    def key_version(self) -> int:
        """The master-key version new cards are issued under."""

    @abstractmethod
    def _card_keys_to_issue(self, serial: bytes) -> tuple[int, dict[str, bytes]]:
        """The current key version and the new card's dpk, dlk and dtk, by kind: the one
        place card keys leave the keystore, into the card being personalised."""

    @abstractmethod
    def _session_mac(
        self, kind: str, serial: bytes, version: int, block: bytes, data: bytes
    ) -> bytes:
        """The MAC of ``data`` under the session key the card key ``kind`` (dpk or dlk)
        makes of ``block`` (spec §4)."""

    @abstractmethod
    def _tac(self, serial: bytes, version: int, data: bytes) -> bytes:
        """The MAC of ``data`` under the card's TAC key (DTK left XOR right, spec §4)."""

    def personalise(
        self,
        serial: bytes,
        *,
        start: dt.date,
        expiry: dt.date | None = None,
        max_balance: int = DEFAULT_MAX_BALANCE,
    ) -> CardState:
        """A new card's state, its card keys diversified from the current master keys."""
        version, keys = self._card_keys_to_issue(serial)
        return personalise_with_card_keys(
            serial,
            dpk=keys["dpk"],
            dlk=keys["dlk"],
            dtk=keys["dtk"],
            start=start,
            expiry=expiry,
            key_version=version,
            max_balance=max_balance,
        )

    # --- purchase ----------------------------------------------------------------------

    def purchase_mac1(
        self,
        serial: bytes,
        key_version: int,
        *,
        random: bytes,
        offline_counter: int,
        terminal_seq: int,
        amount: int,
        terminal_id: bytes,
        date: dt.date,
        time: dt.time,
    ) -> bytes:
        block = purchase_session_block(random, offline_counter, terminal_seq)
        data = host.purchase_mac1_data(amount=amount, terminal_id=terminal_id, date=date, time=time)
        return self._session_mac("dpk", serial, key_version, block, data)

    def verify_purchase_mac2_and_tac(
        self,
        serial: bytes,
        key_version: int,
        *,
        random: bytes,
        offline_counter: int,
        terminal_seq: int,
        amount: int,
        terminal_id: bytes,
        date: dt.date,
        time: dt.time,
        mac2: bytes,
        tac: bytes,
    ) -> bool:
        block = purchase_session_block(random, offline_counter, terminal_seq)
        expected_mac2 = self._session_mac(
            "dpk", serial, key_version, block, host.purchase_mac2_data(amount=amount)
        )
        expected_tac = self._tac(
            serial,
            key_version,
            host.purchase_tac_data(
                amount=amount,
                terminal_id=terminal_id,
                terminal_seq=terminal_seq,
                date=date,
                time=time,
            ),
        )
        # Both checked, always: which one failed is not told by the timing.
        return macs_equal(expected_mac2, mac2) & macs_equal(expected_tac, tac)

    # --- load --------------------------------------------------------------------------

    def verify_load_mac1(
        self,
        serial: bytes,
        key_version: int,
        *,
        random: bytes,
        online_counter: int,
        balance: int,
        amount: int,
        terminal_id: bytes,
        mac1: bytes,
    ) -> bool:
        block = load_session_block(random, online_counter)
        data = host.load_mac1_data(balance=balance, amount=amount, terminal_id=terminal_id)
        return macs_equal(self._session_mac("dlk", serial, key_version, block, data), mac1)

    def load_mac2(
        self,
        serial: bytes,
        key_version: int,
        *,
        random: bytes,
        online_counter: int,
        amount: int,
        terminal_id: bytes,
        date: dt.date,
        time: dt.time,
    ) -> bytes:
        block = load_session_block(random, online_counter)
        data = host.load_mac2_data(amount=amount, terminal_id=terminal_id, date=date, time=time)
        return self._session_mac("dlk", serial, key_version, block, data)

    def verify_load_tac(
        self,
        serial: bytes,
        key_version: int,
        *,
        new_balance: int,
        online_counter: int,
        amount: int,
        terminal_id: bytes,
        date: dt.date,
        time: dt.time,
        tac: bytes,
    ) -> bool:
        data = host.load_tac_data(
            new_balance=new_balance,
            online_counter=online_counter,
            amount=amount,
            terminal_id=terminal_id,
            date=date,
            time=time,
        )
        return macs_equal(self._tac(serial, key_version, data), tac)
