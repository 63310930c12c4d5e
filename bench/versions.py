"""Settlement code versions side by side in one run: ``python -m bench versions --rev A --rev B``.

This machine is shared, and its speed drifts by 2× within minutes (docs/performance.md),
so "before" and "after" are only comparable when measured in one run, interleaved. Once,
first: pgbench tpcb-like at :data:`TPCB_CLIENTS` clients and the lean purchase's SQL
(``bench.lean``), PostgreSQL's limit and a purchase's physical limit here. Then, for each
revision: a git worktree of it (``git worktree add --detach``, in a temporary folder), its
own database migrated by that revision (``webpurse settlement init``), its own cards
registered by its code (``bench.issue_cards``) and funded through its loads API, and its
own ``webpurse serve settlement`` (:data:`~bench.settlement.WORKERS` workers, as the
settlement benchmark; with ``WEBPURSE_BENCH_SETTLEMENT_LAYOUT=balanced`` as many one-worker
processes behind HAProxy instead, :mod:`bench.balanced`). The revision's code runs in
this checkout's venv with its ``src`` first on ``PYTHONPATH``: that is only the same
program when the dependencies are, so a revision whose ``uv.lock`` differs from this
checkout's is refused. The client side (the merchant's ``BatchingSettlementClient``, the
card emulator) is this checkout's for all.

Then the windows: :data:`SHOPPERS` batched shoppers for the benchmark's usual window
(``bench.settlement.measure_window``: server and PostgreSQL CPU per purchase), revisions in
the given order in odd rounds and reversed in even ones (A B, B A, A B, B A), so a drift of
the machine shows as a drift, not as a difference between versions. Each window starts
with the revision's database ``ANALYZE``d (autovacuum is off on this machine kind). All
servers stay up for the whole run; only the measured one has shoppers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import lean
from bench.balanced import BALANCED_LAYOUT, BalancedSettlement, layout_from_env
from bench.harness import (
    ROOT,
    Context,
    Measurement,
    Params,
    load_average,
    not_measured,
    run_async,
)
from bench.issue_cards import decode
from bench.pgbench import (
    SECONDS,
    DatabaseCpu,
    Pgbench,
    PgbenchResult,
    PgServer,
    rows_for,
    unavailable_reason,
)
from bench.servers import (
    Merchant,
    SettlementEnvironment,
    SettlementProcess,
    SetupError,
    fund_cards,
    http_client,
)
from bench.settlement import FUNDING, FUNDING_GROUP, WORKERS, measure_window, window_rows
from webpurse.card import CardApplet
from webpurse.merchant.settings import MerchantSettings
from webpurse.merchant.settlement import SettlementClient
from webpurse.protocol.purse import CardState

NAME = "versions"
TPCB_CLIENTS = 8  # tpcb-like and the lean SQL: the settlement benchmark's middle count
SHOPPERS = 512  # the settlement benchmark's heaviest batched window
ROUNDS = 4  # each revision measured once per round: A B, B A, A B, B A
DATABASE_PREFIX = "webpurse_bench_version_"
# Batches the merchant's client may have on their way at once, each measured in turn per
# revision and round (``WEBPURSE_BENCH_IN_FLIGHT=1,2``); by default what a shop uses.
IN_FLIGHT = tuple(
    int(n)
    for n in os.environ.get(
        "WEBPURSE_BENCH_IN_FLIGHT", str(MerchantSettings().settlement_batches_in_flight)
    ).split(",")
    if n.strip()
)


@dataclass(frozen=True)
class Revision:
    """A git revision as given (``HEAD``, ``78c29b5``) and the commit it names."""

    given: str
    commit: str
    subject: str

    @property
    def short(self) -> str:
        return self.commit[:7]


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SetupError(f"git {' '.join(args)}: {done.stderr.strip()[-300:]}")
    return done.stdout.strip()


def resolve(given: str) -> Revision:
    commit = _git("rev-parse", "--verify", f"{given}^{{commit}}")
    return Revision(given, commit, _git("log", "-1", "--format=%s", commit))


def same_dependencies(revision: Revision) -> bool:
    """Whether ``uv.lock`` at ``revision`` is this checkout's (so this venv runs it)."""
    done = subprocess.run(
        ["git", "diff", "--quiet", revision.commit, "--", "uv.lock"], cwd=ROOT, check=False
    )
    return done.returncode == 0


