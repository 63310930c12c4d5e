"""``python -m bench security``: both modules measured, the same work verified by each."""

from __future__ import annotations

import pytest
from rich.console import Console

from bench import security
from bench.harness import Context, make_progress
from tests.settlement.pkcs11_support import require_softhsm


@pytest.mark.pkcs11
def test_security_bench_gives_mac_and_purchase_rates_for_both_modules() -> None:
    require_softhsm()
    console = Console(quiet=True)
    with make_progress(console) as progress:
        rows = security.run(Context(console, progress, quick=True))
    by = {(r.metric, r.params["module"]): r for r in rows}
    for module in ("software", "pkcs11 (SoftHSM2)"):
        for metric in ("MACs/s (purchase_mac1)", "purchases/s (in process)"):
            row = by[(metric, module)]
            assert row.value is not None and row.value > 0, row.note
