"""Settlement throughput through its HTTP API, side by side with pgbench, in one run.

Three numbers at each client count N, in this order: pgbench tpcb-like (PostgreSQL's own
limit for a simple write transaction), the lean purchase's SQL under pgbench
(``bench.lean``: what a purchase that keeps every guarantee could cost PostgreSQL), and
settlement through its HTTP API; each with PostgreSQL's CPU per transaction or purchase.
Every database is ``ANALYZE``d after loading (autovacuum is off on this machine kind; the
run records whether it is on).

For each client count N: pgbench tpcb-like with N clients, the lean script, then N
concurrent merchant clients (``webpurse.merchant.settlement.SettlementClient`` over one
``httpx.AsyncClient``) each completing purchases on its own emulated card: create
payment, authorise (the card's READ BINARY + INITIALIZE answers), capture (DEBIT's TAC ‖
MAC2). The card emulator runs in this (client) process between the calls; its time is
counted and reported separately. Afterwards the server is profiled under load with py-spy
(top functions by own time, and by package).
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from bench import lean
from bench.cards import APDUS
from bench.harness import Context, Measurement, not_measured, ratio, run_async, summarise
from bench.pgbench import (
    CLIENTS,
    SECONDS,
    DatabaseCpu,
    Pgbench,
    PgbenchResult,
    PgServer,
    rows_for,
    unavailable_reason,
)
from bench.servers import (
    DATABASE,
    SettlementEnvironment,
    SettlementProcess,
    SetupError,
    fund_cards,
    http_client,
    settlement_server,
)
from webpurse.card import CardApplet
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import BatchingSettlementClient, Kind, SettlementClient
from webpurse.protocol import commands as cmd

NAME = "settlement"
AMOUNT = 1  # fen per purchase: a funded card (100,000 fen) never runs dry in a window
FUNDING = 100_000
FUNDING_GROUP = 16  # cards funded at once (more would only queue for the server's pool)
# ``webpurse serve settlement --workers N``: one worker process per core by default.
WORKERS = int(os.environ.get("WEBPURSE_BENCH_SETTLEMENT_WORKERS", str(os.cpu_count() or 1)))
# Shoppers of one merchant server whose settlement client batches their calls
# (``BatchingSettlementClient`` → ``POST /v1/batch``: group commit).
BATCHED_CLIENTS = (1, 8, 32, 128, 512)
PROFILE_CLIENTS = 512  # the batched server under its heaviest load
# Batches on their way at once in the batched windows: what a shop does by default.
BATCHES_IN_FLIGHT = MerchantSettings().settlement_batches_in_flight
PROFILE_SECONDS = 10
DATABASE_SAMPLE_SECONDS = 0.5  # PostgreSQL's CPU read from /proc this often in a window


class PurchaseFailed(Exception):
    pass


def _data(response: bytes, what: str) -> bytes:
    if response[-2:] != b"\x90\x00":
        raise PurchaseFailed(f"card answered {response[-2:].hex().upper()} to {what}")
    return response[:-2]


@dataclass
class ClientStats:
    latencies: list[float] = field(default_factory=list)
    card_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=64)
def _initialize_apdu(key_index: int, terminal_id: bytes) -> bytes:
    """INITIALIZE FOR PURCHASE of the bench's amount: the same bytes for every purchase
    at one terminal, built once (the card still parses and answers each)."""
    return cmd.InitializeForPurchase(key_index, AMOUNT, terminal_id).to_apdu().to_bytes()


async def purchase(
    settlement: SettlementClient, card: CardApplet, stats: ClientStats, reference: str
) -> None:
    """One purchase as the merchant's flow drives it, the card answering in process."""
    payment = await settlement.create(
        Kind.PAYMENT, AMOUNT, description="bench purchase", reference=reference
    )
    started = time.perf_counter()
    _data(card.process(APDUS.select), "SELECT")
    issuer = _data(card.process(APDUS.read_issuer), "READ BINARY")
    init_apdu = _initialize_apdu(payment.key_index, payment.terminal_id)
    initialize = _data(card.process(init_apdu), "INITIALIZE")
    stats.card_seconds += time.perf_counter() - started
    authorised = await settlement.authorise(
        Kind.PAYMENT,
        payment.id,
        issuer_data=issuer,
        initialize=initialize,
        terminal_id=payment.terminal_id,
    )
    if authorised.authorisation is None:
        raise PurchaseFailed(f"authorise answered {authorised.status} without an APDU")
    started = time.perf_counter()
    debit = _data(card.process(authorised.authorisation.apdu), "DEBIT")
    stats.card_seconds += time.perf_counter() - started
    captured = await settlement.finish(Kind.PAYMENT, payment.id, debit)
    if captured.status != "succeeded":
        raise PurchaseFailed(f"capture answered {captured.status}")


