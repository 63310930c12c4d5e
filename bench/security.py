"""The security module, side by side: the software module and a PKCS#11 token (SoftHSM2).

MACs per second (``purchase_mac1`` through the module: session key derivation + MAC;
the card key cached, as for a card that pays often) and purchases per second (a card
emulator in process: INITIALIZE, MAC1 from the module, DEBIT, MAC2 and TAC verified by the
module). The token rows need SoftHSM2 (``apt-get install softhsm2``) and PyKCS11; without
them they say so instead of a number.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.cards import TERMINAL_ID, WHEN
from bench.harness import Context, Measurement, measure_rate
from webpurse.card import CardApplet, MemoryStore
from webpurse.protocol import commands as cmd
from webpurse.settlement.security import KINDS, SoftwareSecurityModule, _KeySet

NAME = "security"
SERIAL = (7).to_bytes(10, "big")
BALANCE = 100_000


def _software() -> SoftwareSecurityModule:
    return SoftwareSecurityModule({1: _KeySet(*(secrets.token_bytes(16) for _ in KINDS))}, 1)


@contextmanager
def _token(software: SoftwareSecurityModule) -> Iterator[Any]:
    """A throwaway SoftHSM2 token holding ``software``'s master keys (as after migration)."""
    from webpurse.settlement.pkcs11 import (
        DEFAULT_MODULE,
        Pkcs11SecurityModule,
        TokenConfig,
        initialise_token,
        softhsm2_config,
    )

    with tempfile.TemporaryDirectory(prefix="webpurse-bench-hsm-") as folder:
        # Its own token dir, never the operator's (this process loads SoftHSM2 afresh).
        os.environ["SOFTHSM2_CONF"] = str(softhsm2_config(Path(folder)))
        label, pin = "bench-" + secrets.token_hex(4), secrets.token_hex(8)
        initialise_token(DEFAULT_MODULE, label, so_pin=secrets.token_hex(8), pin=pin)
        module = Pkcs11SecurityModule(TokenConfig(module=DEFAULT_MODULE, pin=pin, label=label))
        try:
            module.import_master_keys(software.export_master_keys())
            yield module
        finally:
            module.close()


def _ok(answer: bytes) -> bytes:
    assert answer[-2:] == b"\x90\x00", answer.hex()
    return answer[:-2]


def _funded_card(module: Any) -> CardApplet:
    state = module.personalise(SERIAL, start=WHEN.date(), max_balance=BALANCE)
    card = CardApplet(state, MemoryStore(state), secrets.token_bytes)
    _ok(card.process(cmd.Select(name=cmd.EP_AID).to_apdu().to_bytes()))
    init = cmd.InitializeForLoadResponse.from_data(
        _ok(card.process(cmd.InitializeForLoad(1, BALANCE, TERMINAL_ID).to_apdu().to_bytes()))
    )
    mac2 = module.load_mac2(
        SERIAL,
        init.key_version,
        random=init.random,
        online_counter=init.online_counter,
        amount=BALANCE,
        terminal_id=TERMINAL_ID,
        date=WHEN.date(),
        time=WHEN.time(),
    )
    _ok(card.process(cmd.CreditForLoad(WHEN.date(), WHEN.time(), mac2).to_apdu().to_bytes()))
    return card


def _purchase(card: CardApplet, module: Any, seq: int) -> None:
    init = cmd.InitializeForPurchaseResponse.from_data(
        _ok(card.process(cmd.InitializeForPurchase(1, 1, TERMINAL_ID).to_apdu().to_bytes()))
    )
    when = {"date": WHEN.date(), "time": WHEN.time()}
    common = {
        "random": init.random,
        "offline_counter": init.offline_counter,
        "terminal_seq": seq,
        "amount": 1,
        "terminal_id": TERMINAL_ID,
    }
    mac1 = module.purchase_mac1(SERIAL, init.key_version, **common, **when)
    debit = cmd.DebitForPurchase(seq, WHEN.date(), WHEN.time(), mac1)
    answer = cmd.DebitForPurchaseResponse.from_data(_ok(card.process(debit.to_apdu().to_bytes())))
    assert module.verify_purchase_mac2_and_tac(
        SERIAL, init.key_version, mac2=answer.mac2, tac=answer.tac, **common, **when
    )


def _rows(ctx: Context, name: str, module: Any) -> list[Measurement]:
    random = secrets.token_bytes(4)

    def mac1() -> object:
        return module.purchase_mac1(
            SERIAL,
            1,
            random=random,
            offline_counter=1,
            terminal_seq=2,
            amount=100,
            terminal_id=TERMINAL_ID,
            date=WHEN.date(),
            time=WHEN.time(),
        )

    params: dict[str, str | int | float | bool] = {"module": name}
    rows = []
    ops, secs = measure_rate(mac1, min_seconds=ctx.seconds(1.0))
    rows.append(Measurement(NAME, "MACs/s (purchase_mac1)", ops / secs, "ops/s", params))
    card = _funded_card(module)
    seq = iter(range(1, BALANCE))
    operation: Callable[[], None] = lambda: _purchase(card, module, next(seq))  # noqa: E731
    ops, secs = measure_rate(operation, min_seconds=ctx.seconds(1.0), max_operations=BALANCE - 1)
    rows.append(Measurement(NAME, "purchases/s (in process)", ops / secs, "ops/s", params))
    return rows


def run(ctx: Context) -> list[Measurement]:
    software = _software()
    rows = _rows(ctx, "software", software)
    try:
        with _token(software) as token:
            rows += _rows(ctx, "pkcs11 (SoftHSM2)", token)
    except Exception as exc:
        for metric in ("MACs/s (purchase_mac1)", "purchases/s (in process)"):
            rows.append(
                Measurement(
                    NAME,
                    metric,
                    None,
                    "ops/s",
                    {"module": "pkcs11 (SoftHSM2)"},
                    f"not measured: {type(exc).__name__}: {exc}",
                )
            )
    return rows
