"""Settlement throughput against the number of settlement processes, beside pgbench.

Settlement nodes are stateless (issue 17): any number of ``webpurse serve settlement``
processes share one PostgreSQL. This measures purchases/s with 1, 2 and 4 one-worker
processes, side by side with pgbench tpcb-like in the same run, two ways:

- *one port*: the processes share one port (``--reuse-port``, ``SO_REUSEPORT``: each its own
  listening socket, the kernel spreading connections over them); ``CLIENTS`` merchant
  clients, one call per request (create, authorise, capture);
- *batched, a port each*: each process on its own port (as behind a load balancer) with one
  merchant batcher (``BatchingSettlementClient``, ``POST /v1/batch``) of
  ``BATCHED // processes`` shoppers in front of it, each batcher in a client process of its
  own; the batchers' windows are the same wall-clock interval and their purchases are
  added up. Twice: all batchers for *one merchant* (whose payable account every batch
  locks), and *a merchant each*.

``ratio`` = settlement purchases/s ÷ pgbench TPS at ``CLIENTS`` clients, measured just
before in the same run. The client (card emulators, httpx) runs in this one process and
shares the machine's cores with the servers and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import secrets
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.harness import Context, Measurement, not_measured, ratio, summarise
from bench.pgbench import DATABASE as PGBENCH_DATABASE
from bench.pgbench import Pgbench, PgServer, rows_for, unavailable_reason
from bench.servers import (
    DATABASE,
    Merchant,
    SettlementEnvironment,
    SettlementProcess,
    SetupError,
    free_port,
    fund_cards,
    http_client,
)
from bench.settlement import (
    FUNDING,
    FUNDING_GROUP,
    ClientStats,
    WindowResult,
    _client_loop,
    measure_window,
    purchase,
)
from webpurse.card import CardApplet, MemoryStore
from webpurse.merchant.settlement import BatchingSettlementClient, SettlementClient
from webpurse.protocol.purse import CardState

NAME = "processes"
PROCESSES = (1, 2, 4)
CLIENTS = 32  # merchant clients, one call per request, on the shared port
BATCHED = 256  # shoppers in all, split over one batcher per process
SECONDS = 10
WARMUP_SECONDS = 10.0  # client processes start and warm up before their common window
START_TIMEOUT = 60.0


class Group:
    """Settlement processes measured together: their CPU is added up."""

    def __init__(self) -> None:
        self.processes: list[SettlementProcess] = []

    def cpu_seconds(self) -> float:
        return sum(process.cpu_seconds() for process in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            process.stop()
        self.processes.clear()


def _listening(port: int) -> int:
    """How many IPv4 TCP sockets listen on ``port`` (/proc/net/tcp, state 0A)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":
            count += 1
    return count


