"""A batch's fixed and per-item server CPU: ``python -m bench batch_cost [--rev A --rev B]``.

``POST /v1/batch`` costs the server some CPU whatever its size (the HTTP edge, the API
key, the session, the per-batch reads) and some per item. Both are fitted here as
``cost = a + b·n`` (least squares over batches of :data:`SIZES` items), two ways:

- **in process**: a child process (``python -m bench.batch_cost child``) with the
  revision's code builds the app, then times what the route does minus HTTP — a session,
  the key's authentication, ``batch.run`` and the commit — with ``time.process_time``
  (the median batch of each size);
  it also counts the SQL statements per batch (SQLAlchemy ``before_cursor_execute``);
- **through HTTP**: the revision's ``webpurse serve settlement`` (one process) gets the
  same batches one at a time; its CPU is read from /proc before and after (the mean:
  /proc counts in 10 ms ticks).

Items are payment creates with idempotency keys (the fast path's cheapest step, so the
fixed part is as visible as it can be). Between batches the bench cancels the created
payments with one SQL statement of its own (not timed, not the server's), so the open
orders' cap never refuses them. With revisions (``--rev``), each gets a worktree, a
database and a server, as :mod:`bench.versions`; they are measured interleaved (A B, B A),
so a drift of the shared machine shows as a drift, not as a difference. Without, the
checkout itself is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import ROOT, Context, Measurement, Params, not_measured
from bench.pgbench import PgServer, unavailable_reason
from bench.servers import Merchant, SettlementProcess, SetupError, http_client
from bench.versions import Revision, RevisionEnvironment, resolve, schedule, worktree

NAME = "batch_cost"
SIZES = (1, 10, 100, 250)
# Batches per size and round: a few seconds of server CPU each (the shared machine's
# noise is large: the fit is only as good as the means it is fitted to).
REPEATS = {1: 400, 10: 250, 100: 60, 250: 30}
ROUNDS = 4
DATABASE_PREFIX = "webpurse_bench_batch_cost_"
CANCEL = "UPDATE payments SET status = 'canceled' WHERE status = 'requires_card'"


def items(n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` creates, each with a key of its own (``tag`` makes them unique per batch)."""
    return [
        {
            "path": "/v1/payments",
            "idempotency_key": f"{tag}-{i}",
            "body": {"amount": 100, "merchant_reference": f"{tag}-{i}"},
        }
        for i in range(n)
    ]


