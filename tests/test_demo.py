"""``webpurse demo --scripted``: the whole system from a fresh data dir, one purchase and one
online top-up paid by an imported bank statement, exit 0."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from webpurse.demo import webpurse_command


@pytest.mark.timeout(240)
def test_scripted_demo_buys_once_and_the_ledger_checks_out(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    done = subprocess.run(
        [*webpurse_command(), "demo", "--scripted", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "status          paid" in out
    assert "balance before  ¥500.00" in out and "balance after   ¥462.00" in out
    assert "round trips     2" in out
    assert "ledger check    consistent" in out
    assert "sk_mer_" not in out and "sk_op_" not in out  # keys are never printed
    # The funded top-up: ordered on the shop, paid by a statement line, loaded once.
    topup = out.split("top-up receipt (bank transfer)")[1]
    assert "status          loaded" in topup and "amount          ¥100.00" in topup
    assert "balance before  ¥462.00" in topup and "balance after   ¥562.00" in topup
    assert "reference       RF" in topup and (data / "statement-0001.csv").exists()
    # Run again on the same data dir: it reuses the card and buys again.
    again = subprocess.run(
        [*webpurse_command(), "demo", "--scripted", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "balance after   ¥524.00" in again.stdout  # ¥562 - ¥38
    assert "balance after   ¥624.00" in again.stdout  # and a second statement, number 2
    assert (data / "statement-0002.csv").exists()
