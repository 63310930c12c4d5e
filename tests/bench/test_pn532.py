"""The pn532 benchmark: a quick run gives every row, and the baud time follows the bytes."""

from __future__ import annotations

from rich.console import Console

from bench.harness import Context, make_progress
from bench.pn532 import BAUD, run


def test_quick_run_counts_bytes_and_computes_the_uart_time() -> None:
    console = Console(quiet=True)
    with make_progress(console) as progress:
        rows = {row.metric: row for row in run(Context(console, progress, quick=True))}
    per_purchase = rows["bytes on the wire per purchase"].value
    assert per_purchase is not None and per_purchase > 0
    assert rows["bytes on the wire per APDU"].value == round(per_purchase / 4, 3)
    baud_ms = rows["purchase at 115200 baud (computed)"].value
    assert baud_ms == round(per_purchase * 10 / BAUD * 1000, 3)
    assert rows["purchase over the pty (measured)"].value is not None
