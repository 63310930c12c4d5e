"""A real settlement server for the benchmarks: its own PostgreSQL database, a merchant,
funded cards, and ``webpurse serve settlement`` in a uvicorn process.

Setup goes through the admin CLI (``webpurse settlement init`` / ``merchant create``) and,
for speed, the same in-process call the CLI's ``card issue`` makes (no image files: the
cards live in memory); cards are funded through the HTTP loads API, as a top-up agent does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.cards import APDUS
from bench.harness import ROOT
from bench.issue_cards import issue_card_states
from bench.pgbench import PgServer, create_database, drop_database
from webpurse.card import CardApplet, CardState, MemoryStore
from webpurse.merchant.settlement import Kind, SettlementClient
from webpurse.protocol import commands as cmd

DATABASE = "webpurse_bench_settlement"
START_TIMEOUT = 60.0


class SetupError(Exception):
    """The settlement server could not be set up (a part missing or failing)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``/health`` (bounded): ready when it answers 200, failed if the process died."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SetupError(f"server exited with {process.returncode}: {tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)  # polling interval of a bounded wait, not synchronisation by sleep
    raise SetupError(f"server not healthy within {START_TIMEOUT:g} s")


@dataclass
class Merchant:
    api_key: str = field(repr=False)
    terminal_id: str


