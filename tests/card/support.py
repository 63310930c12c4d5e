"""A host-side test terminal: drives a CardApplet the way a PSAM-equipped terminal would."""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from webpurse.card import CardApplet, MemoryStore, personalise_with_card_keys
from webpurse.card.state import CardState
from webpurse.protocol import commands as cmd
from webpurse.protocol import host
from webpurse.protocol.apdu import ResponseApdu

DPK = bytes.fromhex("11223344556677888877665544332211")
DLK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
DTK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
SERIAL = bytes.fromhex("00000000000000000001")
TERMINAL = bytes.fromhex("001122334455")
WHEN = (dt.date(2026, 11, 27), dt.time(10, 30, 0))


def counting_random() -> Iterator[bytes]:
    for n in itertools.count(1):
        yield n.to_bytes(4, "big")


def make_state(**overrides: object) -> CardState:
    kwargs: dict[str, object] = {
        "dpk": DPK,
        "dlk": DLK,
        "dtk": DTK,
        "start": dt.date(2026, 1, 1),
    }
    kwargs.update(overrides)
    return personalise_with_card_keys(SERIAL, **kwargs)  # type: ignore[arg-type]


def make_card(state: CardState | None = None, random: bytes | None = None) -> CardApplet:
    randoms = counting_random()

    def source(n: int) -> bytes:
        return random if random is not None else next(randoms)

    state = state or make_state()
    return CardApplet(state, MemoryStore(state), source)


@dataclass
class Terminal:
    card: CardApplet
    dpk: bytes = DPK
    dlk: bytes = DLK
    dtk: bytes = DTK
    terminal_id: bytes = TERMINAL
    seq: int = 0

    def send(self, apdu: bytes | cmd.CommandApdu) -> ResponseApdu:
        raw = apdu if isinstance(apdu, bytes) else apdu.to_bytes()
        return ResponseApdu.from_bytes(self.card.process(raw))

    def select(self) -> ResponseApdu:
        return self.send(cmd.Select(name=cmd.EP_AID).to_apdu())

    def initialize_load(self, amount: int, key_index: int = 1) -> ResponseApdu:
        return self.send(cmd.InitializeForLoad(key_index, amount, self.terminal_id).to_apdu())

    def initialize_purchase(self, amount: int, key_index: int = 1) -> ResponseApdu:
        return self.send(cmd.InitializeForPurchase(key_index, amount, self.terminal_id).to_apdu())

    def credit_apdu(self, amount: int, init: ResponseApdu, *, forge: bool = False) -> bytes:
        parsed = cmd.InitializeForLoadResponse.from_data(init.data)
        mac2 = host.load_mac2(
            self.dlk,
            random=parsed.random,
            online_counter=parsed.online_counter,
            amount=amount,
            terminal_id=self.terminal_id,
            date=WHEN[0],
            time=WHEN[1],
        )
        if forge:
            mac2 = bytes(b ^ 0x01 for b in mac2)
        return cmd.CreditForLoad(WHEN[0], WHEN[1], mac2).to_apdu().to_bytes()

    def debit_apdu(self, amount: int, init: ResponseApdu, *, forge: bool = False) -> bytes:
        parsed = cmd.InitializeForPurchaseResponse.from_data(init.data)
        self.seq += 1
        mac1 = host.purchase_mac1(
            self.dpk,
            random=parsed.random,
            offline_counter=parsed.offline_counter,
            terminal_seq=self.seq,
            amount=amount,
            terminal_id=self.terminal_id,
            date=WHEN[0],
            time=WHEN[1],
        )
        if forge:
            mac1 = bytes(b ^ 0x01 for b in mac1)
        return cmd.DebitForPurchase(self.seq, WHEN[0], WHEN[1], mac1).to_apdu().to_bytes()

    def load(self, amount: int) -> ResponseApdu:
        self.select()
        init = self.initialize_load(amount)
        if not init.ok:
            return init
        return self.send(self.credit_apdu(amount, init))

    def purchase(self, amount: int) -> ResponseApdu:
        self.select()
        init = self.initialize_purchase(amount)
        if not init.ok:
            return init
        return self.send(self.debit_apdu(amount, init))
