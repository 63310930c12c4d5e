"""An in-memory settlement fake for the merchant's unit tests (real settlement: tests/e2e).

It plays settlement's role byte for byte with the real host functions (MAC1/MAC2/TAC) and
the contract's status lifecycle, so the flows are tested against real card answers.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field

from webpurse.card import MasterKeys
from webpurse.merchant.settlement import (
    Authorisation,
    Declined,
    FloatBalance,
    Kind,
    RecoveryHint,
    SettlementError,
    SettlementObject,
)
from webpurse.protocol import host
from webpurse.protocol.commands import (
    CreditForLoad,
    DebitForPurchase,
    InitializeForLoadResponse,
    InitializeForPurchaseResponse,
    TransactionProof,
)
from webpurse.protocol.crypto import diversify
from webpurse.protocol.records import IssuerData, TransactionType

TERMINAL = bytes.fromhex("000000000001")
MASTER = MasterKeys(bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48)))
NOW = dt.datetime(2026, 11, 27, 13, 0, 0)


@dataclass
class Record:
    kind: Kind
    id: str
    amount: int
    status: str = "requires_card"
    card: bytes | None = None
    counter: int | None = None
    random: bytes = b""
    seq: int = 0
    balance: int = 0
    decline_code: str | None = None
    tac: str | None = None
    apdu: bytes | None = None
    supersedes: str | None = None
    calls: list[str] = field(default_factory=list)
    funding: str | None = None
    reference: str | None = None
    bound_card: str | None = None


class FakeSettlement:
    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.ids = itertools.count(1)
        self.seq = itertools.count(1)
        self.calls: list[str] = []
        self.float = 1_000_000  # the merchant's prepaid float (merchant_float loads draw it)
        self.low_threshold = 10_000
        self.references = itertools.count(1)

    def _obj(self, r: Record) -> SettlementObject:
        auth = (
            Authorisation(r.apdu, "20261127", "130000")
            if r.apdu and r.status == "authorised"
            else None
        )
        return SettlementObject(
            kind=r.kind,
            id=r.id,
            status=r.status,
            amount=r.amount,
            terminal_id=TERMINAL,
            key_index=1,
            card_number=r.card.hex().upper() if r.card else None,
            decline_code=r.decline_code,
            tac=r.tac,
            authorisation=auth,
            raw={
                "id": r.id,
                "status": r.status,
                "funding": {"method": r.funding, "reference": r.reference},
                "expires_at": "2026-11-30T13:00:00Z" if r.status == "requires_funding" else None,
            },
        )

    def _get(self, object_id: str) -> Record:
        try:
            return self.records[object_id]
        except KeyError:
            raise SettlementError("no such object", status=404) from None

    async def create(
        self,
        kind: Kind,
        amount: int,
        *,
        description: str,
        reference: str,
        funding: str | None = None,
        card_number: str | None = None,
    ) -> SettlementObject:
        prefix = "pay" if kind is Kind.PAYMENT else "load"
        r = Record(kind, f"{prefix}_{next(self.ids)}", amount)
        if kind is Kind.LOAD:
            if funding == "merchant_float":
                if amount > self.float:
                    raise SettlementError("float too low", status=409, code="insufficient_float")
                self.float -= amount
            elif funding == "bank_transfer":
                if card_number is None:
                    raise SettlementError("card required", status=422, code="card_required")
                r.status = "requires_funding"
                r.reference = f"RF{next(self.references):08d}"
            else:
                raise SettlementError("unfunded load", status=422, code="invalid_funding")
            r.funding, r.bound_card = funding, card_number
        self.records[r.id] = r
        self.calls.append(f"create {r.id}")
        return self._obj(r)

    async def get(self, kind: Kind, object_id: str) -> SettlementObject:
        return self._obj(self._get(object_id))

    async def float_balance(self) -> FloatBalance:
        return FloatBalance(self.float, self.low_threshold)

    def fund(self, object_id: str) -> None:
        """The operator imported a statement line matching this bank-transfer load."""
        r = self._get(object_id)
        assert r.status == "requires_funding", r.status
        r.status = "requires_card"

    def _open_for(self, card: bytes, other: str) -> Record | None:
        for r in self.records.values():
            if r.card == card and r.id != other and r.status in ("uncertain", "authorised"):
                return r
        return None

    async def authorise(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes,
        initialize: bytes,
        terminal_id: bytes,
    ) -> SettlementObject:
        r = self._get(object_id)
        self.calls.append(f"authorise {object_id}")
        serial = IssuerData.from_bytes(issuer_data).serial
        if r.status != "requires_card":
            raise SettlementError("not authorisable", status=409)
        open_one = self._open_for(serial, object_id)
        if open_one is not None and self._supersedable(kind, open_one, initialize):
            r.supersedes, open_one = open_one.id, None
        if open_one is not None:
            ttype = (
                TransactionType.EP_PURCHASE
                if open_one.kind is Kind.PAYMENT
                else TransactionType.EP_LOAD
            )
            raise Declined(
                "recover first",
                code="card_declined",
                decline_code="recovery_required",
                recover=RecoveryHint(open_one.kind, open_one.id, ttype, open_one.counter or 0),
            )
        if r.bound_card is not None and r.bound_card != serial.hex().upper():
            raise Declined("another card", code="card_declined", decline_code="wrong_card")
        r.card = serial
        date, time = NOW.date(), NOW.time()
        if kind is Kind.PAYMENT:
            init = InitializeForPurchaseResponse.from_data(initialize)
            if init.balance < r.amount:
                r.status, r.decline_code = "declined", "insufficient_funds"
                raise Declined("no", code="card_declined", decline_code="insufficient_funds")
            r.counter, r.random, r.seq, r.balance = (
                init.offline_counter,
                init.random,
                next(self.seq),
                init.balance,
            )
            mac1 = host.purchase_mac1(
                diversify(MASTER.dpk, serial),
                random=init.random,
                offline_counter=init.offline_counter,
                terminal_seq=r.seq,
                amount=r.amount,
                terminal_id=TERMINAL,
                date=date,
                time=time,
            )
            r.apdu = DebitForPurchase(r.seq, date, time, mac1).to_apdu().to_bytes()
        else:
            load = InitializeForLoadResponse.from_data(initialize)
            dlk = diversify(MASTER.dlk, serial)
            if not host.verify_load_mac1(
                dlk,
                load.mac1,
                random=load.random,
                online_counter=load.online_counter,
                balance=load.balance,
                amount=r.amount,
                terminal_id=TERMINAL,
            ):
                raise Declined("bad mac1", code="verification_failed", decline_code=None)
            r.counter, r.random, r.balance = load.online_counter, load.random, load.balance
            mac2 = host.load_mac2(
                dlk,
                random=load.random,
                online_counter=load.online_counter,
                amount=r.amount,
                terminal_id=TERMINAL,
                date=date,
                time=time,
            )
            r.apdu = CreditForLoad(date, time, mac2).to_apdu().to_bytes()
        r.status = "authorised"
        return self._obj(r)

    @staticmethod
    def _supersedable(kind: Kind, open_one: Record, initialize: bytes) -> bool:
        """Settlement lets a new load proceed past an uncertain one the card shows unused
        (same online counter, fresh random), linked to it (docs/settlement-api.md)."""
        if kind is not Kind.LOAD or open_one.kind is not Kind.LOAD:
            return False
        init = InitializeForLoadResponse.from_data(initialize)
        return (
            open_one.status == "uncertain"
            and init.online_counter == open_one.counter
            and init.random != open_one.random
        )

    def _release_linked(self, done: Record) -> None:
        """A load's verified TAC at its counter releases the other open loads there."""
        for r in self.records.values():
            if (
                r.id != done.id
                and r.kind is done.kind
                and r.card == done.card
                and r.counter == done.counter
                and r.status in ("authorised", "uncertain")
            ):
                r.status = "canceled"

    def _verify(self, r: Record, mac2: bytes | None, tac: bytes) -> bool:
        assert r.card is not None and r.counter is not None
        date, time = NOW.date(), NOW.time()
        if r.kind is Kind.PAYMENT:
            ok2 = host.verify_purchase_mac2(
                diversify(MASTER.dpk, r.card),
                mac2 or b"",
                random=r.random,
                offline_counter=r.counter,
                terminal_seq=r.seq,
                amount=r.amount,
            )
            return ok2 and host.verify_purchase_tac(
                diversify(MASTER.dtk, r.card),
                tac,
                amount=r.amount,
                terminal_id=TERMINAL,
                terminal_seq=r.seq,
                date=date,
                time=time,
            )
        return host.verify_load_tac(
            diversify(MASTER.dtk, r.card),
            tac,
            new_balance=r.balance + r.amount,
            online_counter=r.counter,
            amount=r.amount,
            terminal_id=TERMINAL,
            date=date,
            time=time,
        )

    async def finish(self, kind: Kind, object_id: str, card_response: bytes) -> SettlementObject:
        r = self._get(object_id)
        self.calls.append(f"finish {object_id}")
        tac, mac2 = (
            (card_response[:4], card_response[4:8])
            if kind is Kind.PAYMENT
            else (card_response[:4], None)
        )
        if r.status != "authorised" or not self._verify(r, mac2, tac):
            raise Declined("verification failed", code="verification_failed", decline_code=None)
        r.status, r.tac = "succeeded", tac.hex().upper()
        if kind is Kind.LOAD:
            self._release_linked(r)
        return self._obj(r)

    async def uncertain(self, kind: Kind, object_id: str) -> SettlementObject:
        r = self._get(object_id)
        self.calls.append(f"uncertain {object_id}")
        r.status = "uncertain"
        return self._obj(r)

    async def resolve(
        self, kind: Kind, object_id: str, *, initialize: bytes, prove: bytes | None
    ) -> SettlementObject:
        r = self._get(object_id)
        self.calls.append(f"resolve {object_id}")
        if r.kind is Kind.PAYMENT:
            counter = InitializeForPurchaseResponse.from_data(initialize).offline_counter
        else:
            counter = InitializeForLoadResponse.from_data(initialize).online_counter
        if counter == r.counter and r.kind is Kind.LOAD:
            # Never proof for a load (a replayed INITIALIZE says the same): it stays open.
            raise SettlementError("proof required", status=409, code="proof_required")
        if counter == r.counter:
            r.status = "canceled"
        elif r.counter is not None and counter == r.counter + 1 and prove is not None:
            proof = TransactionProof.from_data(prove)
            if not self._verify(r, proof.mac2, proof.tac):
                raise Declined("bad proof", code="verification_failed", decline_code=None)
            r.status, r.tac = "succeeded", proof.tac.hex().upper()
        else:
            raise SettlementError("counter mismatch", status=409)
        return self._obj(r)

    async def cancel(
        self,
        kind: Kind,
        object_id: str,
        *,
        issuer_data: bytes | None = None,
        status_word: int | None = None,
    ) -> SettlementObject:
        r = self._get(object_id)
        self.calls.append(
            f"cancel {object_id}" + (f" {status_word:04X}" if status_word is not None else "")
        )
        if r.funding == "merchant_float" and r.status != "canceled":
            self.float += r.amount
        r.status = "canceled"
        return self._obj(r)

    async def answer_card_check(self, check_id: str, initialize_response: bytes) -> str:
        self.calls.append(f"card_check {check_id}")
        return "consistent"

    async def heal(self, *, issuer_data: bytes, transaction_type: int, prove: bytes) -> None:
        """This double never asks for a heal (it keeps no shadow counters)."""
        self.calls.append(f"heal {transaction_type:02X}")
        raise SettlementError("nothing to heal", status=409, code="nothing_to_heal")
