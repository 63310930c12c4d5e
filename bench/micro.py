"""Micro benchmarks: host MAC/TAC work, card commands, a whole in-process purchase.

No I/O except the card image's fsync (the ``image`` store): the numbers are the CPU cost
of the protocol code, the ceiling for everything built on it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench.cards import (
    APDUS,
    DLK,
    DPK,
    DTK,
    TERMINAL_ID,
    WHEN,
    PurchaseApdus,
    fixed_random,
    image_card,
    in_process_purchase,
    memory_card,
)
from bench.harness import Context, Measurement, measure_rate
from webpurse.card import CardApplet
from webpurse.protocol import commands as cmd
from webpurse.protocol import crypto, host

NAME = "micro"
RANDOM = fixed_random(4)


def _host_operations() -> dict[str, Callable[[], object]]:
    date, time = WHEN.date(), WHEN.time()
    mac2 = host.purchase_mac2(DPK, random=RANDOM, offline_counter=7, terminal_seq=9, amount=100)
    tac = host.purchase_tac(
        DTK, amount=100, terminal_id=TERMINAL_ID, terminal_seq=9, date=date, time=time
    )
    serial = (1).to_bytes(10, "big")
    session_key = crypto.purchase_session_key(DPK, RANDOM, 7, 9)
    data = bytes(18)
    return {
        "diversify (3DES ECB x2)": lambda: crypto.diversify(DPK, serial),
        "purchase_session_key": lambda: crypto.purchase_session_key(DPK, RANDOM, 7, 9),
        "mac (18 bytes)": lambda: crypto.mac(session_key, data),
        "purchase_mac1": lambda: host.purchase_mac1(
            DPK,
            random=RANDOM,
            offline_counter=7,
            terminal_seq=9,
            amount=100,
            terminal_id=TERMINAL_ID,
            date=date,
            time=time,
        ),
        "verify_purchase_mac2": lambda: host.verify_purchase_mac2(
            DPK, mac2, random=RANDOM, offline_counter=7, terminal_seq=9, amount=100
        ),
        "verify_purchase_tac": lambda: host.verify_purchase_tac(
            DTK, tac, amount=100, terminal_id=TERMINAL_ID, terminal_seq=9, date=date, time=time
        ),
        "load_mac2": lambda: host.load_mac2(
            DLK,
            random=RANDOM,
            online_counter=3,
            amount=100,
            terminal_id=TERMINAL_ID,
            date=date,
            time=time,
        ),
    }


def _debit_apdus(count: int) -> list[bytes]:
    """DEBIT FOR PURCHASE commands for offline counters 0..count-1 (amount 1, seq = counter+1).

    Computed before the timed loop so that the card's own cost is measured alone.
    """
    apdus = []
    for counter in range(count):
        seq = counter + 1
        mac1 = host.purchase_mac1(
            DPK,
            random=RANDOM,
            offline_counter=counter,
            terminal_seq=seq,
            amount=1,
            terminal_id=TERMINAL_ID,
            date=WHEN.date(),
            time=WHEN.time(),
        )
        apdus.append(cmd.DebitForPurchase(seq, WHEN.date(), WHEN.time(), mac1).to_apdu().to_bytes())
    return apdus


def _card_rows(ctx: Context, card: CardApplet, store: str, debits: int) -> list[Measurement]:
    rows: list[Measurement] = []
    init = PurchaseApdus.initialize(1)
    card.process(APDUS.select)
    commands: dict[str, bytes] = {
        "SELECT EP": APDUS.select,
        "READ BINARY 0x15": APDUS.read_issuer,
        "GET BALANCE": APDUS.get_balance,
        "INITIALIZE FOR PURCHASE": init,
    }
    for label, apdu in commands.items():
        answer = card.process(apdu)
        assert answer[-2:] == b"\x90\x00", (label, answer.hex())
        ops, secs = measure_rate(partial(card.process, apdu), min_seconds=ctx.seconds(0.5))
        rows.append(_row(f"card {label}", ops / secs, store))

    apdus = _debit_apdus(debits)
    index = 0

    def pair() -> None:
        nonlocal index
        card.process(init)
        answer = card.process(apdus[index])
        if answer[-2:] != b"\x90\x00":
            raise AssertionError(f"DEBIT answered {answer[-2:].hex()} at counter {index}")
        index += 1

    ops, secs = measure_rate(pair, min_seconds=ctx.seconds(1.0), max_operations=debits)
    rows.append(_row("card INITIALIZE+DEBIT", ops / secs, store, unit="debits/s"))
    return rows


def _row(metric: str, value: float, store: str = "", unit: str = "ops/s") -> Measurement:
    params: dict[str, str | int | float | bool] = {"store": store} if store else {}
    return Measurement(NAME, metric, value, unit, params)


def run(ctx: Context) -> list[Measurement]:
    rows: list[Measurement] = []
    operations = _host_operations()
    with ctx.task("micro: host MAC/TAC", total=len(operations)) as advance:
        for label, operation in operations.items():
            ops, secs = measure_rate(operation, min_seconds=ctx.seconds(0.5))
            rows.append(_row(f"host {label}", ops / secs))
            advance()

    with ctx.task("micro: card commands", total=2) as advance:
        rows += _card_rows(ctx, memory_card(), "memory", 20_000 if not ctx.quick else 2_000)
        advance()
        with tempfile.TemporaryDirectory(prefix="webpurse-bench-") as folder:
            card = image_card(Path(folder) / "card.json")
            rows += _card_rows(ctx, card, "image (fsync)", 2_000 if not ctx.quick else 100)
        advance()

    with ctx.task("micro: in-process purchase", total=2) as advance:
        card = memory_card()
        seq = iter(range(1, 65_000))
        ops, secs = measure_rate(
            lambda: in_process_purchase(card, 1, next(seq)),
            min_seconds=ctx.seconds(1.0),
            max_operations=30_000,
        )
        rows.append(
            _row("full purchase (INIT+DEBIT+host MACs)", ops / secs, "memory", "purchases/s")
        )
        advance()
        with tempfile.TemporaryDirectory(prefix="webpurse-bench-") as folder:
            card = image_card(Path(folder) / "card.json")
            seq = iter(range(1, 65_000))
            ops, secs = measure_rate(
                lambda: in_process_purchase(card, 1, next(seq)),
                min_seconds=ctx.seconds(1.0),
                max_operations=2_000,
            )
        rows.append(
            _row("full purchase (INIT+DEBIT+host MACs)", ops / secs, "image (fsync)", "purchases/s")
        )
        advance()
    return rows
