"""A host-side terminal that runs LOAD and PURCHASE through any Reader in two batches.

It plays merchant + settlement at once: builds the batches a merchant sends and computes
and checks the MACs with ``webpurse.protocol.host`` from the card keys, as the settlement
server's security module would.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.card.support import DLK, DPK, DTK, TERMINAL, WHEN
from webpurse.protocol import commands as cmd
from webpurse.protocol import host
from webpurse.protocol.apdu import ResponseApdu
from webpurse.protocol.records import IssuerData
from webpurse.reader import Reader, Step

SELECT_EP = cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes()
READ_ISSUER = cmd.ReadBinary(cmd.SFI_ISSUER).to_apdu().to_bytes()
GET_BALANCE = cmd.GetBalance().to_apdu().to_bytes()


def step(apdu: bytes | cmd.CommandApdu) -> Step:
    return Step(apdu if isinstance(apdu, bytes) else apdu.to_bytes())


@dataclass
class Outcome:
    issuer: IssuerData
    balance_before: int
    counter: int
    tac: bytes
    final: ResponseApdu


class HostTerminal:
    def __init__(self, reader: Reader, terminal_id: bytes = TERMINAL) -> None:
        self.reader = reader
        self.terminal_id = terminal_id
        self.seq = 0

    async def load_init(self, amount: int) -> list[ResponseApdu]:
        batch = [
            step(SELECT_EP),
            step(READ_ISSUER),
            step(cmd.InitializeForLoad(1, amount, self.terminal_id).to_apdu()),
        ]
        return await self.reader.transmit(batch)

    def credit_apdu(self, amount: int, init: ResponseApdu) -> bytes:
        parsed = cmd.InitializeForLoadResponse.from_data(init.data)
        assert host.verify_load_mac1(
            DLK,
            parsed.mac1,
            random=parsed.random,
            online_counter=parsed.online_counter,
            balance=parsed.balance,
            amount=amount,
            terminal_id=self.terminal_id,
        ), "the card's load MAC1 does not verify"
        mac2 = host.load_mac2(
            DLK,
            random=parsed.random,
            online_counter=parsed.online_counter,
            amount=amount,
            terminal_id=self.terminal_id,
            date=WHEN[0],
            time=WHEN[1],
        )
        return cmd.CreditForLoad(WHEN[0], WHEN[1], mac2).to_apdu().to_bytes()

    async def load(self, amount: int) -> Outcome:
        first = await self.load_init(amount)
        assert [r.sw for r in first] == [0x9000] * 3, first
        init = cmd.InitializeForLoadResponse.from_data(first[2].data)
        [credit] = await self.reader.transmit([step(self.credit_apdu(amount, first[2]))])
        assert credit.ok, credit
        tac = cmd.CreditForLoadResponse.from_data(credit.data).tac
        assert host.verify_load_tac(
            DTK,
            tac,
            new_balance=init.balance + amount,
            online_counter=init.online_counter,
            amount=amount,
            terminal_id=self.terminal_id,
            date=WHEN[0],
            time=WHEN[1],
        ), "the card's load TAC does not verify"
        return Outcome(
            IssuerData.from_bytes(first[1].data), init.balance, init.online_counter, tac, credit
        )

    async def purchase_init(self, amount: int) -> list[ResponseApdu]:
        batch = [
            step(SELECT_EP),
            step(READ_ISSUER),
            step(cmd.InitializeForPurchase(1, amount, self.terminal_id).to_apdu()),
        ]
        return await self.reader.transmit(batch)

    def debit_apdu(self, amount: int, init: ResponseApdu) -> bytes:
        parsed = cmd.InitializeForPurchaseResponse.from_data(init.data)
        self.seq += 1
        mac1 = host.purchase_mac1(
            DPK,
            random=parsed.random,
            offline_counter=parsed.offline_counter,
            terminal_seq=self.seq,
            amount=amount,
            terminal_id=self.terminal_id,
            date=WHEN[0],
            time=WHEN[1],
        )
        return cmd.DebitForPurchase(self.seq, WHEN[0], WHEN[1], mac1).to_apdu().to_bytes()

    def check_debit(self, amount: int, init: ResponseApdu, *, mac2: bytes, tac: bytes) -> None:
        parsed = cmd.InitializeForPurchaseResponse.from_data(init.data)
        assert host.verify_purchase_mac2(
            DPK,
            mac2,
            random=parsed.random,
            offline_counter=parsed.offline_counter,
            terminal_seq=self.seq,
            amount=amount,
        ), "the card's purchase MAC2 does not verify"
        assert host.verify_purchase_tac(
            DTK,
            tac,
            amount=amount,
            terminal_id=self.terminal_id,
            terminal_seq=self.seq,
            date=WHEN[0],
            time=WHEN[1],
        ), "the card's purchase TAC does not verify"

    async def purchase(self, amount: int) -> Outcome:
        first = await self.purchase_init(amount)
        assert [r.sw for r in first] == [0x9000] * 3, first
        init = cmd.InitializeForPurchaseResponse.from_data(first[2].data)
        [debit] = await self.reader.transmit([step(self.debit_apdu(amount, first[2]))])
        assert debit.ok, debit
        parsed = cmd.DebitForPurchaseResponse.from_data(debit.data)
        self.check_debit(amount, first[2], mac2=parsed.mac2, tac=parsed.tac)
        return Outcome(
            IssuerData.from_bytes(first[1].data),
            init.balance,
            init.offline_counter,
            parsed.tac,
            debit,
        )

    async def balance(self) -> int:
        responses = await self.reader.transmit([step(SELECT_EP), step(GET_BALANCE)])
        assert [r.sw for r in responses] == [0x9000, 0x9000], responses
        return cmd.BalanceResponse.from_data(responses[1].data).balance
