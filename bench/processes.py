"""Settlement throughput against the number of settlement processes, beside pgbench.

Settlement nodes are stateless (issue 17): any number of ``webpurse serve settlement``
processes share one PostgreSQL. This measures purchases/s with 1, 2 and 4 one-worker
processes, side by side with pgbench tpcb-like in the same run, two ways:

- *one port*: the processes share one port (``--reuse-port``, ``SO_REUSEPORT``: each its own
  listening socket, the kernel spreading connections over them); ``CLIENTS`` merchant
  clients, one call per request (create, authorise, capture);
- *batched, a port each*: each process on its own port (as behind a load balancer) with one
  merchant batcher (``BatchingSettlementClient``, ``POST /v1/batch``) of
  ``BATCHED // processes`` shoppers in front of it; the batchers run at once and their
  purchases are added up.

``ratio`` = settlement purchases/s ÷ pgbench TPS at ``CLIENTS`` clients, measured just
before in the same run. The client (card emulators, httpx) runs in this one process and
shares the machine's cores with the servers and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.harness import Context, Measurement, not_measured, ratio, summarise
from bench.pgbench import DATABASE as PGBENCH_DATABASE
from bench.pgbench import Pgbench, PgServer, rows_for, unavailable_reason
from bench.servers import (
    DATABASE,
    SettlementEnvironment,
    SettlementProcess,
    SetupError,
    free_port,
    fund_cards,
    http_client,
)
from bench.settlement import FUNDING, FUNDING_GROUP, WindowResult, measure_window
from webpurse.card import CardApplet
from webpurse.merchant.settlement import SettlementClient

NAME = "processes"
PROCESSES = (1, 2, 4)
CLIENTS = 32  # merchant clients, one call per request, on the shared port
BATCHED = 256  # shoppers in all, split over one batcher per process
SECONDS = 10
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


async def _batched(
    group: Group, api_key: str, cards: list[CardApplet], seconds: float
) -> WindowResult:
    """One batcher per process, each on that process's port, all at once; added up."""
    share = len(cards) // len(group.processes)
    results = await asyncio.gather(
        *(
            measure_window(
                process.url,
                api_key,
                cards[i * share : (i + 1) * share],
                seconds,
                group,
                batching=True,
            )
            for i, process in enumerate(group.processes)
        )
    )
    return WindowResult(
        clients=sum(r.clients for r in results),
        seconds=seconds,
        purchases=sum(r.purchases for r in results),
        latencies=[lat for r in results for lat in r.latencies],
        card_seconds=sum(r.card_seconds for r in results),
        client_cpu_seconds=0.0,
        server_cpu_seconds=0.0,
        errors=[e for r in results for e in r.errors],
        batching=True,
    )


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
    with ctx.task("settlement processes vs pgbench", total=2 + 2 * len(counts)) as advance:
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
                for n in counts:
                    _grow_own(own, environment, n)
                    window = await _batched(own, merchant.api_key, cards[:batched], seconds)
                    rows += _window_rows(window, n, "batched, a port each", result.tps, cpu=False)
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
