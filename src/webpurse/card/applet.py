"""The e-purse applet: ``CardApplet.process(apdu) -> response``, sans-I/O (spec §1-§6).

State that survives power loss (balance, counters, log, proofs, MAC-failure count,
PIN tries) is a :class:`CardState` handed to a :class:`CardStore` before the answer
leaves the card: the store's ``save`` is the card's atomic EEPROM write. State that
does not survive (the selected application, the pending INITIALIZE, a verified PIN)
lives only in the applet and is cleared by :meth:`CardApplet.reset`.

Random numbers are injected, like every clock, so a test can fix them (spec §8).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

from webpurse.card.macs import CardCiphers
from webpurse.card.state import (
    LOG_RECORDS,
    MAC_FAILURE_LIMIT,
    MAX_COUNTER,
    PIN_TRIES,
    CardKey,
    CardState,
    KeyKind,
    Proof,
)
from webpurse.protocol import commands as cmd
from webpurse.protocol import host
from webpurse.protocol.apdu import CommandApdu, ResponseApdu, StatusWord
from webpurse.protocol.cipher import suite_named
from webpurse.protocol.crypto import macs_equal
from webpurse.protocol.errors import ApduFormatError, FieldError
from webpurse.protocol.records import (
    LogRecord,
    TransactionType,
)

RandomSource = Callable[[int], bytes]


class StoreError(Exception):
    """The card could not write its state: it answers 6581 and keeps the old state."""


class CardStore(Protocol):
    def save(self, state: CardState) -> None:
        """Persist ``state`` all or nothing, or raise :class:`StoreError`."""
        ...


class MemoryStore:
    """A store that keeps the last saved state in memory (tests, benchmarks)."""

    def __init__(self, state: CardState | None = None) -> None:
        self.state = state
        self.saves = 0

    def save(self, state: CardState) -> None:
        self.state = state
        self.saves += 1


class Selected(Enum):
    MF = "mf"
    PSE = "pse"
    EP = "ep"


@dataclass(frozen=True, slots=True)
class _PendingLoad:
    key: CardKey
    amount: int
    terminal_id: bytes
    balance: int
    online_counter: int
    random: bytes


@dataclass(frozen=True, slots=True)
class _PendingPurchase:
    key: CardKey
    amount: int
    terminal_id: bytes
    balance: int
    offline_counter: int
    random: bytes


class _Refused(Exception):
    def __init__(self, sw: int) -> None:
        self.sw = sw


def _sw(sw: int, data: bytes = b"") -> ResponseApdu:
    return ResponseApdu(data, sw)


def _tlv(tag: bytes, value: bytes) -> bytes:
    if len(value) > 127:
        raise FieldError("TLV value too long for a short length")
    return tag + bytes((len(value),)) + value


EP_LABEL = b"WEBPURSE EP"


def pse_fci() -> bytes:
    """FCI of the PSE: DF name and the SFI of its directory file."""
    return _tlv(b"\x6f", _tlv(b"\x84", cmd.PSE_NAME) + _tlv(b"\xa5", _tlv(b"\x88", b"\x01")))


def ep_fci() -> bytes:
    return _tlv(b"\x6f", _tlv(b"\x84", cmd.EP_AID) + _tlv(b"\xa5", _tlv(b"\x50", EP_LABEL)))


def directory_record() -> bytes:
    """Record 1 of the PSE directory (SFI 1): the EP application's AID and label."""
    entry = _tlv(b"\x4f", cmd.EP_AID) + _tlv(b"\x50", EP_LABEL) + _tlv(b"\x87", b"\x01")
    return _tlv(b"\x70", _tlv(b"\x61", entry))