def _grow_shared(group: Group, environment: SettlementEnvironment, port: int, n: int) -> None:
    """Start processes on the shared ``port`` until ``n`` listen on it."""
    while len(group.processes) < n:
        process = SettlementProcess(
            environment, port=port, reuse_port=True, name=f"shared-{len(group.processes)}"
        )
        group.processes.append(process)
        process.start()  # /health may be answered by a sibling: wait for its own socket too
        deadline = time.monotonic() + START_TIMEOUT
        while _listening(port) < len(group.processes):
            if process.process is not None and process.process.poll() is not None:
                raise SetupError(f"settlement process exited: {process.log.read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise SetupError(f"process {len(group.processes)} did not listen on {port}")
            time.sleep(0.05)  # polling interval of a bounded wait, not synchronisation


def _merchant(environment: SettlementEnvironment, index: int) -> Merchant:
    """Another merchant (purchases need no float)."""
    out = json.loads(
        environment.cli("settlement", "merchant", "create", f"bench-{index}", "--json")
    )
    return Merchant(api_key=out["api_key"], terminal_id=out["terminal_id"])


def _grow_own(group: Group, environment: SettlementEnvironment, n: int) -> None:
    """Start processes, each on its own port, until there are ``n``."""
    while len(group.processes) < n:
        process = SettlementProcess(environment, name=f"own-{len(group.processes)}")
        group.processes.append(process)
        process.start()


def _window_rows(
    result: WindowResult, processes: int, mode: str, pgbench_tps: float | None, cpu: bool
) -> list[Measurement]:
    params: dict[str, str | int | float | bool] = {
        "processes": processes,
        "clients": result.clients,
        "seconds": round(result.seconds, 1),
        "mode": mode,
    }
    note = f"{len(result.errors)} client(s) failed: {result.errors[0]}" if result.errors else ""
    rows = [Measurement(NAME, "settlement purchases/s", result.rate, "1/s", params, note)]
    if result.latencies:
        summary = summarise(result.latencies)
        rows.append(Measurement(NAME, "purchase latency p50", summary.p50 * 1000, "ms", params))
    if cpu and result.purchases:
        per = 1000 / result.purchases
        rows.append(
            Measurement(
                NAME, "server CPU per purchase", result.server_cpu_seconds * per, "ms", params
            )
        )
    rows.append(
        Measurement(NAME, "ratio settlement/pgbench", ratio(result.rate, pgbench_tps), "×", params)
    )
    return rows


Outcome = tuple[int, list[float], list[str], list[CardState]]
"""A batcher's purchases, latencies, errors (as text) and its cards' states afterwards."""


def _batcher_main(
    url: str, api_key: str, states: list[CardState], seconds: float, start_at: float
) -> Outcome:
    """One batcher in its own client process: warm up, then buy from ``start_at`` (wall
    clock, so every batcher's window is the same) for ``seconds``. The cards' states come
    back: the next window goes on from them."""
    cards = [CardApplet(state, MemoryStore(state), secrets.token_bytes) for state in states]
    try:
        done, latencies, errors = asyncio.run(_batcher(url, api_key, cards, seconds, start_at))
    except Exception as exc:  # the parent gets text: not every exception pickles
        done, latencies, errors = 0, [], [f"{type(exc).__name__}: {exc}"]
    return done, latencies, errors, [card.state for card in cards]


async def _batcher(
    url: str, api_key: str, cards: list[CardApplet], seconds: float, start_at: float
) -> tuple[int, list[float], list[str]]:
    async with http_client(url) as http:
        settlement = BatchingSettlementClient(http, api_key)
        warmup = ClientStats()
        await asyncio.gather(*(purchase(settlement, c, warmup, "warmup") for c in cards))
        await asyncio.sleep(max(0.0, start_at - time.time()))  # the common window's start
        stats = [ClientStats() for _ in cards]
        until = time.perf_counter() + seconds
        done = await asyncio.gather(
            *(
                _client_loop(settlement, card, s, until, f"b{i}")
                for i, (card, s) in enumerate(zip(cards, stats, strict=True))
            )
        )
    latencies = [lat for s in stats for lat in s.latencies]
    return sum(done), latencies, [e for s in stats for e in s.errors] + warmup.errors


async def _batched(
    group: Group, api_keys: list[str], cards: list[CardApplet], seconds: float
) -> tuple[WindowResult, list[CardApplet]]:
    """One batcher per process, each in a client process of its own talking to its own
    server process's port, all in one window; purchases added up.

    A client process each: one Python process running every shopper's card emulator
    would itself be the limit (one core), whatever the number of servers.
    """
    share = len(cards) // len(group.processes)
    slices = [cards[i * share : (i + 1) * share] for i in range(len(group.processes))]
    start_at = time.time() + WARMUP_SECONDS
    cpu_before = group.cpu_seconds()
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(slices), mp_context=context) as pool:
        results = await asyncio.gather(
            *(
                loop.run_in_executor(
                    pool,
                    _batcher_main,
                    process.url,
                    api_keys[i % len(api_keys)],
                    [card.state for card in mine],
                    seconds,
                    start_at,
                )
                for i, (process, mine) in enumerate(zip(group.processes, slices, strict=True))
            )
        )
    after = [
        CardApplet(state, MemoryStore(state), secrets.token_bytes)
        for r in results
        for state in r[3]
    ]
    after += cards[share * len(slices) :]  # not in any slice: unchanged
    return WindowResult(
        clients=sum(len(mine) for mine in slices),
        seconds=seconds,
        purchases=sum(r[0] for r in results),
        latencies=[lat for r in results for lat in r[1]],
        card_seconds=0.0,
        client_cpu_seconds=0.0,
        server_cpu_seconds=group.cpu_seconds() - cpu_before,  # warm-ups included
        errors=[e for r in results for e in r[2]],
        batching=True,
    ), after


