"""The card's purchase MACs and TAC with its key ciphers kept (spec §4), sans-I/O.

The same arithmetic as :mod:`webpurse.protocol.host` (whose ``*_data`` functions say what
each MAC covers), done the way a card does it: the card's own keys (DPK, the TAC key) are
loaded into a cipher once and kept while the applet lives, the purchase session key is
derived once per DEBIT and serves MAC1 and MAC2, each CBC-MAC one call into a kept cipher
(``protocol.cipher.kept_ecb``, ``protocol.crypto.KeptMac``, as the security module's).
``protocol.host`` builds a new cipher for every key and block chain (5 per DEBIT), which
cost the card emulator most of its time (issue 20: the benchmark's client process, card
included, was a third of the machine).

Only for the 3DES/DES suite with 16-byte keys (:meth:`CardCiphers.fast`); for any other
suite or key length the same methods hand the work to ``protocol.host``, so the applet
calls one thing either way. ``tests/card/test_macs.py`` checks both give the same bytes.
"""

from __future__ import annotations

import datetime as dt

from webpurse.protocol import host
from webpurse.protocol.cipher import DES_SUITE, CipherSuite, Encrypt, kept_ecb
from webpurse.protocol.crypto import KeptMac, purchase_session_block, tac_key

_KEPT = 64  # keys kept per applet: a card has a handful; a bound, not a tuning knob


class CardCiphers:
    """One applet's kept ciphers, by key value. Not thread-safe (nor is the applet)."""

    def __init__(self) -> None:
        self._kept: dict[bytes, Encrypt] = {}  # DPK → its 3DES
        self._tac: dict[bytes, KeptMac] = {}  # DTK → the MAC of its TAC key

    @staticmethod
    def fast(suite: CipherSuite, *keys: bytes) -> bool:
        """Whether this module computes what ``protocol.host`` would for these keys."""
        return suite is DES_SUITE and all(len(key) == 16 for key in keys)

    def _encrypt(self, key: bytes) -> Encrypt:
        encrypt = self._kept.get(key)
        if encrypt is None:
            if len(self._kept) >= _KEPT:
                self._kept.clear()
            encrypt = self._kept[key] = kept_ecb(key)
        return encrypt

    def _tac_mac(self, dtk: bytes) -> KeptMac:
        kept = self._tac.get(dtk)
        if kept is None:
            if len(self._tac) >= _KEPT:
                self._tac.clear()
            kept = self._tac[dtk] = KeptMac(tac_key(dtk))
        return kept

    def purchase_macs(
        self,
        suite: CipherSuite,
        dpk: bytes,
        *,
        random: bytes,
        offline_counter: int,
        terminal_seq: int,
        amount: int,
        terminal_id: bytes,
        date: dt.date,
        time: dt.time,
    ) -> tuple[bytes, bytes]:
        """MAC1 (what DEBIT must carry) and MAC2 (what the card answers), one session key:
        ``host.purchase_mac1`` and ``host.purchase_mac2``."""
        if not self.fast(suite, dpk):
            mac1 = host.purchase_mac1(
                dpk,
                random=random,
                offline_counter=offline_counter,
                terminal_seq=terminal_seq,
                amount=amount,
                terminal_id=terminal_id,
                date=date,
                time=time,
                suite=suite,
            )
            mac2 = host.purchase_mac2(
                dpk,
                random=random,
                offline_counter=offline_counter,
                terminal_seq=terminal_seq,
                amount=amount,
                suite=suite,
            )
            return mac1, mac2
        block = purchase_session_block(random, offline_counter, terminal_seq)
        session = KeptMac(self._encrypt(dpk)(block))
        mac1_data = host.purchase_mac1_data(
            amount=amount, terminal_id=terminal_id, date=date, time=time
        )
        mac1 = session.mac(mac1_data)
        mac2 = session.mac(host.purchase_mac2_data(amount=amount))
        return mac1, mac2

    def purchase_tac(
        self,
        suite: CipherSuite,
        dtk: bytes,
        *,
        amount: int,
        terminal_id: bytes,
        terminal_seq: int,
        date: dt.date,
        time: dt.time,
    ) -> bytes:
        """``host.purchase_tac``, with the TAC key's cipher kept."""
        if not self.fast(suite, dtk):
            return host.purchase_tac(
                dtk,
                amount=amount,
                terminal_id=terminal_id,
                terminal_seq=terminal_seq,
                date=date,
                time=time,
                suite=suite,
            )
        data = host.purchase_tac_data(
            amount=amount, terminal_id=terminal_id, terminal_seq=terminal_seq, date=date, time=time
        )
        return self._tac_mac(dtk).mac(data)
