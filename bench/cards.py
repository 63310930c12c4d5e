"""Cards and the terminal side of a purchase, for the benchmarks (no settlement involved).

``BenchCard`` personalises an emulated card with known card keys, so a benchmark can act
as the host (PSAM) itself; ``purchase_apdus`` builds the two batches of spec §3.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

from webpurse.card import CardApplet, CardState, ImageFile, MemoryStore
from webpurse.card.personalise import personalise_with_card_keys
from webpurse.protocol import commands as cmd
from webpurse.protocol import host

DPK = bytes.fromhex("11223344556677888877665544332211")
DLK = bytes.fromhex("2233445566778899AABBCCDDEEFF0011")
DTK = bytes.fromhex("33445566778899AABBCCDDEEFF001122")
TERMINAL_ID = bytes.fromhex("001122334455")
WHEN = dt.datetime(2026, 1, 1, 12, 0, 0)
START = dt.date(2026, 1, 1)
MAX_BALANCE = 100_000


def fixed_random(size: int) -> bytes:
    """The card's random numbers: fixed, so every run does identical work."""
    return bytes(range(1, size + 1))


def card_state(serial_number: int = 1, balance: int = MAX_BALANCE) -> CardState:
    serial = serial_number.to_bytes(10, "big")
    state = personalise_with_card_keys(serial, dpk=DPK, dlk=DLK, dtk=DTK, start=START)
    return replace(state, balance=balance)


def memory_card(serial_number: int = 1) -> CardApplet:
    state = card_state(serial_number)
    return CardApplet(state, MemoryStore(state), fixed_random)


def image_card(path: Path, serial_number: int = 1) -> CardApplet:
    """A card whose every commit goes through :class:`ImageFile` (write, fsync, rename)."""
    state = card_state(serial_number)
    image = ImageFile(path)
    if image.path.exists():
        image.path.unlink()
    image.create(state)
    return CardApplet(state, image, fixed_random)


@dataclass(frozen=True)
class PurchaseApdus:
    select: bytes
    read_issuer: bytes
    get_balance: bytes

    @staticmethod
    def initialize(amount: int, terminal_id: bytes = TERMINAL_ID) -> bytes:
        return cmd.InitializeForPurchase(1, amount, terminal_id).to_apdu().to_bytes()


APDUS = PurchaseApdus(
    select=cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes(),
    read_issuer=cmd.ReadBinary(cmd.SFI_ISSUER).to_apdu().to_bytes(),
    get_balance=cmd.GetBalance().to_apdu().to_bytes(),
)


class PurchaseError(Exception):
    """A step of the in-process purchase did not answer 9000 (a bug, not a measurement)."""


def _ok(response: bytes, what: str) -> bytes:
    if response[-2:] != b"\x90\x00":
        raise PurchaseError(f"{what} answered {response[-2:].hex().upper()}")
    return response[:-2]


def in_process_purchase(card: CardApplet, amount: int, terminal_seq: int) -> bytes:
    """SELECT, READ BINARY, INITIALIZE, host MAC1, DEBIT, host MAC2 and TAC checks.

    Everything a purchase computes, with no I/O: returns the TAC.
    """
    _ok(card.process(APDUS.select), "SELECT")
    _ok(card.process(APDUS.read_issuer), "READ BINARY")
    init = cmd.InitializeForPurchaseResponse.from_data(
        _ok(card.process(PurchaseApdus.initialize(amount)), "INITIALIZE FOR PURCHASE")
    )
    mac1 = host.purchase_mac1(
        DPK,
        random=init.random,
        offline_counter=init.offline_counter,
        terminal_seq=terminal_seq,
        amount=amount,
        terminal_id=TERMINAL_ID,
        date=WHEN.date(),
        time=WHEN.time(),
    )
    debit = cmd.DebitForPurchase(terminal_seq, WHEN.date(), WHEN.time(), mac1)
    answer = cmd.DebitForPurchaseResponse.from_data(
        _ok(card.process(debit.to_apdu().to_bytes()), "DEBIT FOR PURCHASE")
    )
    mac2_ok = host.verify_purchase_mac2(
        DPK,
        answer.mac2,
        random=init.random,
        offline_counter=init.offline_counter,
        terminal_seq=terminal_seq,
        amount=amount,
    )
    tac_ok = host.verify_purchase_tac(
        DTK,
        answer.tac,
        amount=amount,
        terminal_id=TERMINAL_ID,
        terminal_seq=terminal_seq,
        date=WHEN.date(),
        time=WHEN.time(),
    )
    if not (mac2_ok and tac_ok):
        raise PurchaseError("the card's MAC2 or TAC did not verify")
    return answer.tac
