"""End-to-end purchase latency, split by stage, through the merchant's own flow.

Settlement runs as ``bench.settlement_server`` (the real app in its own uvicorn process on
PostgreSQL, with database timers attached from outside); the merchant's reader hub
(``webpurse.reader.remote.ReaderHub`` at ``/reader``) runs under uvicorn in this process,
and a terminal agent (``TerminalAgent``) dials it over a real WebSocket. Purchases run one
at a time through ``webpurse.merchant.flows.run_transaction`` with:

- ``sim``: the merchant holds a ``SimReader`` directly (no relay);
- ``sim via agent``: the merchant holds the agent's ``RemoteReader``, the agent a SimReader;
- ``pcsc via agent``: the agent holds a ``PcscReader`` on pcscd's vpcd slot, the card
  served by ``webpurse card serve`` (only when pyscard, pcscd and a free slot exist).

Stages come from wrappers and hooks attached from outside (``bench.timing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import Context, Measurement, not_measured, summarise
from bench.pgbench import PgServer, unavailable_reason
from bench.servers import (
    Merchant,
    SettlementEnvironment,
    SettlementProcess,
    SetupError,
    fund_cards,
    http_client,
    serve_asgi,
)
from bench.timing import StageClock, TimedReader, TimedSettlement, time_card
from webpurse.card import CardApplet, ImageFile
from webpurse.merchant.settlement import Kind, SettlementClient

NAME = "latency"
PURCHASES = 1000  # through the agent: the end-to-end path
LOCAL_PURCHASES = 200  # merchant holding the SimReader itself
PCSC_PURCHASES = 200
FUNDING = 100_000
AMOUNT = 1
VPCD_SLOTS = ((35963, "Virtual PCD 00 00"), (35964, "Virtual PCD 00 01"))

STAGES = ("card", "reader", "relay", "settlement", "database", "merchant")


@dataclass
class PurchaseTiming:
    total: float
    stages: dict[str, float]
    counts: dict[str, int]


def split_stages(
    seconds: Mapping[str, float], total: float, *, card_timed: bool
) -> dict[str, float]:
    """Turn nested timers into disjoint stages that add up to ``total``.

    Timers: ``merchant reader`` (the merchant's transmit), ``agent reader`` (the agent's
    transmit, remote only), ``card`` (emulator, when ``card_timed``), ``settlement`` (HTTP
    calls), ``database`` (inside settlement). ``merchant`` is what is left: the flow's own
    code and the event loop.
    """
    merchant_reader = seconds.get("merchant reader", 0.0)
    agent_reader = seconds.get("agent reader")
    card = seconds.get("card", 0.0) if card_timed else 0.0
    at_reader = agent_reader if agent_reader is not None else merchant_reader
    stages = {
        "card": card,
        "reader": max(0.0, at_reader - card),
        "relay": max(0.0, merchant_reader - agent_reader) if agent_reader is not None else 0.0,
        "database": seconds.get("database", 0.0),
    }
    stages["settlement"] = max(0.0, seconds.get("settlement", 0.0) - stages["database"])
    stages["merchant"] = max(0.0, total - sum(stages.values()))
    return stages


def latency_rows(
    reader: str, timings: Sequence[PurchaseTiming], *, card_timed: bool
) -> list[Measurement]:
    """p50/p99 of the total and of each stage, and the mean counts per purchase."""
    base: dict[str, str | int | float | bool] = {"reader": reader, "purchases": len(timings)}
    rows: list[Measurement] = []
    totals = summarise([t.total * 1000 for t in timings])
    for stat in ("p50", "p99"):
        value = getattr(totals, stat)
        rows.append(Measurement(NAME, "purchase total", value, "ms", {**base, "stat": stat}))
    for stage in STAGES:
        if stage == "card" and not card_timed:
            continue
        if stage == "relay" and all(t.stages.get("relay", 0) == 0 for t in timings):
            continue
        summary = summarise([t.stages.get(stage, 0.0) * 1000 for t in timings])
        for stat in ("p50", "p99"):
            value = getattr(summary, stat)
            rows.append(Measurement(NAME, f"stage {stage}", value, "ms", {**base, "stat": stat}))
    for what, label in (
        ("merchant reader batches", "merchant↔reader round trips per purchase"),
        ("apdus", "APDUs per purchase"),
        ("merchant reader steps", "APDU steps sent by the merchant per purchase"),
        ("settlement calls", "settlement HTTP calls per purchase"),
        ("statements", "SQL statements per purchase"),
        ("commits", "database commits per purchase"),
        ("rollbacks", "database rollbacks (pool reset) per purchase"),
    ):
        values = [t.counts.get(what, 0) for t in timings]
        if any(values):
            rows.append(Measurement(NAME, label, sum(values) / len(values), "", base))
    return rows


# --- the pieces ------------------------------------------------------------------------


@dataclass
class Rig:
    """Settlement (a timed subprocess) and the merchant's reader hub (uvicorn, in process)."""

    clock: StageClock
    settlement: TimedSettlement
    merchant_url: str
    hub: Any
    merchant: Merchant
    environment: SettlementEnvironment
    http: httpx.AsyncClient
    cards: list[CardApplet] = field(default_factory=list)

    async def database(self) -> tuple[float, dict[str, int]]:
        """Settlement's cumulative database seconds and counts (``bench.settlement_server``)."""
        body = (await self.http.get("/bench/database")).json()
        return float(body["seconds"]), {k: int(v) for k, v in body["counts"].items()}