@dataclass
class SettlementEnvironment:
    """A database, a KEK and a data dir for one benchmark settlement server."""

    pg: PgServer
    folder: Path
    database: str = DATABASE
    kek: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)

    @property
    def database_url(self) -> str:
        return self.pg.url(self.database)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            WEBPURSE_DATABASE_URL=self.database_url,
            WEBPURSE_KEK=self.kek,
            WEBPURSE_DATA_DIR=str(self.folder / "data"),
            PYTHONUNBUFFERED="1",
        )
        return env

    def cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "webpurse", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SetupError(f"webpurse {' '.join(args)}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def initialise(self) -> Merchant:
        create_database(self.pg, self.database)
        self.cli("settlement", "init")
        out = json.loads(self.cli("settlement", "merchant", "create", "bench", "--json"))
        # Loads are funded by money received: the bench merchant prepays its float.
        self.cli(
            "settlement",
            "float",
            "deposit",
            out["id"],
            str(BENCH_FLOAT),
            "--bank-reference",
            "bench-float",
        )
        return Merchant(api_key=out["api_key"], terminal_id=out["terminal_id"])

    def issue_cards(self, count: int) -> list[CardApplet]:
        """``count`` new cards in memory, random numbers from the OS."""
        return [
            CardApplet(state, MemoryStore(state), secrets.token_bytes)
            for state in self.issue_card_states(count)
        ]

    def issue_card_states(self, count: int) -> list[CardState]:
        """Personalise and register ``count`` cards (what ``settlement card issue`` does)."""
        return issue_card_states(self.env(), count)

    def drop(self) -> None:
        drop_database(self.pg, self.database)


class SettlementProcess:
    """``python -m webpurse serve settlement`` on a free port, logs to a file."""

    def __init__(
        self,
        environment: SettlementEnvironment,
        *,
        timed: bool = False,
        workers: int = 1,
        port: int | None = None,
        reuse_port: bool = False,
        name: str = "settlement",
    ) -> None:
        """``timed``: run ``bench.settlement_server`` (the same app with database timers);
        ``workers``: ``webpurse serve settlement --workers N`` (not with ``timed``);
        ``reuse_port``: ``--reuse-port``, so several processes may share ``port``."""
        self.environment = environment
        self.timed = timed
        self.workers = workers
        self.reuse_port = reuse_port
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = environment.folder / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        if self.timed:
            command = [sys.executable, "-m", "bench.settlement_server", "--port", str(self.port)]
        else:
            command = [
                *(sys.executable, "-m", "webpurse", "serve", "settlement"),
                *("--host", "127.0.0.1", "--port", str(self.port), "--no-migrate"),
                *(("--workers", str(self.workers)) if self.workers > 1 else ()),
                *(("--reuse-port",) if self.reuse_port else ()),
            ]
        env = self.environment.env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        _wait_until_healthy(self.url, self.process, self.log)

    def cpu_seconds(self) -> float:
        """User + system CPU time the server (and its worker processes) used so far (/proc)."""
        return cpu_seconds(_process_tree(self.pid))

    def stop(self) -> None:
        stop_process(self.process)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU of the processes ``pids`` (all their threads) so far, from /proc;
    a process gone meanwhile counts nothing."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    """Terminate ``process`` if it runs, kill it if it has not ended within ``timeout``."""
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc), e.g. uvicorn's worker processes."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(FileNotFoundError):
                    queue += [int(c) for c in (task / "children").read_text().split()]
    return found


BENCH_FLOAT = 10**12
"""Fen the bench merchant prepays into its top-up float (enough for every bench load)."""


@contextlib.contextmanager
def settlement_server(
    pg: PgServer, *, workers: int = 1
) -> Iterator[tuple[SettlementEnvironment, SettlementProcess]]:
    with tempfile.TemporaryDirectory(prefix="webpurse-bench-settlement-") as folder:
        environment = SettlementEnvironment(pg, Path(folder))
        try:
            process = SettlementProcess(environment, workers=workers)
            try:
                yield environment, process
            except Exception:
                if process.log.exists():  # keep the server's side of the failure
                    kept = Path(tempfile.gettempdir()) / "webpurse-bench-settlement.log"
                    shutil.copyfile(process.log, kept)
                    sys.stderr.write(f"settlement server log kept in {kept}\n")
                raise
            finally:
                process.stop()
        finally:
            with contextlib.suppress(Exception):
                environment.drop()


@contextlib.asynccontextmanager
async def http_client(url: str, connections: int = 100) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:
        yield client


def _data(response: bytes, what: str) -> bytes:
    if response[-2:] != b"\x90\x00":
        raise SetupError(f"card answered {response[-2:].hex().upper()} to {what}")
    return response[:-2]


async def fund_card(settlement: SettlementClient, card: CardApplet, amount: int) -> None:
    """Load ``amount`` onto ``card`` through settlement's loads API (a top-up)."""
    load = await settlement.create(
        Kind.LOAD, amount, description="bench", reference="bench", funding="merchant_float"
    )
    _data(card.process(APDUS.select), "SELECT")
    issuer = _data(card.process(APDUS.read_issuer), "READ BINARY")
    init = cmd.InitializeForLoad(load.key_index, amount, load.terminal_id).to_apdu().to_bytes()
    initialize = _data(card.process(init), "INITIALIZE FOR LOAD")
    authorised = await settlement.authorise(
        Kind.LOAD,
        load.id,
        issuer_data=issuer,
        initialize=initialize,
        terminal_id=load.terminal_id,
    )
    assert authorised.authorisation is not None
    tac = _data(card.process(authorised.authorisation.apdu), "CREDIT FOR LOAD")
    done = await settlement.finish(Kind.LOAD, load.id, tac)
    if done.status != "succeeded":
        raise SetupError(f"load ended {done.status}")


async def fund_cards(settlement: SettlementClient, cards: list[CardApplet], amount: int) -> None:
    """Fund the first card alone, then the others concurrently.

    Alone first because settlement creates ledger accounts on first use and concurrent
    first uses collide (UniqueViolation → 500; reported in docs/performance.md).
    """
    await fund_card(settlement, cards[0], amount)
    await asyncio.gather(*(fund_card(settlement, card, amount) for card in cards[1:]))


@contextlib.asynccontextmanager
async def serve_asgi(app: object, *, ws_max_size: int = 1 << 20) -> AsyncIterator[str]:
    """Serve an ASGI app with a real uvicorn server in this event loop, on a free port."""
    import uvicorn

    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
    # with proto 0 Nagle stays on and a message sent right after another waits ~40 ms
    # for the delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        lifespan="off",
        log_level="warning",
        access_log=False,
        ws_max_size=ws_max_size,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while not server.started:  # bounded polling on the server's own flag
        if task.done() or loop.time() > deadline:
            raise SetupError("uvicorn did not start")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()