def repeats(n: int, quick: bool) -> int:
    count = REPEATS.get(n, max(5, 2000 // n))
    return max(3, count // 10) if quick else count


def fit(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least squares ``(a, b)`` of ``y = a + b·n`` over ``(n, y)``."""
    slope, intercept = statistics.linear_regression(
        [float(n) for n, _ in points], [y for _, y in points]
    )
    return intercept, slope


# --- the child: in process -------------------------------------------------------------


def child(sizes: Sequence[int], counts: Sequence[int], api_key: str, tag: str) -> None:
    """Time batches in this process (the revision's ``webpurse``); print JSON to stdout.

    Logs as the server logs (JSON lines at INFO, on stderr): they are part of its cost."""
    import logging

    import psycopg
    from sqlalchemy import event

    from webpurse.settlement import batch
    from webpurse.settlement.app import create_app
    from webpurse.settlement.auth import authenticate
    from webpurse.settlement.logs import configure_logging
    from webpurse.settlement.schemas import BatchItemIn
    from webpurse.settlement.service import Ctx
    from webpurse.settlement.settings import Settings

    configure_logging(logging.INFO)
    settings = Settings.from_env()
    app = create_app(settings)
    state = app.state.settlement
    statements = 0

    def count(*_: object) -> None:
        nonlocal statements
        statements += 1

    event.listen(state.engine, "before_cursor_execute", count)
    url = os.environ["WEBPURSE_DATABASE_URL"].replace("postgresql+psycopg", "postgresql")
    out: dict[str, Any] = {"cpu_ms": {}, "statements": {}}
    with psycopg.connect(url, autocommit=True) as admin:
        for n, repeat in zip(sizes, counts, strict=True):
            cpu: list[float] = []
            for r in range(-1, repeat):  # one untimed warm-up batch per size
                raw = [BatchItemIn.model_validate(i) for i in items(n, f"{tag}-{n}-{r}")]
                statements = 0
                start = time.process_time()
                session = state.session_factory()
                try:
                    principal = authenticate(session, f"Bearer {api_key}")
                    ctx = Ctx(
                        session,
                        state.security,
                        state.clock(),
                        principal,
                        max_open_orders=settings.max_open_orders,
                    )
                    batch.run(ctx, raw, None)
                    session.commit()
                finally:
                    session.close()
                if r >= 0:
                    cpu.append((time.process_time() - start) * 1000)
                out["statements"][str(n)] = statements
                admin.execute(CANCEL.encode())
            # The median: a batch's own CPU, not another process's cache damage or a GC pass.
            out["cpu_ms"][str(n)] = statistics.median(cpu)
    json.dump(out, sys.stdout)


# --- the parent -------------------------------------------------------------------------


@dataclass
class Subject:
    """One revision (or the checkout), set up and serving."""

    label: str
    environment: RevisionEnvironment
    server: SettlementProcess
    merchant: Merchant


def _in_process(subject: Subject, sizes: Sequence[int], quick: bool, tag: str) -> dict[str, Any]:
    env = subject.environment.env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))
    command = [
        *(sys.executable, "-m", "bench.batch_cost", "child", subject.merchant.api_key, tag),
        ",".join(str(n) for n in sizes),
        ",".join(str(repeats(n, quick)) for n in sizes),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SetupError(f"in-process child: {done.stderr.strip()[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def _through_http(
    subject: Subject, sizes: Sequence[int], quick: bool, tag: str
) -> dict[int, float]:
    import psycopg

    url = subject.environment.database_url.replace("postgresql+psycopg", "postgresql")
    headers = {"Authorization": f"Bearer {subject.merchant.api_key}"}
    result: dict[int, float] = {}
    async with http_client(subject.server.url, connections=1) as http:
        with psycopg.connect(url, autocommit=True) as admin:
            for n in sizes:
                spent = 0.0
                count = repeats(n, quick)
                for r in range(-1, count):
                    body = {"requests": items(n, f"{tag}-{n}-{r}")}
                    before = subject.server.cpu_seconds()
                    response = await http.post("/v1/batch", json=body, headers=headers)
                    after = subject.server.cpu_seconds()
                    if response.status_code != 200:
                        raise SetupError(f"batch: {response.status_code} {response.text[:300]}")
                    if r >= 0:
                        spent += after - before
                    admin.execute(CANCEL.encode())
                result[n] = spent * 1000 / count
    return result


def _rows(label: str, where: str, points: dict[int, float], number: int) -> list[Measurement]:
    a, b = fit(sorted(points.items()))
    params: Params = {"rev": label, "where": where, "round": number}
    rows = [
        Measurement(NAME, "fixed CPU per batch (a)", a, "ms", params),
        Measurement(NAME, "CPU per item (b)", b, "ms", params),
    ]
    rows += [
        Measurement(NAME, "CPU per batch", v, "ms", {**params, "items": n})
        for n, v in sorted(points.items())
    ]
    return rows


@contextlib.contextmanager
def _subject(
    pg: PgServer, revision: Revision | None, home: Path, stack: contextlib.ExitStack[Any]
) -> Any:
    if revision is None:
        source, label = ROOT, "checkout"
    else:
        source, label = stack.enter_context(worktree(revision, home / "source")), revision.short
    data = home / "data"
    data.mkdir()
    environment = RevisionEnvironment(
        pg, data, database=DATABASE_PREFIX + home.name, src=source / "src"
    )
    environment.check_code()
    stack.callback(environment.drop)
    merchant = environment.initialise()
    server = SettlementProcess(environment, name=f"settlement-{label}")
    stack.callback(server.stop)
    server.start()
    yield Subject(label, environment, server, merchant)


async def _run(ctx: Context, pg: PgServer, revisions: list[Revision | None]) -> list[Measurement]:
    rows: list[Measurement] = []
    sizes = SIZES
    order = schedule(len(revisions), ROUNDS if not ctx.quick else 1)
    with (
        tempfile.TemporaryDirectory(prefix="webpurse-bench-batch-cost-") as folder,
        contextlib.ExitStack() as stack,
    ):
        subjects: list[Subject] = []
        for place, revision in enumerate(revisions, start=1):
            home = Path(folder) / f"b{place}"
            home.mkdir()
            subjects.append(stack.enter_context(_subject(pg, revision, home, stack)))
        summary: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for number, index in order:
            subject = subjects[index]
            tag = f"r{number}-{time.monotonic_ns()}"
            http = await _through_http(subject, sizes, ctx.quick, tag + "h")
            local = _in_process(subject, sizes, ctx.quick, tag + "p")
            inproc = {int(n): v for n, v in local["cpu_ms"].items()}
            rows += _rows(subject.label, "http", http, number)
            rows += _rows(subject.label, "in process", inproc, number)
            for n, count in local["statements"].items():
                params: Params = {"rev": subject.label, "items": int(n), "round": number}
                rows.append(Measurement(NAME, "SQL statements per batch", count, "", params))
            for where, points in (("http", http), ("in process", inproc)):
                summary.setdefault((subject.label, where), []).append(fit(sorted(points.items())))
            ctx.log(
                f"round {number} {subject.label}: http a={fit(sorted(http.items()))[0]:.2f} ms"
                f" b={fit(sorted(http.items()))[1]:.3f} ms; in process"
                f" a={fit(sorted(inproc.items()))[0]:.2f} ms"
                f" b={fit(sorted(inproc.items()))[1]:.3f} ms;"
                f" statements {local['statements']}"
            )
        for (label, where), fits in summary.items():
            a = statistics.median(f[0] for f in fits)
            b = statistics.median(f[1] for f in fits)
            ctx.log(f"{label} {where}: a = {a:.2f} ms, b = {b:.3f} ms (median of {len(fits)})")
            params = {"rev": label, "where": where, "rounds": len(fits)}
            rows.append(Measurement(NAME, "fixed CPU per batch (a), median", a, "ms", params))
            rows.append(Measurement(NAME, "CPU per item (b), median", b, "ms", params))
    return rows


def run(ctx: Context) -> list[Measurement]:
    pg = PgServer.from_env()
    reason = unavailable_reason(pg)
    if reason is not None:
        return [not_measured(NAME, "fixed CPU per batch (a)", "ms", reason)]
    try:
        revisions: list[Revision | None] = [resolve(given) for given in ctx.revisions] or [None]
        return asyncio.run(_run(ctx, pg, revisions))
    except SetupError as exc:
        return [not_measured(NAME, "fixed CPU per batch (a)", "ms", f"setup: {exc}")]


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _, _, key, run_tag, given_sizes, given_counts = sys.argv
    child(
        [int(s) for s in given_sizes.split(",")],
        [int(c) for c in given_counts.split(",")],
        key,
        run_tag,
    )
