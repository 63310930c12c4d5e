"""Purchase latency against the internet's round trip (issue 17, item 4).

The rig of ``bench.latency`` (settlement a real uvicorn process on PostgreSQL, the
merchant's ``ReaderHub`` under uvicorn, a ``TerminalAgent`` over a real WebSocket) with a
:class:`bench.delay_proxy.DelayProxy` between the agent and the shop: one-way delays of
0, 10, 25 and 50 ms (RTT 0, 20, 50, 100 ms). Settlement stays next to the shop (no delay),
as in a data centre. Two timings per purchase:

- *batch 1 → capture answer*: on an established session (agent paired, payment created),
  from the merchant sending batch 1 to settlement's answer to the capture
  (``run_transaction``). Goal: p50 ≤ 2 × RTT + 20 ms (two round trips to the card).
- *pay click → capture answer*: from the agent being asked to pair (what the page's pay
  button does, on the shopper's machine) through its connection to the shop (TCP
  handshake and WebSocket upgrade over the delayed path), the payment's creation and the
  purchase.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.delay_proxy import delayed
from bench.harness import Context, Measurement, not_measured, percentile
from bench.latency import AMOUNT, Rig, _always_consent, rig
from bench.pgbench import PgServer, unavailable_reason
from bench.servers import SetupError
from bench.timing import TimedReader
from webpurse.merchant.settlement import Kind

NAME = "rtt"
ONE_WAY_MS = (0, 10, 25, 50)
PURCHASES = 40
QUICK_PURCHASES = 5
GOAL_SLACK_MS = 20.0


@dataclass(frozen=True)
class Timing:
    purchase: float  # batch 1 → capture answer, seconds
    from_click: float  # pairing asked → capture answer, seconds
    batches: int  # merchant↔reader round trips
    reader: float = 0.0  # of ``purchase``: the shop's transmits (the relay and the card)
    settlement: float = 0.0  # of ``purchase``: settlement's HTTP calls (authorise, capture)


def goal_ms(rtt_ms: float) -> float:
    return 2 * rtt_ms + GOAL_SLACK_MS


def rtt_rows(one_way_ms: float, timings: Sequence[Timing]) -> list[Measurement]:
    """p50/p95 of both timings at one RTT, the round trips, and the goal's verdict."""
    rtt = 2 * one_way_ms
    base: dict[str, str | int | float | bool] = {"rtt_ms": rtt, "purchases": len(timings)}
    rows: list[Measurement] = []
    series = (
        ("purchase, batch 1 → capture answer", [t.purchase * 1000 for t in timings]),
        (
            "of which the card's round trips (relay, agent, card)",
            [t.reader * 1000 for t in timings],
        ),
        (
            "of which settlement's calls (authorise, capture)",
            [t.settlement * 1000 for t in timings],
        ),
        ("purchase from the pay click (pairing included)", [t.from_click * 1000 for t in timings]),
    )
    for metric, values in series:
        for stat, q in (("p50", 50), ("p95", 95)):
            rows.append(
                Measurement(NAME, metric, percentile(values, q), "ms", {**base, "stat": stat})
            )
    p50 = percentile(series[0][1], 50)
    goal = goal_ms(rtt)
    rows.append(
        Measurement(
            NAME,
            "goal: batch 1 → capture p50 ≤ 2 × RTT + 20 ms",
            goal,
            "ms",
            base,
            f"{'met' if p50 <= goal else 'missed'} (p50 {p50:.1f} ms)",
        )
    )
    rows.append(
        Measurement(
            NAME,
            "merchant↔reader round trips per purchase",
            sum(t.batches for t in timings) / len(timings),
            "",
            base,
        )
    )
    return rows


async def purchases_at(
    ctx: Context, r: Rig, card: Any, one_way_ms: float, count: int
) -> list[Timing]:
    from webpurse.agent.terminal import TerminalAgent
    from webpurse.merchant.flows import run_transaction
    from webpurse.reader.messages import Outcome

    timings: list[Timing] = []
    agent = TerminalAgent(card, consent=_always_consent, show=lambda _: None)
    try:
        async with delayed(r.merchant_url, one_way_ms / 1000) as proxy:
            with ctx.task(f"rtt: {2 * one_way_ms:g} ms", total=count) as advance:
                for i in range(count):
                    binding = f"rtt-{one_way_ms:g}-{i}"
                    pairing = r.hub.issue(binding, display="bench")
                    clicked = time.perf_counter()
                    await agent.pair(f"{proxy.url}/reader", token=pairing.token, origin=proxy.url)
                    remote = await r.hub.wait_for_reader(binding, 30)
                    reader = TimedReader(remote, r.clock, "merchant reader")
                    payment = await r.settlement.create(
                        Kind.PAYMENT, AMOUNT, description="bench", reference=binding
                    )
                    r.clock.take()
                    started = time.perf_counter()
                    outcome = await run_transaction(reader, r.settlement, payment, card_timeout=30)  # type: ignore[arg-type]
                    ended = time.perf_counter()
                    if outcome.status != "succeeded":
                        raise SetupError(
                            f"purchase ended {outcome.status} ({outcome.decline_code})"
                        )
                    seconds, counts = r.clock.take()
                    timings.append(
                        Timing(
                            ended - started,
                            ended - clicked,
                            counts.get("merchant reader batches", 0),
                            seconds.get("merchant reader", 0.0),
                            seconds.get("settlement", 0.0),
                        )
                    )
                    await remote.end(Outcome.SUCCEEDED, "paid", AMOUNT)
                    await asyncio.wait_for(agent.wait_session(), 30)
                    advance()
    finally:
        await agent.close()
    return timings


async def _run(ctx: Context, pg: PgServer) -> list[Measurement]:
    from webpurse.reader.sim import SimReader

    count = QUICK_PURCHASES if ctx.quick else PURCHASES
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="webpurse-bench-rtt-") as name:
        async with rig(pg, Path(name)) as r:
            card = SimReader(r.cards[1])
            try:
                for one_way in ONE_WAY_MS:
                    rows += rtt_rows(one_way, await purchases_at(ctx, r, card, one_way, count))
            finally:
                await card.close()
    return rows


def run(ctx: Context) -> list[Measurement]:
    pg = PgServer.from_env()
    reason = unavailable_reason(pg)
    if reason is not None:
        return [not_measured(NAME, "purchase, batch 1 → capture answer", "ms", reason)]
    try:
        return asyncio.run(_run(ctx, pg))
    except SetupError as exc:
        return [not_measured(NAME, "purchase, batch 1 → capture answer", "ms", f"setup: {exc}")]