@contextlib.asynccontextmanager
async def rig(pg: PgServer, folder: Path) -> AsyncIterator[Rig]:
    from fastapi import FastAPI

    from webpurse.reader.remote import ReaderHub

    environment = SettlementEnvironment(pg, folder, database="webpurse_bench_latency")
    server = SettlementProcess(environment, timed=True)
    try:
        merchant = environment.initialise()
        cards = environment.issue_cards(2)
        server.start()
        clock = StageClock()
        hub = ReaderHub(grace=5.0, batch_timeout=30.0)
        merchant_app = FastAPI()
        merchant_app.add_api_websocket_route("/reader", hub.endpoint)
        async with (
            http_client(server.url) as http,
            serve_asgi(merchant_app) as merchant_url,
        ):
            client = SettlementClient(http, merchant.api_key)
            await fund_cards(client, cards, FUNDING)
            try:
                yield Rig(
                    clock,
                    TimedSettlement(client, clock),
                    merchant_url,
                    hub,
                    merchant,
                    environment,
                    http,
                    cards,
                )
            finally:
                await hub.close()
    finally:
        server.stop()
        with contextlib.suppress(Exception):
            environment.drop()


async def _always_consent(_: object) -> bool:
    return True


async def purchase_once(rig: Rig, reader: Any, reference: str) -> PurchaseTiming:
    from webpurse.merchant.flows import run_transaction

    db_before, counts_before = await rig.database()
    rig.clock.take()
    started = time.perf_counter()
    payment = await rig.settlement.create(
        Kind.PAYMENT, AMOUNT, description="bench", reference=reference
    )
    outcome = await run_transaction(reader, rig.settlement, payment, card_timeout=10)  # type: ignore[arg-type]
    total = time.perf_counter() - started
    seconds, counts = rig.clock.take()
    if outcome.status != "succeeded":
        raise SetupError(f"purchase ended {outcome.status} ({outcome.decline_code})")
    db_after, counts_after = await rig.database()
    seconds["database"] = db_after - db_before
    for what, value in counts_after.items():
        counts[what] = value - counts_before.get(what, 0)
    return PurchaseTiming(total, seconds, counts)


