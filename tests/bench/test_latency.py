"""The latency benchmark's stage arithmetic and rows."""

from __future__ import annotations

import pytest

from bench.latency import PurchaseTiming, latency_rows, split_stages


def test_remote_stages_are_disjoint_and_add_up_to_the_total() -> None:
    timers = {
        "merchant reader": 0.010,  # the merchant's transmit, agent and card inside it
        "agent reader": 0.004,  # the agent's transmit, card inside it
        "card": 0.001,
        "settlement": 0.050,  # HTTP calls, database inside them
        "database": 0.030,
    }
    stages = split_stages(timers, 0.065, card_timed=True)
    assert stages == pytest.approx(
        {
            "card": 0.001,
            "reader": 0.003,
            "relay": 0.006,
            "database": 0.030,
            "settlement": 0.020,
            "merchant": 0.005,
        }
    )
    assert sum(stages.values()) == pytest.approx(0.065)


def test_local_reader_has_no_relay_and_pcsc_no_separate_card() -> None:
    local = split_stages({"merchant reader": 0.002, "card": 0.0015}, 0.01, card_timed=True)
    assert local["relay"] == 0
    assert local["reader"] == pytest.approx(0.0005)
    pcsc = split_stages(
        {"merchant reader": 0.05, "agent reader": 0.045, "card": 0.0}, 0.1, card_timed=False
    )
    assert pcsc["card"] == 0
    assert pcsc["reader"] == pytest.approx(0.045)  # card + PC/SC + vpcd together
    assert pcsc["relay"] == pytest.approx(0.005)


def test_latency_rows_give_percentiles_and_counts_per_purchase() -> None:
    timings = [
        PurchaseTiming(
            total=0.1 + i / 1000,
            stages=split_stages({"settlement": 0.05, "database": 0.02}, 0.1, card_timed=True),
            counts={"merchant reader batches": 2, "apdus": 4, "commits": 12},
        )
        for i in range(100)
    ]
    rows = latency_rows("sim", timings, card_timed=True)
    by_key = {(r.metric, r.params.get("stat")): r for r in rows}
    assert by_key[("purchase total", "p50")].value == pytest.approx(149.5)
    assert by_key[("stage database", "p99")].value == pytest.approx(20)
    assert by_key[("merchant↔reader round trips per purchase", None)].value == 2
    assert by_key[("APDUs per purchase", None)].value == 4
    assert ("stage relay", "p50") not in by_key  # no relay without an agent
    assert all(r.params["reader"] == "sim" and r.params["purchases"] == 100 for r in rows)