def schedule(count: int, rounds: int) -> list[tuple[int, int]]:
    """(round, index of the revision) in measuring order: the given order in odd rounds,
    reversed in even ones. A revision may be given twice (an A/A run measures the noise)."""
    given = list(range(count))
    return [
        (number, index)
        for number in range(1, rounds + 1)
        for index in (given if number % 2 else given[::-1])
    ]


@contextlib.contextmanager
def worktree(revision: Revision, path: Path) -> Iterator[Path]:
    """A detached git worktree of ``revision`` at ``path``, removed afterwards."""
    _git("worktree", "add", "--detach", str(path), revision.commit)
    try:
        yield path
    finally:
        with contextlib.suppress(SetupError):
            _git("worktree", "remove", "--force", str(path))


@dataclass
class RevisionEnvironment(SettlementEnvironment):
    """A settlement environment whose processes run ``src``'s code (a revision's)."""

    src: Path = field(default=ROOT / "src")

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.src), env.get("PYTHONPATH")]))
        return env

    def issue_card_states(self, count: int) -> list[CardState]:
        """The cards registered by the revision's own code, in a process of its own."""
        done = subprocess.run(
            [sys.executable, "-m", "bench.issue_cards", str(count)],
            cwd=ROOT,  # ``bench`` from this checkout, ``webpurse`` from ``src``
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise SetupError(f"issuing cards: {done.stderr.strip()[-500:]}")
        return decode(done.stdout)

    def check_code(self) -> None:
        """Refuse to measure if ``webpurse`` would not be imported from ``src``."""
        done = subprocess.run(
            [sys.executable, "-c", "import webpurse; print(webpurse.__file__)"],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if not done.stdout.strip().startswith(str(self.src)):
            raise SetupError(f"webpurse not from {self.src}: {done.stdout}{done.stderr}")


@dataclass
class Version:
    """One revision's settlement, set up and serving."""

    revision: Revision
    environment: RevisionEnvironment
    server: SettlementProcess | BalancedSettlement
    merchant: Merchant
    cards: list[CardApplet]


async def _set_up(
    stack: contextlib.ExitStack[bool | None],
    pg: PgServer,
    revision: Revision,
    folder: Path,
    shoppers: int,
) -> Version:
    """Worktree, database, cards and server of ``revision``, undone by ``stack``."""
    if not same_dependencies(revision):
        raise SetupError(
            f"{revision.short}: uv.lock differs from this checkout's (needs a venv of its own)"
        )
    source = stack.enter_context(worktree(revision, folder / "source"))
    data = folder / "data"
    data.mkdir()
    environment = RevisionEnvironment(
        pg, data, database=DATABASE_PREFIX + folder.name, src=source / "src"
    )
    environment.check_code()
    stack.callback(environment.drop)
    merchant = environment.initialise()  # migrated by the revision's own Alembic scripts
    cards = environment.issue_cards(shoppers)
    name = f"settlement-{revision.short}"
    server: SettlementProcess | BalancedSettlement = (
        BalancedSettlement(environment, WORKERS, name)
        if layout_from_env() == BALANCED_LAYOUT
        else SettlementProcess(environment, workers=WORKERS, name=name)
    )
    stack.callback(server.stop)
    server.start()
    async with http_client(server.url) as http:
        funder = SettlementClient(http, merchant.api_key)
        for start in range(0, len(cards), FUNDING_GROUP):
            await fund_cards(funder, cards[start : start + FUNDING_GROUP], FUNDING)
    lean.analyze(pg, environment.database)
    return Version(revision, environment, server, merchant, cards)


def _limits(pg: PgServer, seconds: int) -> tuple[PgbenchResult, list[Measurement]]:
    """tpcb-like, then the lean purchase SQL, at :data:`TPCB_CLIENTS` clients."""
    rows: list[Measurement] = []
    pgbench = Pgbench(pg)
    pgbench.initialise()
    try:
        lean.load(pg, pgbench.database, cards=TPCB_CLIENTS * lean.BATCH)
        with DatabaseCpu(pgbench.database) as cpu:
            tpcb = pgbench.run(TPCB_CLIENTS, seconds)
        rows += [
            Measurement(NAME, r.metric, r.value, r.unit, r.params)
            for r in rows_for(tpcb, TPCB_CLIENTS, seconds)
        ]
        if cpu.seconds is not None and tpcb.transactions:
            per = cpu.seconds * 1000 / tpcb.transactions
            params: Params = {"clients": TPCB_CLIENTS, "seconds": seconds}
            rows.append(
                Measurement(NAME, "pgbench PostgreSQL CPU per transaction", per, "ms", params)
            )
        with DatabaseCpu(pgbench.database) as cpu:
            limit = lean.run(pgbench, TPCB_CLIENTS, seconds)
        rows += lean.rows_for(NAME, limit, TPCB_CLIENTS, seconds, cpu.seconds, tpcb.tps)
    finally:
        pgbench.drop()
    return tpcb, rows


def revision_rows(revisions: Sequence[Revision]) -> list[Measurement]:
    """One row per revision: its place in the given order (1 = before), and its subject."""
    return [
        Measurement(
            NAME, "revision", float(place), "", {"rev": r.short, "given": r.given}, r.subject
        )
        for place, r in enumerate(revisions, start=1)
    ]


async def _run(ctx: Context, pg: PgServer, revisions: list[Revision]) -> list[Measurement]:
    seconds = int(ctx.seconds(SECONDS))
    shoppers = SHOPPERS if not ctx.quick else 16
    order = schedule(len(revisions), ROUNDS if not ctx.quick else 2)
    rows = revision_rows(revisions)
    steps = 2 + len(revisions) + len(order)
    names = " ".join(r.short for r in revisions)
    with (
        ctx.task(f"versions {names}", total=steps) as advance,
        tempfile.TemporaryDirectory(prefix="webpurse-bench-versions-") as folder,
        contextlib.ExitStack() as stack,
    ):
        tpcb, limits = _limits(pg, seconds)
        rows += limits
        advance(2)
        versions: list[Version] = []
        for place, revision in enumerate(revisions, start=1):
            ctx.log(f"setting up {revision.short} ({revision.given}): {revision.subject[:60]}")
            home = Path(folder) / f"v{place}_{revision.short}"
            home.mkdir()
            versions.append(await _set_up(stack, pg, revision, home, shoppers))
            advance()
        for number, index in order:
            for in_flight in IN_FLIGHT:
                rows += await _window(ctx, pg, versions[index], number, seconds, tpcb, in_flight)
            advance()
    return rows


async def _window(
    ctx: Context,
    pg: PgServer,
    version: Version,
    number: int,
    seconds: int,
    tpcb: PgbenchResult,
    in_flight: int,
) -> list[Measurement]:
    revision = version.revision
    # Autovacuum is off here: without it the planner would judge every window by the
    # statistics of the database as loaded, before any earlier window's purchases (tens of
    # thousands of rows). Each window starts freshly analysed.
    lean.analyze(pg, version.environment.database)
    balancer_before = (
        version.server.balancer_cpu_seconds()
        if isinstance(version.server, BalancedSettlement)
        else 0.0
    )
    window = await measure_window(
        version.server.url,
        version.merchant.api_key,
        version.cards,
        seconds,
        version.server,
        batching=True,
        database=version.environment.database,
        in_flight=in_flight,
    )
    mine: Params = {"rev": revision.short, "round": number}
    if isinstance(version.server, BalancedSettlement):
        mine["layout"] = BALANCED_LAYOUT
    rows = [
        Measurement(NAME, r.metric, r.value, r.unit, {**mine, **r.params}, r.note)
        for r in window_rows(window, None, tpcb.tps)
    ]
    if isinstance(version.server, BalancedSettlement) and window.purchases:
        balancer = version.server.balancer_cpu_seconds() - balancer_before
        per = balancer * 1000 / window.purchases
        rows.append(Measurement(NAME, "HAProxy CPU per purchase (batched)", per, "ms", mine))
    load = load_average()
    if load:
        rows.append(Measurement(NAME, "load average (1 min)", load[0], "", mine))
    flight = f", {in_flight} in flight" if in_flight != 1 else ""
    ctx.log(f"round {number} {revision.short}{flight}: {window.rate:,.0f} purchases/s")
    return rows


def run(ctx: Context) -> list[Measurement]:
    pg = PgServer.from_env()
    reason = unavailable_reason(pg)
    if reason is None and len(ctx.revisions) < 2:
        reason = "give two or more revisions (--rev A --rev B)"
    if reason is not None:
        return [not_measured(NAME, "settlement purchases/s (batched)", "1/s", reason)]
    try:
        revisions = [resolve(given) for given in ctx.revisions]
        return run_async(_run(ctx, pg, revisions))
    except SetupError as exc:
        return [not_measured(NAME, "settlement purchases/s (batched)", "1/s", f"setup: {exc}")]