async def _client_loop(
    settlement: SettlementClient, card: CardApplet, stats: ClientStats, until: float, name: str
) -> int:
    done = 0
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            await purchase(settlement, card, stats, f"{name}-{done}")
        except Exception as exc:
            stats.errors.append(f"{type(exc).__name__}: {exc}")
            return done  # a card left mid-transaction would only be declined from now on
        finished = time.perf_counter()
        if finished <= until:
            stats.latencies.append(finished - started)
            done += 1
    return done


@dataclass
class WindowResult:
    clients: int
    seconds: float
    purchases: int
    latencies: list[float]
    card_seconds: float
    client_cpu_seconds: float
    server_cpu_seconds: float
    errors: list[str]
    database_cpu_seconds: float | None = None
    batching: bool = False
    batches: int = 0
    batched_items: int = 0
    in_flight: int = 1

    @property
    def rate(self) -> float:
        return self.purchases / self.seconds


class CpuMeter(Protocol):
    """What a window reads the server's CPU from: one process, or several."""

    def cpu_seconds(self) -> float: ...


async def measure_window(
    url: str,
    api_key: str,
    cards: list[CardApplet],
    seconds: float,
    server: CpuMeter,
    *,
    batching: bool = False,
    database: str = DATABASE,
    in_flight: int = 1,
) -> WindowResult:
    """One warm-up purchase per client, then ``seconds`` of purchases by every client.

    With ``batching`` the clients are shoppers of one merchant server whose settlement
    client coalesces their concurrent calls into ``POST /v1/batch`` (group commit).
    ``database`` is the server's: PostgreSQL's CPU counts that database's backends.
    ``in_flight`` is how many batches the merchant's client may have on their way at once
    (``BatchingSettlementClient(max_in_flight=…)``).
    """
    async with http_client(url) as http:
        settlement = (
            BatchingSettlementClient(http, api_key, max_in_flight=in_flight)
            if batching
            else SettlementClient(http, api_key)
        )
        warmup = [ClientStats() for _ in cards]
        # The first purchase alone: settlement creates ledger accounts on first use.
        await purchase(settlement, cards[0], warmup[0], "warmup")
        await asyncio.gather(
            *(purchase(settlement, c, s, "warmup") for c, s in zip(cards, warmup, strict=True))
        )
        stats = [ClientStats() for _ in cards]
        cpu_before, server_before = time.process_time(), server.cpu_seconds()
        batches_before, items_before = _batch_counts(settlement)
        started = time.perf_counter()
        until = started + seconds
        # Sampled through the window: a backend that ends inside it (a pool's overflow
        # connection closed) takes its CPU out of /proc, and a difference of two readings
        # came out negative (-6 ms a purchase at 32 clients, 23:05). Every 0.5 s: the
        # sampler's own CPU (in this process, the client's) stays under 1 % of a core.
        with DatabaseCpu(database, interval=DATABASE_SAMPLE_SECONDS) as database_cpu:
            counts = await asyncio.gather(
                *(
                    _client_loop(settlement, card, s, until, f"c{i}")
                    for i, (card, s) in enumerate(zip(cards, stats, strict=True))
                )
            )
        return WindowResult(
            clients=len(cards),
            seconds=seconds,
            purchases=sum(counts),
            latencies=[lat for s in stats for lat in s.latencies],
            card_seconds=sum(s.card_seconds for s in stats),
            client_cpu_seconds=time.process_time() - cpu_before,
            server_cpu_seconds=server.cpu_seconds() - server_before,
            errors=[e for s in stats for e in s.errors],
            database_cpu_seconds=database_cpu.seconds,
            batching=batching,
            batches=_batch_counts(settlement)[0] - batches_before,
            batched_items=_batch_counts(settlement)[1] - items_before,
            in_flight=in_flight,
        )