@contextlib.contextmanager
def _environment(pg: PgServer) -> Iterator[SettlementEnvironment]:
    with tempfile.TemporaryDirectory(prefix="webpurse-bench-processes-") as folder:
        environment = SettlementEnvironment(pg, Path(folder), database=f"{DATABASE}_processes")
        try:
            yield environment
        finally:
            with contextlib.suppress(Exception):
                environment.drop()


async def _run(ctx: Context, pg: PgServer) -> list[Measurement]:
    rows: list[Measurement] = []
    counts = PROCESSES if not ctx.quick else (1, 2)
    clients = CLIENTS if not ctx.quick else 4
    batched = BATCHED if not ctx.quick else 16
    seconds = ctx.seconds(SECONDS)
    with ctx.task("settlement processes vs pgbench", total=2 + 3 * len(counts)) as advance:
        pgbench = Pgbench(pg, database=f"{PGBENCH_DATABASE}_processes")
        pgbench.initialise()
        try:
            result = pgbench.run(clients, int(max(seconds, 1)))
        finally:
            pgbench.drop()
        rows += [
            Measurement(NAME, r.metric, r.value, r.unit, r.params, r.note)
            for r in rows_for(result, clients, int(max(seconds, 1)))
        ]
        advance()
        with _environment(pg) as environment:
            merchant = environment.initialise()
            cards = environment.issue_cards(max(clients, batched))
            shared, own = Group(), Group()
            try:
                _grow_shared(shared, environment, free_port(), 1)
                async with http_client(shared.processes[0].url) as http:
                    funder = SettlementClient(http, merchant.api_key)
                    for start in range(0, len(cards), FUNDING_GROUP):
                        await fund_cards(funder, cards[start : start + FUNDING_GROUP], FUNDING)
                advance()
                port = shared.processes[0].port
                for n in counts:
                    _grow_shared(shared, environment, port, n)
                    window = await measure_window(
                        shared.processes[0].url, merchant.api_key, cards[:clients], seconds, shared
                    )
                    rows += _window_rows(window, n, "one port", result.tps, cpu=True)
                    advance()
                shared.stop()
                others = [_merchant(environment, i) for i in range(1, max(counts))]
                modes = {
                    "batched, a port each, one merchant": [merchant.api_key],
                    "batched, a port and a merchant each": [
                        merchant.api_key,
                        *(m.api_key for m in others),
                    ],
                }
                for mode, keys in modes.items():
                    for n in counts:
                        _grow_own(own, environment, n)
                        window, cards[:batched] = await _batched(
                            own, keys, cards[:batched], seconds
                        )
                        rows += _window_rows(window, n, mode, result.tps, cpu=False)
                        advance()
            finally:
                shared.stop()
                own.stop()
    return rows


def run(ctx: Context) -> list[Measurement]:
    pg = PgServer.from_env()
    reason = unavailable_reason(pg)
    if reason is not None:
        return [
            not_measured(NAME, "settlement purchases/s", "1/s", reason, processes=n)
            for n in PROCESSES
        ]
    try:
        return asyncio.run(_run(ctx, pg))
    except SetupError as exc:
        return [
            not_measured(NAME, "settlement purchases/s", "1/s", f"settlement setup failed: {exc}")
        ]