async def run_local_sim(ctx: Context, rig: Rig, count: int) -> list[PurchaseTiming]:
    from webpurse.reader.sim import SimReader

    sim = SimReader(rig.cards[0])
    time_card(sim, rig.clock)
    reader = TimedReader(sim, rig.clock, "merchant reader")
    timings = []
    with ctx.task("latency: sim", total=count) as advance:
        for i in range(count):
            timing = await purchase_once(rig, reader, f"sim-{i}")
            timing.stages = split_stages(timing.stages, timing.total, card_timed=True)
            timings.append(timing)
            advance()
    await sim.close()
    return timings


async def run_via_agent(
    ctx: Context, rig: Rig, agent_reader: Any, label: str, count: int, *, card_timed: bool
) -> tuple[list[PurchaseTiming], list[float]]:
    """Purchases through the agent: a new pairing (session) per purchase, as per payment."""
    from webpurse.agent.terminal import TerminalAgent
    from webpurse.reader.messages import Outcome

    timed_agent_reader = TimedReader(agent_reader, rig.clock, "agent reader")
    agent = TerminalAgent(timed_agent_reader, consent=_always_consent, show=lambda _: None)
    timings: list[PurchaseTiming] = []
    pairings: list[float] = []
    try:
        with ctx.task(f"latency: {label}", total=count) as advance:
            for i in range(count):
                binding = f"bench-{label}-{i}"
                started = time.perf_counter()
                pairing = rig.hub.issue(binding, display="bench")
                await agent.pair(
                    f"{rig.merchant_url}/reader", token=pairing.token, origin=rig.merchant_url
                )
                remote = await rig.hub.wait_for_reader(binding, 10)
                pairings.append(time.perf_counter() - started)
                reader = TimedReader(remote, rig.clock, "merchant reader")
                timing = await purchase_once(rig, reader, binding)
                timing.stages = split_stages(timing.stages, timing.total, card_timed=card_timed)
                timings.append(timing)
                await remote.end(Outcome.SUCCEEDED, "paid", AMOUNT)
                await asyncio.wait_for(agent.wait_session(), 10)
                advance()
    finally:
        await agent.close()
    return timings, pairings


def pairing_rows(label: str, pairings: Sequence[float]) -> list[Measurement]:
    summary = summarise([p * 1000 for p in pairings])
    base: dict[str, str | int | float | bool] = {"reader": label, "purchases": len(pairings)}
    return [
        Measurement(
            NAME,
            "pairing (token → agent WebSocket ready)",
            summary.p50,
            "ms",
            {**base, "stat": "p50"},
        ),
        Measurement(
            NAME,
            "pairing (token → agent WebSocket ready)",
            summary.p99,
            "ms",
            {**base, "stat": "p99"},
        ),
    ]


# --- PC/SC over pcscd + vpcd -----------------------------------------------------------


def pcsc_unavailable() -> str | None:
    try:
        import smartcard  # noqa: F401
    except ImportError:
        return "pyscard not installed"
    try:
        from webpurse.reader.pcsc import list_readers

        names = list_readers()
    except Exception as exc:
        return f"pcscd not answering: {exc}"
    if not any(name in names for _, name in VPCD_SLOTS):
        return "pcscd has no vsmartcard vpcd reader"
    return None