class CardApplet:
    """A PBOC 2.0 EP card. Not thread-safe: a card talks to one reader at a time."""

    def __init__(self, state: CardState, store: CardStore, random: RandomSource) -> None:
        self._state = state
        self._store = store
        self._random = random
        self._selected = Selected.MF
        self._pending: _PendingLoad | _PendingPurchase | None = None
        self._pin_verified = False
        self._ciphers = CardCiphers()
        self._issuer_encoded: tuple[object, bytes] = (None, b"")
        self._handlers: dict[int, tuple[int, Callable[[CommandApdu, object], ResponseApdu]]] = {
            cmd.INS_SELECT: (cmd.CLA_ISO, self._select),
            cmd.INS_READ_BINARY: (cmd.CLA_ISO, self._read_binary),
            cmd.INS_READ_RECORD: (cmd.CLA_ISO, self._read_record),
            cmd.INS_VERIFY: (cmd.CLA_ISO, self._verify),
            cmd.INS_GET_BALANCE: (cmd.CLA_PROPRIETARY, self._get_balance),
            cmd.INS_INITIALIZE: (cmd.CLA_PROPRIETARY, self._initialize),
            cmd.INS_CREDIT_FOR_LOAD: (cmd.CLA_PROPRIETARY, self._credit_for_load),
            cmd.INS_DEBIT_FOR_PURCHASE: (cmd.CLA_PROPRIETARY, self._debit_for_purchase),
            cmd.INS_GET_TRANSACTION_PROVE: (cmd.CLA_PROPRIETARY, self._get_transaction_prove),
        }

    @property
    def state(self) -> CardState:
        return self._state

    @property
    def selected(self) -> Selected:
        return self._selected

    def reset(self) -> None:
        """Power cycle: everything not in EEPROM is gone (pending transaction, PIN, selection)."""
        self._selected = Selected.MF
        self._pending = None
        self._pin_verified = False

    def process(self, apdu: bytes) -> bytes:
        """Answer one command APDU; never raises, always ends with a status word."""
        return self.process_apdu(apdu).to_bytes()

    def process_apdu(self, raw: bytes) -> ResponseApdu:
        pending, self._pending = self._pending, None  # any command cancels a pending one
        try:
            command = CommandApdu.from_bytes(bytes(raw))
        except ApduFormatError:
            return _sw(StatusWord.WRONG_LENGTH)
        response = self._respond(command, pending)
        # Every answer is one its command's status table lists (protocol.status, spec §5):
        # a status word outside it is a bug here, not something a terminal must guess at.
        assert cmd.statuses_for(command).allows(response.sw), (
            f"{cmd.statuses_for(command).command} answered {response.sw:04X}, not in its table"
        )
        return response

    def _respond(
        self, apdu: CommandApdu, pending: _PendingLoad | _PendingPurchase | None
    ) -> ResponseApdu:
        entry = self._handlers.get(apdu.ins)
        if entry is None:
            return _sw(
                StatusWord.CLA_NOT_SUPPORTED
                if apdu.cla not in (cmd.CLA_ISO, cmd.CLA_PROPRIETARY)
                else StatusWord.INS_NOT_SUPPORTED
            )
        cla, handler = entry
        if apdu.cla != cla:
            return _sw(StatusWord.CLA_NOT_SUPPORTED)
        try:
            return handler(apdu, pending)
        except _Refused as refused:
            return _sw(refused.sw)
        except ApduFormatError:
            return _sw(StatusWord.WRONG_LENGTH)
        except cmd.WrongParameters:
            return _sw(StatusWord.WRONG_P1P2)
        except FieldError:
            return _sw(StatusWord.WRONG_DATA)
        except StoreError:
            return _sw(StatusWord.MEMORY_FAILURE)

    # --- helpers -------------------------------------------------------------------

    def _commit(self, new_state: CardState) -> None:
        """Write through to the store first: the in-memory state follows only on success."""
        self._store.save(new_state)
        self._state = new_state

    def _need_ep(self) -> None:
        if self._selected is not Selected.EP:
            raise _Refused(StatusWord.CONDITIONS_NOT_SATISFIED)

    @staticmethod
    def _slice(content: bytes, offset: int, le: int) -> ResponseApdu:
        if offset > len(content):
            raise cmd.WrongParameters("offset beyond the end of the file")
        available = content[offset:]
        if le == 0:
            return _sw(StatusWord.SUCCESS, available)
        if le > len(available):
            return _sw(0x6C00 | len(available))
        return _sw(StatusWord.SUCCESS, available[:le])

    def _mac_failure(self) -> ResponseApdu:
        failures = self._state.mac_failures + 1
        self._commit(
            replace(self._state, mac_failures=failures, locked=failures >= MAC_FAILURE_LIMIT)
        )
        return _sw(StatusWord.MAC_INVALID)

    # --- commands ------------------------------------------------------------------

    def _select(self, apdu: CommandApdu, _pending: object) -> ResponseApdu:
        select = cmd.Select.from_apdu(apdu)
        self._pin_verified = False
        if select.name is not None:
            if select.name == cmd.PSE_NAME:
                self._selected = Selected.PSE
                return _sw(StatusWord.SUCCESS, pse_fci())
            if select.name == cmd.EP_AID:
                self._selected = Selected.EP
                return _sw(StatusWord.SUCCESS, ep_fci())
        elif select.fid == cmd.EP_FID:
            self._selected = Selected.EP
            return _sw(StatusWord.SUCCESS, ep_fci())
        elif select.fid == cmd.MF_FID:
            self._selected = Selected.MF
            return _sw(StatusWord.SUCCESS)
        return _sw(StatusWord.FILE_NOT_FOUND)

    def _read_binary(self, apdu: CommandApdu, _pending: object) -> ResponseApdu:
        read = cmd.ReadBinary.from_apdu(apdu)
        if self._selected is Selected.EP and read.sfi == cmd.SFI_ISSUER:
            return self._slice(self._issuer_file(), read.offset, read.le)
        if self._selected is Selected.EP and read.sfi == cmd.SFI_CARDHOLDER:
            return self._slice(self._state.cardholder.to_bytes(), read.offset, read.le)
        return _sw(StatusWord.FILE_NOT_FOUND)

    def _issuer_file(self) -> bytes:
        """EF 0x15's bytes, encoded again only when the state holds another issuer record
        (a frozen value: the same object encodes to the same bytes)."""
        issuer = self._state.issuer
        if self._issuer_encoded[0] is not issuer:
            self._issuer_encoded = (issuer, issuer.to_bytes())
        return self._issuer_encoded[1]

    def _read_record(self, apdu: CommandApdu, _pending: object) -> ResponseApdu:
        read = cmd.ReadRecord.from_apdu(apdu)
        if self._selected is Selected.PSE and read.sfi == cmd.SFI_DIRECTORY:
            records = [directory_record()]
        elif self._selected is Selected.EP and read.sfi == cmd.SFI_LOG:
            records = [r.to_bytes() for r in self._state.log]
        else:
            return _sw(StatusWord.FILE_NOT_FOUND)
        if read.record > len(records):
            return _sw(StatusWord.RECORD_NOT_FOUND)
        return self._slice(records[read.record - 1], 0, read.le)

    def _verify(self, apdu: CommandApdu, _pending: object) -> ResponseApdu:
        verify = cmd.Verify.from_apdu(apdu)
        self._need_ep()
        state = self._state
        if state.pin is None:
            return _sw(StatusWord.CONDITIONS_NOT_SATISFIED)
        if state.pin_tries_left == 0:
            return _sw(StatusWord.PIN_BLOCKED)
        if macs_equal(state.pin, verify.pin):
            if state.pin_tries_left != PIN_TRIES:
                self._commit(replace(state, pin_tries_left=PIN_TRIES))
            self._pin_verified = True
            return _sw(StatusWord.SUCCESS)
        tries = state.pin_tries_left - 1
        self._commit(replace(state, pin_tries_left=tries))
        self._pin_verified = False
        return _sw(0x63C0 | tries)

    def _get_balance(self, apdu: CommandApdu, _pending: object) -> ResponseApdu:
        cmd.GetBalance.from_apdu(apdu)
        self._need_ep()
        return _sw(StatusWord.SUCCESS, cmd.BalanceResponse(self._state.balance).to_data())

    def _initialize(self, apdu: CommandApdu, _pending: object) -> ResponseApdu:
        init = cmd.parse_initialize(apdu)
        self._need_ep()
        state = self._state
        if state.locked:
            return _sw(StatusWord.APPLICATION_LOCKED)
        if state.blocked:
            return _sw(StatusWord.APPLICATION_BLOCKED)
        if isinstance(init, cmd.InitializeForLoad):
            return self._initialize_for_load(init)
        return self._initialize_for_purchase(init)

    def _initialize_for_load(self, init: cmd.InitializeForLoad) -> ResponseApdu:
        state = self._state
        key = state.key(KeyKind.LOAD, init.key_index)
        if key is None:
            return _sw(StatusWord.KEY_INDEX_NOT_SUPPORTED)
        if state.pin_required_for_load and not self._pin_verified:
            return _sw(StatusWord.SECURITY_STATUS_NOT_SATISFIED)
        if state.online_counter >= MAX_COUNTER:
            return _sw(StatusWord.COUNTER_AT_MAXIMUM)
        if state.balance + init.amount > state.max_balance:
            return _sw(StatusWord.WRONG_DATA)
        random = self._random(4)
        suite = suite_named(key.suite)
        mac1 = host.load_mac1(
            key.value,
            random=random,
            online_counter=state.online_counter,
            balance=state.balance,
            amount=init.amount,
            terminal_id=init.terminal_id,
            suite=suite,
        )
        self._pending = _PendingLoad(
            key, init.amount, init.terminal_id, state.balance, state.online_counter, random
        )
        response = cmd.InitializeForLoadResponse(
            state.balance, state.online_counter, key.version, key.algorithm_id, random, mac1
        )
        return _sw(StatusWord.SUCCESS, response.to_data())

    def _initialize_for_purchase(self, init: cmd.InitializeForPurchase) -> ResponseApdu:
        state = self._state
        key = state.key(KeyKind.PURCHASE, init.key_index)
        if key is None:
            return _sw(StatusWord.KEY_INDEX_NOT_SUPPORTED)
        if state.offline_counter >= MAX_COUNTER:
            return _sw(StatusWord.COUNTER_AT_MAXIMUM)
        if state.balance < init.amount:
            return _sw(StatusWord.INSUFFICIENT_FUNDS)
        random = self._random(4)
        self._pending = _PendingPurchase(
            key, init.amount, init.terminal_id, state.balance, state.offline_counter, random
        )
        response = cmd.InitializeForPurchaseResponse(
            state.balance,
            state.offline_counter,
            state.overdraft_limit,
            key.version,
            key.algorithm_id,
            random,
        )
        return _sw(StatusWord.SUCCESS, response.to_data())

    def _credit_for_load(self, apdu: CommandApdu, pending: object) -> ResponseApdu:
        credit = cmd.CreditForLoad.from_apdu(apdu)
        if not isinstance(pending, _PendingLoad) or pending.amount == 0:
            return _sw(StatusWord.CONDITIONS_NOT_SATISFIED)
        expected = host.load_mac2(
            pending.key.value,
            random=pending.random,
            online_counter=pending.online_counter,
            amount=pending.amount,
            terminal_id=pending.terminal_id,
            date=credit.date,
            time=credit.time,
            suite=suite_named(pending.key.suite),
        )
        if not macs_equal(expected, credit.mac2):
            return self._mac_failure()
        state = self._state
        new_balance = pending.balance + pending.amount
        tac = host.load_tac(
            state.tac_key().value,
            new_balance=new_balance,
            online_counter=pending.online_counter,
            amount=pending.amount,
            terminal_id=pending.terminal_id,
            date=credit.date,
            time=credit.time,
            suite=suite_named(state.tac_key().suite),
        )
        self._commit_transaction(
            TransactionType.EP_LOAD,
            pending,
            pending.online_counter,
            credit.date,
            credit.time,
            new_balance=new_balance,
            mac2=credit.mac2,
            tac=tac,
        )
        return _sw(StatusWord.SUCCESS, cmd.CreditForLoadResponse(tac).to_data())

    def _debit_for_purchase(self, apdu: CommandApdu, pending: object) -> ResponseApdu:
        debit = cmd.DebitForPurchase.from_apdu(apdu)
        if not isinstance(pending, _PendingPurchase) or pending.amount == 0:
            return _sw(StatusWord.CONDITIONS_NOT_SATISFIED)
        # The card's kept ciphers (card.macs): one session key for MAC1 and MAC2, the TAC
        # key's cipher loaded once; protocol.host's arithmetic either way.
        expected, mac2 = self._ciphers.purchase_macs(
            suite_named(pending.key.suite),
            pending.key.value,
            random=pending.random,
            offline_counter=pending.offline_counter,
            terminal_seq=debit.terminal_seq,
            amount=pending.amount,
            terminal_id=pending.terminal_id,
            date=debit.date,
            time=debit.time,
        )
        if not macs_equal(expected, debit.mac1):
            return self._mac_failure()
        state = self._state
        tac_key = state.tac_key()
        tac = self._ciphers.purchase_tac(
            suite_named(tac_key.suite),
            tac_key.value,
            amount=pending.amount,
            terminal_id=pending.terminal_id,
            terminal_seq=debit.terminal_seq,
            date=debit.date,
            time=debit.time,
        )
        self._commit_transaction(
            TransactionType.EP_PURCHASE,
            pending,
            pending.offline_counter,
            debit.date,
            debit.time,
            new_balance=pending.balance - pending.amount,
            mac2=mac2,
            tac=tac,
        )
        return _sw(StatusWord.SUCCESS, cmd.DebitForPurchaseResponse(tac, mac2).to_data())

    def _commit_transaction(
        self,
        transaction_type: TransactionType,
        pending: _PendingLoad | _PendingPurchase,
        counter_before: int,
        date: dt.date,
        time: dt.time,
        *,
        new_balance: int,
        mac2: bytes,
        tac: bytes,
    ) -> None:
        """One save for a completed load or purchase (spec §3): the log record, the new
        balance, the type's counter + 1, the proof GET TRANSACTION PROVE answers with, and
        the MAC failures cleared."""
        state = self._state
        record = LogRecord(
            counter_before,
            state.overdraft_limit,
            pending.amount,
            transaction_type,
            pending.terminal_id,
            date,
            time,
        )
        log = (record, *state.log)[:LOG_RECORDS]  # CardState.with_log, in the one replace
        counter_after = counter_before + 1
        proof = Proof(counter_after, mac2, tac)
        if transaction_type == TransactionType.EP_LOAD:
            self._commit(
                replace(
                    state,
                    log=log,
                    balance=new_balance,
                    online_counter=counter_after,
                    load_proof=proof,
                    mac_failures=0,
                )
            )
        else:
            self._commit(
                replace(
                    state,
                    log=log,
                    balance=new_balance,
                    offline_counter=counter_after,
                    purchase_proof=proof,
                    mac_failures=0,
                )
            )

    def _get_transaction_prove(self, apdu: CommandApdu, _pending: object) -> ResponseApdu:
        prove = cmd.GetTransactionProve.from_apdu(apdu)
        self._need_ep()
        state = self._state
        if prove.transaction_type == TransactionType.EP_PURCHASE:
            proof, counter = state.purchase_proof, state.offline_counter
        elif prove.transaction_type == TransactionType.EP_LOAD:
            proof, counter = state.load_proof, state.online_counter
        else:
            proof, counter = None, -1
        if proof is None or prove.counter != counter or proof.counter_after != counter:
            return _sw(StatusWord.PROOF_NOT_AVAILABLE)
        return _sw(StatusWord.SUCCESS, cmd.TransactionProof(proof.mac2, proof.tac).to_data())
