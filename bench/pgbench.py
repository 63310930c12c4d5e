"""PostgreSQL's own limit on this machine: Debian's ``pgbench``, built-in tpcb-like workload.

Runs against its own database (``webpurse_bench`` by default), created and dropped here so
no one else's data is touched. Connection: ``WEBPURSE_BENCH_PG_HOST`` (127.0.0.1),
``WEBPURSE_BENCH_PG_PORT`` (5432), ``WEBPURSE_BENCH_PG_USER`` (postgres).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.harness import Context, Measurement, not_measured

NAME = "pgbench"
DATABASE = "webpurse_bench"
SCALE = 10
CLIENTS = (1, 8, 32)
SECONDS = 15


@dataclass(frozen=True)
class PgServer:
    host: str = "127.0.0.1"
    port: int = 5432
    user: str = "postgres"

    @classmethod
    def from_env(cls) -> PgServer:
        return cls(
            host=os.environ.get("WEBPURSE_BENCH_PG_HOST", "127.0.0.1"),
            port=int(os.environ.get("WEBPURSE_BENCH_PG_PORT", "5432")),
            user=os.environ.get("WEBPURSE_BENCH_PG_USER", "postgres"),
        )

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user]


@dataclass(frozen=True)
class PgbenchResult:
    tps: float
    latency_ms: float | None
    transactions: int | None


_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without initial connection|excluding connection)", re.M)
_TPS_ANY = re.compile(r"^tps = ([0-9.]+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_TRANSACTIONS = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


def parse_output(output: str) -> PgbenchResult:
    """The figures of a pgbench report (PostgreSQL 12 to 17 wording)."""
    match = _TPS.search(output) or _TPS_ANY.search(output)
    if match is None:
        raise ValueError("no 'tps =' line in pgbench output")
    latency = _LATENCY.search(output)
    transactions = _TRANSACTIONS.search(output)
    return PgbenchResult(
        tps=float(match.group(1)),
        latency_ms=float(latency.group(1)) if latency else None,
        transactions=int(transactions.group(1)) if transactions else None,
    )


def find_pgbench() -> str | None:
    """``pgbench`` on PATH, else the newest Debian one under /usr/lib/postgresql."""
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = glob.glob("/usr/lib/postgresql/*/bin/pgbench")

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.parent.name)
        except ValueError:
            return 0.0

    return max(candidates, key=version) if candidates else None


def postgres_cpu_seconds(database: str | None = None) -> float | None:
    """CPU seconds used so far by this machine's live PostgreSQL processes (from /proc).

    The settlement benchmark runs PostgreSQL on the same machine (ARCHITECTURE.md), so
    the difference over a window is the database's CPU per purchase; ``None`` where
    /proc is not there. With ``database``, only the background processes and that
    database's backends count (not other people's tests on a shared machine). Only live
    processes count: a window whose connections end inside it (pgbench's) is measured by
    :class:`DatabaseCpu` instead.
    """
    if not Path("/proc").is_dir():
        return None
    return sum(_postgres_processes(database).values()) / os.sysconf("SC_CLK_TCK")


def _postgres_processes(database: str | None) -> dict[int, int]:
    """pid → CPU ticks of PostgreSQL's background processes and ``database``'s backends
    (every backend when ``database`` is ``None``).

    Other databases' client backends (other people's tests on a shared machine) are left
    out; a client backend's title names its database and its client's address.
    """
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() not in ("postgres", "postmaster"):
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        client = "(" in title or "[local]" in title
        if client and database is not None and f" {database} " not in f" {title} ":
            continue
        found[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime + stime
    return found


class DatabaseCpu:
    """PostgreSQL's CPU over a window whose connections end inside it (a pgbench run).

    The backends' CPU is gone from /proc once they exit, so a thread samples it every
    ``interval`` seconds and keeps each process's last reading: what a backend spends in
    its last ``interval`` before it exits is missed (with the bench's 15 s windows, under
    1 %). ``seconds`` is ``None`` where /proc is not there.
    """

    def __init__(self, database: str, interval: float = 0.05) -> None:
        self.database = database
        self.interval = interval
        self.seconds: float | None = None
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> DatabaseCpu:
        if Path("/proc").is_dir():
            self._first = _postgres_processes(self.database)
            self._last = dict(self._first)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):  # a sampling period, not a synchronisation
            self._last.update(_postgres_processes(self.database))

    def __exit__(self, *exc: object) -> None:
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join()
        self._last.update(_postgres_processes(self.database))
        ticks = sum(last - self._first.get(pid, 0) for pid, last in self._last.items())
        self.seconds = ticks / os.sysconf("SC_CLK_TCK")


def _admin(server: PgServer, sql: str) -> None:
    import psycopg

    with psycopg.connect(server.url("postgres"), autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def create_database(server: PgServer, name: str) -> None:
    _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(server, f'CREATE DATABASE "{name}"')


def drop_database(server: PgServer, name: str) -> None:
    _admin(server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def unavailable_reason(server: PgServer) -> str | None:
    """Why pgbench cannot run here, or ``None``."""
    if find_pgbench() is None:
        return "pgbench not found (Debian package postgresql-contrib / postgresql-15)"
    try:
        _admin(server, "SELECT 1")
    except Exception as exc:
        detail = " ".join(str(exc).split())  # one line, for the report's table
        return f"PostgreSQL at {server.host}:{server.port} not reachable: {detail}"
    return None


class Pgbench:
    """A tpcb-like pgbench database, initialised once, run at several client counts."""

    def __init__(self, server: PgServer, database: str = DATABASE, scale: int = SCALE) -> None:
        self.server = server
        self.database = database
        self.scale = scale
        binary = find_pgbench()
        if binary is None:
            raise RuntimeError("pgbench not found")
        self.binary = binary

    def initialise(self) -> None:
        create_database(self.server, self.database)
        subprocess.run(
            [self.binary, *self.server.args(), "-i", "-q", "-s", str(self.scale), self.database],
            check=True,
            capture_output=True,
            text=True,
        )

    def run(
        self,
        clients: int,
        seconds: int,
        *,
        script: Path | None = None,
        define: dict[str, int] | None = None,
        transactions: int | None = None,
    ) -> PgbenchResult:
        """tpcb-like at ``clients`` for ``seconds``, or a custom ``script`` (``-f``) with
        its variables (``-D name=value``) on the same database; ``transactions`` per
        client (``-t``) instead of a time window."""
        threads = min(2, clients)
        custom = ["-f", str(script)] if script is not None else []
        for name, value in (define or {}).items():
            custom += ["-D", f"{name}={value}"]
        command = [
            self.binary,
            *self.server.args(),
            "-c",
            str(clients),
            "-j",
            str(threads),
            *(("-t", str(transactions)) if transactions is not None else ("-T", str(seconds))),
            "-M",
            "prepared",
            "-n",
            *custom,
            self.database,
        ]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        return parse_output(done.stdout)

    def drop(self) -> None:
        drop_database(self.server, self.database)


@contextmanager
def pgbench_database(server: PgServer) -> Iterator[Pgbench]:
    bench = Pgbench(server)
    bench.initialise()
    try:
        yield bench
    finally:
        bench.drop()


def rows_for(result: PgbenchResult, clients: int, seconds: int) -> list[Measurement]:
    params: dict[str, str | int | float | bool] = {
        "clients": clients,
        "seconds": seconds,
        "scale": SCALE,
    }
    rows = [Measurement(NAME, "pgbench tps", result.tps, "TPS", params)]
    if result.latency_ms is not None:
        rows.append(Measurement(NAME, "pgbench latency avg", result.latency_ms, "ms", params))
    return rows


def run(ctx: Context) -> list[Measurement]:
    server = PgServer.from_env()
    reason = unavailable_reason(server)
    if reason is not None:
        return [not_measured(NAME, "pgbench tps", "TPS", reason, clients=c) for c in CLIENTS]
    seconds = int(ctx.seconds(SECONDS))
    rows: list[Measurement] = []
    with (
        ctx.task("pgbench: tpcb-like", total=len(CLIENTS) + 1) as advance,
        pgbench_database(server) as pg,
    ):
        advance()
        for clients in CLIENTS:
            rows += rows_for(pg.run(clients, seconds), clients, seconds)
            advance()
    return rows