def lock_vpcd_slot(port: int) -> Any | None:
    """Lock slot ``port`` like the test suite does (``/tmp/webpurse-vpcd-PORT.lock``)."""
    lock_dir = Path(os.environ.get("WEBPURSE_VPCD_LOCK_DIR", "/tmp"))
    handle = (lock_dir / f"webpurse-vpcd-{port}.lock").open("a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


async def _slot_is_empty(name: str) -> bool:
    """No card in reader ``name`` now (a card served by someone else would answer)."""
    from webpurse.reader.base import ReaderTimeout
    from webpurse.reader.pcsc import PcscReader

    probe = PcscReader(name)
    try:
        await probe.wait_for_card(1.0)
    except ReaderTimeout:
        return True
    finally:
        await probe.close()
    return False


@contextlib.asynccontextmanager
async def free_vpcd_slot() -> AsyncIterator[tuple[int, str] | None]:
    """A vpcd slot that is unlocked and empty, held locked; ``None`` if there is none."""
    for port, name in VPCD_SLOTS:
        handle = lock_vpcd_slot(port)
        if handle is None:
            continue
        try:
            if not await _slot_is_empty(name):
                continue
            yield port, name
            return
        finally:
            handle.close()  # closing the file releases the flock
    yield None


@contextlib.contextmanager
def served_card(image: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "webpurse", "card", "serve", str(image), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def run_pcsc(ctx: Context, rig: Rig, folder: Path, count: int) -> list[Measurement]:
    reason = pcsc_unavailable()
    if reason is not None:
        return [not_measured(NAME, "purchase total", "ms", reason, reader="pcsc via agent")]
    from webpurse.reader.pcsc import PcscReader

    async with free_vpcd_slot() as slot:
        if slot is None:
            reason = "no free vpcd slot (locked by tests, or a card already in it)"
            return [not_measured(NAME, "purchase total", "ms", reason, reader="pcsc via agent")]
        port, name = slot
        state = rig.environment.issue_card_states(1)[0]
        image = folder / "pcsc-card.json"
        ImageFile(image).create(state)
        with served_card(image, port):
            reader = PcscReader(name)
            try:
                await reader.wait_for_card(30)
                await _fund_over_reader(rig, reader)
                timings, pairings = await run_via_agent(
                    ctx, rig, reader, "pcsc via agent", count, card_timed=False
                )
            finally:
                await reader.close()
    return latency_rows("pcsc via agent", timings, card_timed=False) + pairing_rows(
        "pcsc via agent", pairings
    )


async def _fund_over_reader(rig: Rig, reader: Any) -> None:
    from webpurse.merchant.flows import run_transaction

    load = await rig.settlement.create(
        Kind.LOAD, FUNDING, description="bench", reference="pcsc", funding="merchant_float"
    )
    outcome = await run_transaction(reader, rig.settlement, load, card_timeout=10)
    if outcome.status != "succeeded":
        raise SetupError(f"loading the PC/SC card ended {outcome.status} ({outcome.decline_code})")


# --- the benchmark ---------------------------------------------------------------------


async def _run(ctx: Context, pg: PgServer) -> list[Measurement]:
    from webpurse.reader.sim import SimReader

    count = PURCHASES if not ctx.quick else 30
    rows: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="webpurse-bench-latency-") as name:
        folder = Path(name)
        async with rig(pg, folder) as r:
            timings = await run_local_sim(ctx, r, LOCAL_PURCHASES if not ctx.quick else 30)
            rows += latency_rows("sim", timings, card_timed=True)

            sim = SimReader(r.cards[1])
            time_card(sim, r.clock)
            timings, pairings = await run_via_agent(
                ctx, r, sim, "sim via agent", count, card_timed=True
            )
            rows += latency_rows("sim via agent", timings, card_timed=True)
            rows += pairing_rows("sim via agent", pairings)
            await sim.close()

            try:
                rows += await run_pcsc(ctx, r, folder, PCSC_PURCHASES if not ctx.quick else 10)
            except Exception as exc:
                rows.append(
                    not_measured(
                        NAME,
                        "purchase total",
                        "ms",
                        f"pcsc path failed: {type(exc).__name__}: {exc}",
                        reader="pcsc via agent",
                    )
                )
    return rows


def run(ctx: Context) -> list[Measurement]:
    pg = PgServer.from_env()
    reason = unavailable_reason(pg)
    if reason is not None:
        return [not_measured(NAME, "purchase total", "ms", reason)]
    try:
        return asyncio.run(_run(ctx, pg))
    except SetupError as exc:
        return [not_measured(NAME, "purchase total", "ms", f"setup failed: {exc}")]