def _batch_counts(settlement: SettlementClient) -> tuple[int, int]:
    if isinstance(settlement, BatchingSettlementClient):
        return settlement.batches_sent, settlement.items_sent
    return 0, 0


def window_rows(
    result: WindowResult, pgbench_tps: float | None, pgbench_best: float | None = None
) -> list[Measurement]:
    """The window's rows; batched windows name their metrics ``… (batched)``.

    ``pgbench_tps`` is pgbench at the same client count (when it ran at that count),
    ``pgbench_best`` the best pgbench TPS of the run: PostgreSQL's own limit here.
    """
    params: dict[str, str | int | float | bool] = {
        "clients": result.clients,
        "seconds": round(result.seconds, 1),
        "workers": WORKERS,
    }
    if result.in_flight != 1:
        params["in flight"] = result.in_flight
    mode = " (batched)" if result.batching else ""
    note = f"{len(result.errors)} client(s) failed: {result.errors[0]}" if result.errors else ""
    rows = [Measurement(NAME, f"settlement purchases/s{mode}", result.rate, "1/s", params, note)]
    if result.latencies:
        summary = summarise(result.latencies)
        rows += [
            Measurement(NAME, f"purchase latency p50{mode}", summary.p50 * 1000, "ms", params),
            Measurement(NAME, f"purchase latency p99{mode}", summary.p99 * 1000, "ms", params),
        ]
    if result.purchases:
        per = 1000 / result.purchases
        rows += [
            Measurement(
                NAME,
                f"server CPU per purchase{mode}",
                result.server_cpu_seconds * per,
                "ms",
                params,
            ),
            Measurement(
                NAME,
                f"client CPU per purchase (httpx + card){mode}",
                result.client_cpu_seconds * per,
                "ms",
                params,
            ),
            Measurement(
                NAME, f"card emulator per purchase{mode}", result.card_seconds * per, "ms", params
            ),
        ]
        if result.database_cpu_seconds is not None:
            rows.append(
                Measurement(
                    NAME,
                    f"PostgreSQL CPU per purchase{mode}",
                    result.database_cpu_seconds * per,
                    "ms",
                    params,
                )
            )
    if result.batches:
        rows.append(
            Measurement(
                NAME,
                "items per batch (mean)",
                result.batched_items / result.batches,
                "",
                params,
            )
        )
    if not result.batching or pgbench_tps is not None:
        value = ratio(result.rate, pgbench_tps)
        rows.append(Measurement(NAME, f"ratio settlement/pgbench{mode}", value, "×", params))
    if result.batching:
        value = ratio(result.rate, pgbench_best)
        rows.append(Measurement(NAME, "ratio batched/pgbench best", value, "×", params))
    return rows


# --- profile ---------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
PACKAGES = (
    "webpurse",
    "sqlalchemy",
    "psycopg",
    "fastapi",
    "starlette",
    "pydantic",
    "pydantic_core",
    "uvicorn",
    "h11",
    "httptools",
    "anyio",
    "structlog",
    "prometheus_client",
    "cryptography",
    "json",
    "logging",
    "asyncio",
    "threading",
    "concurrent",
)


def frame_function(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (path/to/file.py)``."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['func']} ({match['file']})"


def frame_package(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    path = match["file"] if match else frame
    parts = re.split(r"[/\\]", path)
    for package in PACKAGES:
        if package in parts or f"{package}.py" in parts or path.startswith(package + "/"):
            return package
    return "other"


@dataclass(frozen=True)
class Profile:
    samples: int
    own: list[tuple[str, int]]  # function → samples where it is the leaf
    inclusive: list[tuple[str, int]]  # function → samples where it is on the stack
    packages: list[tuple[str, int]]  # package of the leaf frame → samples
    # samples waiting for PostgreSQL (psycopg ``wait``), by the innermost ``only`` caller
    waits: list[tuple[str, int]] = field(default_factory=list)


def parse_collapsed(lines: Iterable[str], *, keep: int = 15, only: str = "webpurse") -> Profile:
    """Aggregate py-spy's collapsed stacks (``frame;frame;... count``).

    ``inclusive`` lists only functions whose file path contains ``only`` (our code).
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    waits: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in lines:
        line = line.strip()
        if not line or " " not in line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += count
        own[frame_function(frames[-1])] += count
        packages[frame_package(frames[-1])] += count
        for function in {frame_function(f) for f in frames}:
            if only in function:
                inclusive[function] += count
        leaf = frame_function(frames[-1])
        if frame_package(frames[-1]) == "psycopg" and leaf.split(" ", 1)[0].endswith("wait"):
            ours = [frame_function(f) for f in frames if only in f]
            waits[ours[-1] if ours else "other"] += count
    return Profile(
        samples=total,
        own=own.most_common(keep),
        inclusive=inclusive.most_common(keep),
        packages=packages.most_common(),
        waits=waits.most_common(keep),
    )


def profile_rows(profile: Profile, clients: int, mode: str = "wall") -> list[Measurement]:
    """Rows for one profile; ``mode`` is ``wall`` (threads not idle) or ``cpu`` (GIL holder)."""
    rows = []
    for kind, entries in (
        ("own time", profile.own),
        ("package (own time)", profile.packages),
        ("inclusive (webpurse)", profile.inclusive),
        ("PostgreSQL waits by caller", profile.waits if mode == "wall" else []),
    ):
        for function, samples in entries:
            share = 100 * samples / profile.samples if profile.samples else 0
            params: dict[str, str | int | float | bool] = {
                "clients": clients,
                "where": function,
                "samples": profile.samples,
            }
            rows.append(Measurement(NAME, f"profile {mode} {kind}", share, "%", params))
    return rows


def find_py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


PROFILE_MODES = {
    # every thread that is not idle: where the wall-clock time goes, waits included
    "wall": ["--nonblocking"],
    # only the thread holding the GIL: where the server's Python CPU goes
    "cpu": ["--nonblocking", "--gil"],
}


async def profile_server(
    ctx: Context,
    environment: SettlementEnvironment,
    server: SettlementProcess,
    merchant_key: str,
    cards: list[CardApplet],
) -> list[Measurement]:
    py_spy = find_py_spy()
    if py_spy is None:
        return [not_measured(NAME, "profile wall own time", "%", "py-spy not installed")]
    seconds = int(ctx.seconds(PROFILE_SECONDS))
    rows: list[Measurement] = []
    for mode, flags in PROFILE_MODES.items():
        output = environment.folder / f"profile-{mode}.txt"
        recorder = subprocess.Popen(
            [
                *(py_spy, "record", "--pid", str(server.pid), "--duration", str(seconds)),
                *("--rate", "200", "--format", "raw", "--output", str(output), *flags),
                *(("--subprocesses",) if server.workers > 1 else ()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        await measure_window(server.url, merchant_key, cards, seconds + 1, server, batching=True)
        _, stderr = recorder.communicate(timeout=60)
        if recorder.returncode != 0 or not output.exists():
            reason = stderr.decode(errors="replace").strip()[-300:]
            rows.append(
                not_measured(NAME, f"profile {mode} own time", "%", f"py-spy failed: {reason}")
            )
            continue
        keep = Path(__file__).resolve().parent / f"profile-settlement-{mode}.txt"
        shutil.copyfile(output, keep)
        ctx.log(f"server profile ({mode}, collapsed stacks) kept in {keep}")
        profile = parse_collapsed(output.read_text().splitlines())
        rows += profile_rows(profile, len(cards), mode)
    return rows


# --- the benchmark ---------------------------------------------------------------------


async def _run(ctx: Context, pg: PgServer) -> list[Measurement]:
    rows: list[Measurement] = []
    clients = CLIENTS if not ctx.quick else (1, 4)
    batched = BATCHED_CLIENTS if not ctx.quick else (4, 16)
    seconds = int(ctx.seconds(SECONDS))
    steps = 2 + 3 * len(clients) + len(batched) + 1
    tps: dict[int, float] = {}
    autovacuum = lean.autovacuum_on(pg)
    rows.append(
        Measurement(
            NAME,
            "autovacuum",
            1.0 if autovacuum else 0.0,
            "",
            {},
            "on" if autovacuum else "off: only the bench's explicit ANALYZE gives statistics",
        )
    )
    with ctx.task("settlement vs pgbench", total=steps) as advance:
        pgbench = Pgbench(pg)
        pgbench.initialise()  # pgbench -i vacuums and analyses its tables itself
        try:
            lean.load(pg, pgbench.database, cards=max(clients) * lean.BATCH)  # and ANALYZE
            with settlement_server(pg, workers=WORKERS) as (environment, server):
                merchant = environment.initialise()
                cards = environment.issue_cards(max(*clients, *batched))
                server.start()
                async with http_client(server.url) as http:
                    funder = SettlementClient(http, merchant.api_key)
                    for start in range(0, len(cards), FUNDING_GROUP):
                        group = cards[start : start + FUNDING_GROUP]
                        await fund_cards(funder, group, FUNDING)
                lean.analyze(pg, environment.database)  # the loaded cards, merchant, keys
                advance()
                for n in clients:
                    with DatabaseCpu(pgbench.database) as cpu:
                        result = pgbench.run(n, seconds)
                    rows += [
                        Measurement(r.benchmark.replace("pgbench", NAME), *_rest(r))
                        for r in rows_for(result, n, seconds)
                    ]
                    rows += _pgbench_cpu(result, n, seconds, cpu.seconds)
                    advance()
                    with DatabaseCpu(pgbench.database) as cpu:
                        limit = lean.run(pgbench, n, seconds)
                    rows += lean.rows_for(NAME, limit, n, seconds, cpu.seconds, result.tps)
                    advance()
                    window = await measure_window(
                        server.url, merchant.api_key, cards[:n], seconds, server
                    )
                    rows += window_rows(window, result.tps)
                    tps[n] = result.tps
                    advance()
                best = max(tps.values(), default=None)
                for n in batched:
                    window = await measure_window(
                        server.url,
                        merchant.api_key,
                        cards[:n],
                        seconds,
                        server,
                        batching=True,
                        in_flight=BATCHES_IN_FLIGHT,
                    )
                    rows += window_rows(window, tps.get(n), best)
                    advance()
                profiled = cards[: min(PROFILE_CLIENTS, len(cards))]
                rows += await profile_server(ctx, environment, server, merchant.api_key, profiled)
                advance()
        finally:
            pgbench.drop()
        advance()
    return rows


def _pgbench_cpu(
    result: PgbenchResult, clients: int, seconds: int, used: float | None
) -> list[Measurement]:
    """PostgreSQL's CPU per tpcb-like transaction over the pgbench window just run."""
    if used is None or not result.transactions:
        return []
    params: dict[str, str | int | float | bool] = {"clients": clients, "seconds": seconds}
    value = used * 1000 / result.transactions
    return [Measurement(NAME, "pgbench PostgreSQL CPU per transaction", value, "ms", params)]


def _rest(row: Measurement) -> tuple[str, float | None, str, dict[str, str | int | float | bool]]:
    return row.metric, row.value, row.unit, row.params


def run(ctx: Context) -> list[Measurement]:
    pg = PgServer.from_env()
    reason = unavailable_reason(pg)
    if reason is not None:
        return [
            not_measured(NAME, "settlement purchases/s", "1/s", reason, clients=c) for c in CLIENTS
        ]
    try:
        return run_async(_run(ctx, pg))
    except SetupError as exc:
        return [
            not_measured(NAME, "settlement purchases/s", "1/s", f"settlement setup failed: {exc}")
        ]
